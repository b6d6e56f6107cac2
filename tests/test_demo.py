"""make demo's chain end to end, shrunk: data, shards, training, animation, evaluation, report."""

import json
import shutil

import numpy as np
import pytest

from dynamictrl import config
from dynamictrl.demo import run
from dynamictrl.models import embedded
from dynamictrl.utils.video import read_video


@pytest.mark.slow
def test_the_demo_chain_writes_its_reports_videos_and_pictures(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("DYNAMICTRL_DATA", str(tmp_path / "data"))  # the embedded model: the tiny fixture
    shutil.copytree(tiny_model, embedded.default_path())
    data, out = tmp_path / "demo", tmp_path / "out"
    train = [f"data.train_shards={data}/shards/train-*.tar", "trainer.max_steps=2", "samples.every_n_steps=0",
             "logger=csv", "checkpoint_every=2", "trainer.enable_progress_bar=false"]  # fmt: skip
    cfg = config.load("demo", [f"output={out}", f"data.root={data}", "data.num_train=2", "data.num_test=1",
                               "eval_clips=2", "animate.steps=2",
                               "train_overrides=[" + ",".join(f"'{o}'" for o in train) + "]"])  # fmt: skip
    report = run(cfg)
    assert report["train_steps"] == 2 and report["held_out_clips"] == 2
    assert json.loads((out / "report.json").read_text())["trained"] == report["trained"]
    for label in ("trained", "untrained", "static_reference", "vae_ceiling"):
        m = report[label]
        assert 0 < m["l1"] and 0 < m["psnr_star"] < 100 and -1 <= m["ssim"] <= 1
        assert 0 <= m["pose_pck"] <= 1  # MediaPipe on the generated clips against the driving ones
        ev = out / "eval" / label
        assert {p.name for p in ev.iterdir()} >= {"report.md", "metrics.json", "metrics.csv", "per_video.png",
                                                  "per_frame.png", "side_by_side"}  # fmt: skip
        assert len(list((ev / "side_by_side").glob("*.mp4"))) == 2
        assert "| pose_pck |" in (ev / "report.md").read_text()
    # The static baseline is the reference frame repeated, scored like the models.
    static, truth = read_video(next((out / "static_reference").glob("*.mp4")))[0], read_video(next((out / "reference").glob("*.mp4")))[0]
    assert len(static) == len(truth) and all(np.abs(f.astype(int) - static[0]).mean() < 2 for f in static)
    assert np.abs(static[0].astype(int) - truth[0]).mean() < 2 and np.abs(static[-1].astype(int) - truth[-1]).mean() > 2
    assert report["pck_over_static"] == pytest.approx(report["trained"]["pose_pck"] / report["static_reference"]["pose_pck"])
    assert "| static_reference |" in (out / "report.md").read_text()
    assert (out / "side_by_side.mp4").stat().st_size > 0 and (out / "side_by_side.png").stat().st_size > 0
    assert "| trained |" in (out / "report.md").read_text()

"""make demo's chain end to end, shrunk: data, shards, training, animation, evaluation, report."""

import json
import shutil

import numpy as np
import pytest

from dynamictrl import config
from dynamictrl.demo import run
from dynamictrl.models import embedded
from dynamictrl.utils.video import read_frames_dir


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["tiny", "demo"])
def test_the_demo_chain_writes_its_reports_videos_and_pictures(layout, tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("DYNAMICTRL_DATA", str(tmp_path / "data"))  # the embedded model: the tiny fixture
    shutil.copytree(tiny_model, embedded.default_path())
    data, out = tmp_path / "demo", tmp_path / "out"
    train = [f"data.train_shards={data}/shards/train-*.tar", "trainer.max_steps=2", "samples.every_n_steps=0",
             "logger=csv", "checkpoint_every=2", "trainer.enable_progress_bar=false"]  # fmt: skip
    cfg = config.load("demo", [f"output={out}", f"data.root={data}", "data.num_train=2", "data.num_test=1", f"layout={layout}",
                               "eval_clips=2", "animate.steps=2",
                               "train_overrides=[" + ",".join(f"'{o}'" for o in train) + "]"])  # fmt: skip
    report = run(cfg)
    assert report["train_steps"] == 2 and report["held_out_clips"] == 2 and report["layout"] == layout
    trained = json.loads((out / "train" / "dynamictrl.json").read_text())
    assert trained["num_frames"] == embedded.LAYOUTS[layout]["num_frames"]  # 9 in both layouts
    assert (embedded.default_path(layout) / "model_index.json").is_file()
    assert json.loads((out / "report.json").read_text())["trained"] == report["trained"]
    for label in ("trained", "untrained", "static_reference", "vae_ceiling"):
        m = report[label]
        assert 0 < m["l1"] and 0 < m["psnr_star"] < 100 and -1 <= m["ssim"] <= 1
        assert 0 < m["figure_psnr"] < 100 and -1 <= m["figure_ssim"] <= 1  # inside the person masks' union
        assert 0 <= m["pose_pck"] <= 1  # MediaPipe on the generated clips against the driving ones
        ev = out / "eval" / label
        assert {p.name for p in ev.iterdir()} >= {"report.md", "metrics.json", "metrics.csv", "per_video.png",
                                                  "per_frame.png", "side_by_side"}  # fmt: skip
        assert len(list((ev / "side_by_side").glob("*.mp4"))) == 2
        assert "| pose_pck |" in (ev / "report.md").read_text()
    # The static baseline is the reference frame repeated, scored like the models.
    key = sorted(p.name for p in (out / "reference").iterdir())[0]  # frames, lossless
    static, truth = read_frames_dir(out / "static_reference" / key), read_frames_dir(out / "reference" / key)
    assert len(static) == len(truth) and all(np.array_equal(f, static[0]) for f in static)
    assert np.array_equal(static[0], truth[0]) and np.abs(static[-1].astype(int) - truth[-1]).mean() > 2
    # Frame 0, the reference, is not scored: the static reference would be exact there.
    scored = json.loads((out / "eval" / "static_reference" / "metrics.json").read_text())
    assert scored["first_frame"] == 1 and scored["frames"] == 2 * (len(truth) - 1)
    assert "not scored" in report["reference_frame"] and "not scored" in (out / "report.md").read_text()
    # The pose swap: own poses vs another held-out clip's, for both models.
    assert set(report["pose_swap"]) == {"trained", "untrained"}
    for gains in report["pose_swap"].values():
        assert set(gains) == {"psnr_star", "figure_psnr", "ssim"}
        for g in gains.values():
            assert g["ci95"][0] <= g["gain"] <= g["ci95"][1] and len(g["per_clip"]) == 2
    assert len(list((out / "trained_swapped").iterdir())) == 2
    assert "figure PSNR gain" in (out / "report.md").read_text()
    static_pck = report["static_reference"]["pose_pck"]
    assert report["pck_over_static"] == (pytest.approx(report["trained"]["pose_pck"] / static_pck) if static_pck else None)
    assert "| static_reference |" in (out / "report.md").read_text()
    assert (out / "side_by_side.mp4").stat().st_size > 0 and (out / "side_by_side.png").stat().st_size > 0
    assert "| trained |" in (out / "report.md").read_text()
    assert report["shown_clip"] in [p.name for p in (out / "trained").iterdir()]
    shift = report["pose_shift"]["trained"]
    assert shift["clips"] == 2 and shift["ci95"][0] <= shift["gain"] <= shift["ci95"][1]
    assert (out / "shift.png").stat().st_size > 0 and "## Pose shift" in (out / "report.md").read_text()
    assert len(list((out / "trained_shifted" / "dx+8").iterdir())) == 2
    assert f"`{report['shown_clip']}`, the clip with the median" in (out / "report.md").read_text()


def test_the_picture_shows_the_clip_with_the_median_gain_not_the_first():
    from dynamictrl.demo import shown_clip

    keys = ["a", "b", "c", "d"]
    gains = {"figure_psnr": {"per_clip": {"a": 1.0, "b": 3.0, "c": 2.0, "d": 5.0}},
             "psnr_star": {"per_clip": {"a": 9.0, "b": 0.0, "c": 5.0, "d": 2.0}}}  # fmt: skip
    assert shown_clip(gains, keys) == 2  # c: the lower middle of 1, 2, 3, 5
    assert shown_clip({"psnr_star": gains["psnr_star"]}, keys) == 3  # no figure scores: PSNR*'s median, d
    assert shown_clip({"figure_psnr": {"gain": None, "per_clip": {}}}, keys) == 0  # nothing computed: the first


def test_held_out_clips_take_one_clip_of_each_video_before_a_second():
    from dynamictrl.demo import spread_over_videos

    clips = [{"key": f"test_v{v}-{i:04d}", "meta": {"video_id": f"test_v{v}"}} for v in range(3) for i in range(3)]
    keys = [s["key"] for s in spread_over_videos(clips, 5)]
    assert keys == ["test_v0-0000", "test_v1-0000", "test_v2-0000", "test_v0-0001", "test_v1-0001"]
    assert [s["key"] for s in spread_over_videos(clips[:3], 2)] == ["test_v0-0000", "test_v0-0001"]  # one video: its clips


def test_demo_data_of_another_recipe_is_made_again_not_mixed(tmp_path):
    """The same seed and index give the same video, so a test video of one recipe is a training video of
    another with more training videos: a root made by another recipe is made again from nothing."""
    from dynamictrl.data.demo_data import make_demo_data
    from dynamictrl.data.shards import list_shards

    recipe = {"root": str(tmp_path / "d"), "num_train": 1, "num_test": 1, "seed": 0, "preprocess_overrides": ["num_frames=9"]}
    shards = make_demo_data(recipe)
    first = {p.name: p.stat().st_mtime_ns for p in shards.iterdir()}
    record = tmp_path / "d" / "demo_data.json"
    written = record.stat().st_mtime_ns
    assert make_demo_data(recipe) == shards and {p.name: p.stat().st_mtime_ns for p in shards.iterdir()} == first
    assert record.stat().st_mtime_ns == written  # not rewritten: another run sharing the root may be reading it
    make_demo_data(recipe | {"num_train": 2})
    assert sorted(p.name for p in (tmp_path / "d" / "raw" / "train").iterdir()) == ["synth0000", "synth0001"]
    assert [p.name for p in (tmp_path / "d" / "raw" / "test").iterdir()] == ["synth0002"]  # synth0001 was the test video
    keys = {json.loads(line)["video_id"] for line in (shards / "manifest.jsonl").read_text().splitlines()}
    assert keys == {"train_synth0000", "train_synth0001", "test_synth0002"} and list_shards(str(shards / "train-*.tar"))

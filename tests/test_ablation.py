"""make ablation, shrunk: every variant trains from one checkpoint per seed, is scored, and reported."""

import json
import shutil

import pytest

from dynamictrl import config
from dynamictrl.ablation import run, separated
from dynamictrl.models import embedded


@pytest.mark.slow
def test_ablation_trains_each_variant_per_seed_and_reports_the_spread(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("DYNAMICTRL_DATA", str(tmp_path / "data"))
    shutil.copytree(tiny_model, embedded.default_path())
    out = tmp_path / "out"
    train = ["trainer.max_steps=2", "checkpoint_every=2", "trainer.enable_progress_bar=false"]
    cfg = config.load("ablation", [f"output={out}", f"data.root={tmp_path / 'demo'}", "data.num_train=2",
                                   "data.num_test=1", "eval_clips=2", "animate.steps=2", "seeds=[0,1]",
                                   "train_overrides=[" + ",".join(f"'{o}'" for o in train) + "]"])  # fmt: skip
    result = run(cfg)
    summary = result["summary"]
    assert set(summary) == {"padaln", "uvt", "cross_attn", "padaln_no_text"}
    for name, row in summary.items():
        assert row["seeds"] == 2 and row["steps"] == 2 and len(row["pose_pck"]["values"]) == 2
        assert row["step_s"]["mean"] > 0 and 0 <= row["ssim"]["min"] <= row["ssim"]["max"] <= 1
        assert len(row["figure_psnr"]["values"]) == 2 and len(row["swap_figure_psnr"]["values"]) == 2
        scores = json.loads((out / "runs" / f"{name}-seed0" / "scores.json").read_text())
        assert scores["swap_figure_psnr"] == scores["pose_swap"]["figure_psnr"]["gain"]
        assert len(scores["pose_swap"]["psnr_star"]["ci95"]) == 2
        run_cfg = (out / "runs" / f"{name}-seed1" / "train" / "config.yaml").read_text()
        assert f"control: {cfg.variants[name].control}" in run_cfg and "seed: 1" in run_cfg
    # The variants' weights differ in the pose branch: cross-attention costs parameters, UVT almost none.
    assert summary["cross_attn"]["overhead"] > summary["padaln"]["overhead"] > summary["uvt"]["overhead"]
    assert summary["padaln"]["overhead_5b"] == pytest.approx(0.0357, abs=1e-3)
    # The no-text variant dropped every caption in training.
    assert "text_drop: 1.0" in (out / "runs" / "padaln_no_text-seed0" / "train" / "config.yaml").read_text()
    # Two seeds give different runs (else the spread would be meaningless).
    assert summary["padaln"]["l1"]["values"][0] != summary["padaln"]["l1"]["values"][1]
    report = (out / "report.md").read_text()
    assert "| padaln_no_text |" in report and "20.41" in report and "±" in report
    assert "swap gain figure PSNR" in report and "not scored" in report
    assert (out / "ablation.png").stat().st_size > 0
    assert json.loads((out / "ablation.json").read_text())["summary"]["uvt"]["seeds"] == 2
    # A re-run keeps finished runs.
    before = (out / "runs" / "uvt-seed0" / "scores.json").stat().st_mtime_ns
    run(cfg)
    assert (out / "runs" / "uvt-seed0" / "scores.json").stat().st_mtime_ns == before


def test_separated_compares_seed_ranges():
    s = {"a": {"m": {"min": 1.0, "max": 2.0}}, "b": {"m": {"min": 2.5, "max": 3.0}}, "c": {"m": {"min": 1.5, "max": 2.6}}}
    assert separated(s, "a", "b", "m") and not separated(s, "a", "c", "m") and not separated(s, "b", "c", "m")

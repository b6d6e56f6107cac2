"""The cluster rehearsal (make rehearse) as CI runs it: every shipped trainer config trains the real module
on CPU processes with its own precision and strategy, launched as its users launch it, killed after a
checkpoint, resumed and exported (src/dynamictrl/train/rehearse.py says what is compared)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from dynamictrl.train.rehearse import ROWS

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.timeout(3000)
def test_every_trainer_config_rehearses_kill_resume_and_export(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "dynamictrl.train.rehearse", "--out", str(tmp_path)],
                          capture_output=True, text=True, cwd=tmp_path, timeout=2900)  # fmt: skip
    lines = [ln for ln in proc.stdout.splitlines() if ln.split(" ")[0] in ROWS]
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert [ln.split()[0] for ln in lines] == list(ROWS) and all(" ok " in ln for ln in lines)
    report = json.loads((tmp_path / "report.json").read_text())
    rows = {r["config"]: r for r in report["rows"]}
    assert all(r["resume_equal"] and r["export_equal"] and r["steps"] == 5 for r in rows.values())
    assert all(r["checkpoint_at_kill"] == "step-000003.ckpt" for r in rows.values())
    assert len(rows["slurm"]["wandb_ids"]) == 1 and rows["slurm"]["wandb_ids"][0] != "None"
    assert set(report["first_loss_spread"]) == {"full", "lora"}
    assert all(spread <= 0.01 for spread in report["first_loss_spread"].values())

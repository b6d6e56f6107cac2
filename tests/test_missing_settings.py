"""A mandatory setting left `???` is one line naming its full key and an example value, exit code 2:
through the train and precompute commands (before any work), and for any setting a stage reads."""

import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from dynamictrl.errors import user_errors

ROOT = Path(__file__).resolve().parents[1]

CASES = {
    "train": (["model=cogvideox1.5-5b-i2v", "trainer=fsdp", "output=OUT"],
              "train: error: data.train_shards is not set (e.g. data.train_shards='SHARDS/train-*.tar')"),
    "precompute": ([], "precompute: error: input and output are not set (e.g. input='SHARDS/train-*.tar' output=DIR)"),
    "precompute-output": (["input=/no/such/shards"], "precompute: error: output is not set (e.g. output=DIR)"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_command_names_the_missing_setting(case, tmp_path):
    args, line = CASES[case]
    script = ROOT / "pipelines" / case.split("-")[0] / "main.py"
    proc = subprocess.run([sys.executable, str(script), *(a.replace("OUT", str(tmp_path / "out")) for a in args)],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300)  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines() == [line]
    assert "Traceback" not in proc.stdout + proc.stderr


def stage_error(capsys, read) -> str:
    with pytest.raises(SystemExit) as stop, user_errors("stage", examples={"model.path": "DIR"}):
        read()
    assert stop.value.code == 2
    return capsys.readouterr().err


def test_any_missing_setting_read_in_a_stage_is_one_line(capsys):
    cfg = OmegaConf.create({"model": {"path": "???", "name": "x"}, "data": {"shards": "???"},
                            "root": "${model.path}/sub"})  # fmt: skip
    assert stage_error(capsys, lambda: cfg.model.path) == "stage: error: model.path is not set (e.g. model.path=DIR)\n"
    assert stage_error(capsys, lambda: cfg.data.shards) == "stage: error: data.shards is not set\n"
    # through an interpolation: the missing setting, not the one that refers to it
    assert stage_error(capsys, lambda: cfg.root) == "stage: error: model.path is not set (e.g. model.path=DIR)\n"

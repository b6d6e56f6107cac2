"""make setup CUDA=cu126 / TORCH_INDEX=URL: torch and torchvision from that index first, the choice kept
in .venv/torch-index.txt so that later makes keep it and another choice replaces them (checked with
make -n in a scratch folder: the index itself is unreachable from the development machines)."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CU126 = "https://download.pytorch.org/whl/cu126"

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="no make")


def planned(folder: Path, *args: str) -> list[str]:
    """The commands `make setup ARGS` would run in `folder`."""
    proc = subprocess.run(["make", "-n", "-f", str(ROOT / "Makefile"), "setup", *args], cwd=folder,
                          capture_output=True, text=True, check=True)  # fmt: skip
    return [line for line in proc.stdout.splitlines() if line.startswith((".venv/bin/pip", "echo"))]


@pytest.fixture
def fresh(tmp_path) -> Path:
    """A checkout without .venv."""
    (tmp_path / "pyproject.toml").touch()
    (tmp_path / "constraints.txt").touch()
    return tmp_path


def installed(folder: Path, index: str | None) -> Path:
    """`folder` as after make setup with `index` recorded (None: a .venv made before the record)."""
    (folder / ".venv").mkdir()
    if index is not None:
        (folder / ".venv" / "torch-index.txt").write_text(index + "\n")
    (folder / ".venv.stamp").touch()
    later = (folder / "pyproject.toml").stat().st_mtime + 10
    os.utime(folder / ".venv.stamp", (later, later))
    return folder


def test_default_installs_from_pypi(fresh):
    steps = planned(fresh)
    assert not any("--index-url" in s or "download.pytorch.org" in s or "uninstall" in s for s in steps)
    assert any(s.endswith('-e ".[backends,dev]"') for s in steps)
    assert steps[-1] == 'echo "" > .venv/torch-index.txt'


@pytest.mark.parametrize(("args", "index"), [(["CUDA=cu126"], CU126),
                                             (["TORCH_INDEX=https://mirror.example/whl"], "https://mirror.example/whl")])  # fmt: skip
def test_a_cuda_build_comes_first_from_its_index(fresh, args, index):
    steps = planned(fresh, *args)
    torch = steps.index(f".venv/bin/pip install -q -c constraints.txt --index-url {index} torch torchvision")
    rest = next(i for i, s in enumerate(steps) if s.endswith('-e ".[backends,dev]"'))
    assert torch < rest and "--index-url" not in steps[rest]
    assert steps[-1] == f'echo "{index}" > .venv/torch-index.txt'


@pytest.mark.parametrize("args", [[], ["CUDA=cu126"]])
def test_the_recorded_build_is_kept(fresh, args):
    assert planned(installed(fresh, CU126), *args) == []


def test_a_venv_from_before_the_record_is_left_alone(fresh):
    assert planned(installed(fresh, None)) == []


@pytest.mark.parametrize(("args", "index"), [(["CUDA=pypi"], ""), (["CUDA=cu128"], "https://download.pytorch.org/whl/cu128")])
def test_another_build_replaces_torch(fresh, args, index):
    steps = planned(installed(fresh, CU126), *args)
    removed = steps.index(".venv/bin/pip uninstall -q -y torch torchvision")
    from_index = [i for i, s in enumerate(steps) if "--index-url" in s]
    assert from_index == ([removed + 1] if index else [])
    assert index in steps[removed + 1] and steps[-1] == f'echo "{index}" > .venv/torch-index.txt'

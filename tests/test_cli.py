"""Every stage's command: a missing path gets one line on stderr, a non-zero exit, no traceback."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

CASES = {
    "preprocess": ["input=/no/such/dir", "output=/tmp/dynamictrl-test-out"],
    "train": ["data.train_shards=/no/such/shards/*.tar", "output=/tmp/dynamictrl-test-train", "model.path=/no/such/model"],
    "animate": ["image=/no/such/image.png", "pose=/no/such/pose.mp4", "prompt=x", "output=/tmp/x.mp4"],
    "eval": ["generated=/no/such/gen", "reference=/no/such/ref", "output=/tmp/dynamictrl-test-eval"],
}


@pytest.mark.parametrize("stage", sorted(CASES))
def test_missing_path_is_a_one_line_error(stage):
    proc = subprocess.run([sys.executable, str(ROOT / "pipelines" / stage / "main.py"), *CASES[stage]],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith(f"{stage}: error:") and "/no/such" in errors[0]


def test_unreadable_video_is_a_one_line_error(tmp_path):
    (tmp_path / "pose.mp4").write_bytes(b"\x00" * 100)
    from PIL import Image
    from skimage.data import astronaut

    Image.fromarray(astronaut()).save(tmp_path / "ref.png")
    proc = subprocess.run([sys.executable, str(ROOT / "pipelines" / "animate" / "main.py"), f"image={tmp_path}/ref.png",
                           f"pose={tmp_path}/pose.mp4", "prompt=x", f"output={tmp_path}/o.mp4"],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)  # fmt: skip
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "pose.mp4: unreadable video" in proc.stderr

"""Metrics against independent computations of DisCo's definitions, and eval's input checks."""

import numpy as np
import pytest
from skimage.metrics import structural_similarity

from dynamictrl.errors import UserError
from dynamictrl.eval.metrics import frame_metrics
from dynamictrl.eval.run import score
from dynamictrl.utils.video import write_video


def pair(seed=0):
    rng = np.random.default_rng(seed)
    real = rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)
    noise = rng.normal(0, 25, real.shape)
    gen = np.clip(real.astype(float) + noise, 0, 255).astype(np.uint8)
    return gen, real


def reference(gen, real):
    g, r = gen.astype(np.int64), real.astype(np.int64)
    h, w = real.shape[:2]
    l1 = np.abs(g - r).sum() / g.size / (h * w)
    mse = ((g - r) ** 2).sum() / g.size
    psnr_star = 10 * np.log10(255**2 / mse)
    wrapped = (((g - r) % 256) ** 2 % 256).mean()  # uint8 subtraction and square both wrap
    psnr = 20 * np.log10(255 / np.sqrt(wrapped))
    gray = lambda x: ((x[..., 0] * 299 + x[..., 1] * 587 + x[..., 2] * 114 + 500) // 1000).astype(np.uint8)  # noqa: E731
    ssim = structural_similarity(gray(g), gray(r), win_size=7, data_range=255)
    return {"l1": l1, "psnr_star": psnr_star, "psnr": psnr, "ssim": ssim}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_frame_metrics_match_independent_computation(seed):
    gen, real = pair(seed)
    ours, ref = frame_metrics(gen, real), reference(gen, real)
    for k in ref:
        assert ours[k] == pytest.approx(ref[k], rel=1e-3), k


def perturbed_real_frames():
    """A real photo (scikit-image's astronaut) and copies of it that a generator might produce."""
    import cv2
    from skimage.data import astronaut

    real = cv2.resize(astronaut(), (160, 192), interpolation=cv2.INTER_AREA)
    rng = np.random.default_rng(0)
    noisy = np.clip(real + rng.normal(0, 12, real.shape), 0, 255).astype(np.uint8)
    blurred = cv2.GaussianBlur(real, (7, 7), 2.0)
    shifted = np.roll(real, (3, -2), axis=(0, 1))
    _, jpg = cv2.imencode(".jpg", real, [cv2.IMWRITE_JPEG_QUALITY, 20])
    return real, {"noise": noisy, "blur": blurred, "shift": shifted, "jpeg": cv2.imdecode(jpg, cv2.IMREAD_UNCHANGED)}


@pytest.mark.parametrize("kind", ["noise", "blur", "shift", "jpeg"])
def test_frame_metrics_on_real_frames_match_independent_computation(kind):
    real, copies = perturbed_real_frames()
    ours, ref = frame_metrics(copies[kind], real), reference(copies[kind], real)
    for k in ref:
        assert ours[k] == pytest.approx(ref[k], rel=1e-3), k


def test_overflow_psnr_never_falls_below_24_db_but_psnr_star_does():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    b = 255 - a
    m = frame_metrics(a, b)
    assert m["psnr"] > 24.0 and m["psnr_star"] < 10.0


def test_score_over_folders_and_input_errors(tmp_path):
    real = np.random.default_rng(0).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    for d in ("gen", "ref"):
        write_video(tmp_path / d / "clip.mp4", real, 8)
    result = score(tmp_path / "gen", tmp_path / "ref", progress=False)
    assert result["videos"] == 1 and result["frames"] == 5 and result["psnr_star"] > 60
    write_video(tmp_path / "gen" / "other.mp4", real, 8)
    with pytest.raises(UserError, match="names differ"):
        score(tmp_path / "gen", tmp_path / "ref", progress=False)
    (tmp_path / "gen" / "other.mp4").unlink()
    write_video(tmp_path / "gen" / "clip.mp4", real[:3], 8)
    with pytest.raises(UserError, match="3 generated frames but 5 reference frames"):
        score(tmp_path / "gen", tmp_path / "ref", progress=False)
    with pytest.raises(UserError, match="no such folder"):
        score(tmp_path / "missing", tmp_path / "ref", progress=False)

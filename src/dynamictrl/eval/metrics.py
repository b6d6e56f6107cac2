"""Frame metrics under the DisCo protocol (DESIGN.md §5), the one behind published Table 2 numbers
(`disco` and `disco-gif` share them; they differ only in FID-VID/FVD input, see `distribution`).

- frames are paired by index; a generated frame is resized (PIL bicubic) to its real frame's size;
- L1: mean |a - b| over pixels and channels on 0-255, divided by H*W (hence "E-04" figures);
- PSNR: DisCo's uint8 version, whose difference and square wrap around modulo 256 (never below
  ~24 dB); reported for comparison only;
- PSNR*: the correct float PSNR with MAX 255, per frame, then averaged;
- SSIM: scikit-image on grayscale uint8 (PIL "L"), 7x7 uniform window, data range 255.

Figure-region scores (ours, no published counterpart; `figure_metrics`): the same PSNR* and SSIM
restricted to the figure, i.e. to the union over the clip of the ground truth's person masks, so that
a static background cannot carry the score. figure PSNR: MSE over the masked pixels (all channels)
only; figure SSIM: the grayscale SSIM map above (computed on the whole frame, so windows at the
mask's edge see some background) averaged over the masked pixels. Both per frame, then averaged.
"""

from __future__ import annotations

import numpy as np
from PIL import Image
from skimage.metrics import structural_similarity

from dynamictrl.eval.distribution import describe

DISCO = {
    "name": "disco",
    "pairing": "frame index; for L1/SSIM/PSNR/LPIPS generated resized to the real frame size with PIL bicubic; "
               "FID/FID-VID/FVD take generated frames at their own size",
    "l1": "mean |a-b| on 0-255 over pixels and channels, divided by H*W",
    "psnr": "DisCo uint8 PSNR: (a-b)**2 computed in uint8 (wraps modulo 256), 20*log10(255/sqrt(mse))",
    "psnr_star": "float PSNR, MAX 255, per frame, averaged",
    "ssim": "skimage structural_similarity, grayscale uint8 (PIL 'L'), win_size 7, data_range 255",
    "lpips": "lpips VGG, [0,1] inputs without normalize=True (DisCo's quirk)",
    "comparable_with": "DisCo's frame-folder scripts as they are today (its maintainer's re-run of DisCo: FID-VID "
                       "19.28, FVD 385.93); the published rows for every metric but FID-VID and FVD",
}
CLEAN = {
    "name": "clean",
    "pairing": "frame index; generated resized to the real frame size with PIL bicubic (for every metric)",
    "l1": "mean |a-b| on [0,1] over pixels and channels",
    "psnr": "float PSNR, MAX 255, per frame, averaged (same as psnr_star)",
    "psnr_star": "float PSNR, MAX 255, per frame, averaged",
    "ssim": "skimage structural_similarity on RGB, Gaussian window sigma 1.5, population covariance (Wang et al.)",
    "lpips": "lpips VGG, inputs mapped to [-1,1] (normalize=True)",
    "comparable_with": "no published row: runs under this protocol only",
}
DISCO_GIF = DISCO | describe("disco-gif") | {
    "name": "disco-gif",
    "comparable_with": "every published row (DisCo's paper: FID-VID 18.86, FVD 393.34 for DisCo; the tables that "
                       "took its June-2023 GIF scripts or numbers, the DynamiCtrl paper's Table 2 included)",
}
DISCO |= describe("disco")
CLEAN |= describe("clean")
PROTOCOLS = {"disco": DISCO, "disco-gif": DISCO_GIF, "clean": CLEAN}
PROTOCOL = DISCO


def _match(gen: np.ndarray, real: np.ndarray) -> np.ndarray:
    if gen.shape == real.shape:
        return gen
    return np.asarray(Image.fromarray(gen).resize((real.shape[1], real.shape[0]), Image.BICUBIC))


def frame_metrics(gen: np.ndarray, real: np.ndarray, protocol: str = "disco") -> dict[str, float]:
    """Metrics of one (H, W, 3) uint8 generated frame against its real frame."""
    gen = _match(gen, real)
    if protocol == "clean":
        return _clean_metrics(gen, real)
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol={protocol!r}: choose one of {sorted(PROTOCOLS)}")
    h, w = real.shape[:2]
    a, b = gen.astype(np.float64), real.astype(np.float64)
    l1 = float(np.abs(a - b).mean() / (h * w))
    mse = float(((a - b) ** 2).mean())
    psnr_star = float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)
    wrapped = float(((gen - real) ** 2).mean())  # uint8 arithmetic on purpose: DisCo's overflow
    psnr = 100.0 if wrapped == 0 else 20 * np.log10(255.0 / np.sqrt(wrapped))
    gray_g = np.asarray(Image.fromarray(gen).convert("L"))
    gray_r = np.asarray(Image.fromarray(real).convert("L"))
    ssim = float(structural_similarity(gray_g, gray_r, win_size=7, data_range=255))
    return {"l1": l1, "ssim": ssim, "psnr": float(psnr), "psnr_star": float(psnr_star)}


def _clean_metrics(gen: np.ndarray, real: np.ndarray) -> dict[str, float]:
    a, b = gen.astype(np.float64), real.astype(np.float64)
    mse = float(((a - b) ** 2).mean())
    psnr = float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))
    ssim = structural_similarity(gen, real, channel_axis=2, gaussian_weights=True, sigma=1.5,
                                 use_sample_covariance=False, data_range=255)  # fmt: skip
    return {"l1": float(np.abs(a - b).mean() / 255.0), "ssim": float(ssim), "psnr": psnr, "psnr_star": psnr}


FIGURE = {
    "figure_psnr": "float PSNR, MAX 255, over the pixels of the union over the clip of the ground truth's person "
                   "masks only, per frame, averaged",
    "figure_ssim": "the SSIM map (grayscale uint8, win_size 7, data_range 255, on the whole frame) averaged over the "
                   "pixels of the union over the clip of the ground truth's person masks, per frame, averaged",
}


def figure_region(mask: np.ndarray) -> np.ndarray:
    """(T, H, W) person masks -> the (H, W) figure region: every pixel the person covers in some frame."""
    if mask.ndim != 3:
        raise ValueError(f"person masks must be (T, H, W); got {mask.shape}")
    return mask.astype(bool).any(0)


def figure_metrics(gen: np.ndarray, real: np.ndarray, region: np.ndarray) -> dict[str, list[float]]:
    """Per-frame figure PSNR and SSIM of (T, H, W, 3) uint8 videos inside the (H, W) bool `region`
    (`figure_region`); NaN for every frame when the region is empty (no person in the clip)."""
    if region.shape != real.shape[1:3]:
        raise ValueError(f"figure region {region.shape} does not match the frames {real.shape[1:3]}")
    if not region.any():
        return {"figure_psnr": [float("nan")] * len(real), "figure_ssim": [float("nan")] * len(real)}
    psnr, ssim = [], []
    for g, r in zip(gen, real, strict=True):
        g = _match(g, r)
        mse = float(((g.astype(np.float64) - r.astype(np.float64))[region] ** 2).mean())
        psnr.append(float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse)))
        gray_g, gray_r = (np.asarray(Image.fromarray(x).convert("L")) for x in (g, r))
        _, smap = structural_similarity(gray_g, gray_r, win_size=7, data_range=255, full=True)
        ssim.append(float(smap[region].mean()))
    return {"figure_psnr": psnr, "figure_ssim": ssim}


def video_metrics(gen: np.ndarray, real: np.ndarray, protocol: str = "disco") -> dict[str, list[float]]:
    """Per-frame metric lists for two (T, H, W, 3) uint8 videos of equal length."""
    per = [frame_metrics(g, r, protocol) for g, r in zip(gen, real, strict=True)]
    return {k: [p[k] for p in per] for k in per[0]}

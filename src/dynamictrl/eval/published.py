"""Table 2 of the DynamiCtrl paper: TikTok / Unseen100 figures of nine methods, as printed.

Published animation tables use DisCo's metric scripts (DESIGN.md §5): L1 divided by H*W (E-04),
the uint8 PSNR beside PSNR*, and their FID-VID/FVD backbones. None marks a "-" in the paper.
Champ's Unseen100 SSIM is printed as 52.39, presumably 0.5239; it is kept as printed.

Every row's FID-VID/FVD comes from DisCo's June-2023 GIF pipeline (its paper's numbers, and the tables
that copied them or ran its scripts of that time): protocol `disco-gif`. Its frame metrics are the
same under `disco`.
"""

METRICS = ("l1", "ssim", "psnr", "psnr_star", "lpips", "fid_vid", "fvd")
PROTOCOL = "disco-gif"
PROTOCOL_NOTE = ("DisCo's June-2023 GIF pipeline; its L1/SSIM/PSNR/PSNR*/LPIPS are also `disco`'s, its FID-VID/FVD "
                 "only `disco-gif`'s: DisCo's maintainer gets FID-VID 19.28 / FVD 385.93 with today's frame-folder "
                 "scripts (`disco`) against the paper's 18.86 / 393.34")

# method: {dataset: (L1 E-04, SSIM, PSNR, PSNR*, LPIPS, FID-VID, FVD)}
TABLE2 = {
    "MagicAnimate": {"tiktok": (3.13, 0.714, 29.16, None, 0.239, 21.75, 179.07),
                     "unseen100": (8.21, 0.351, 21.13, 11.44, 0.513, 85.61, 1058.37)},
    "Animate Anyone": {"tiktok": (None, 0.718, 29.56, None, 0.285, None, 171.90),
                       "unseen100": (3.46, 0.572, 26.60, 16.65, 0.283, 39.26, 723.93)},
    "Champ": {"tiktok": (2.94, 0.802, 29.91, None, 0.231, 21.07, 160.82),
              "unseen100": (4.23, 52.39, 25.91, 15.78, 0.319, 25.48, 535.96)},
    "UniAnimate": {"tiktok": (2.66, 0.811, 30.77, 20.58, 0.231, None, 148.06),
                   "unseen100": (4.46, 0.503, 24.34, 14.61, 0.344, 33.39, 837.93)},
    "MimicMotion": {"tiktok": (5.85, 0.601, None, 14.44, 0.414, None, 232.95),
                    "unseen100": (3.60, 0.618, 27.39, 17.09, 0.248, 23.04, 417.56)},
    "ControlNext": {"tiktok": (6.20, 0.615, None, 13.83, 0.416, None, 326.57),
                    "unseen100": (3.53, 0.577, 27.89, 17.20, 0.263, 21.16, 414.22)},
    "StableAnimator": {"tiktok": (2.87, 0.801, 30.81, 20.66, 0.232, None, 140.62),
                       "unseen100": (7.86, 0.448, 23.11, 12.00, 0.423, 22.87, 365.46)},
    "Animate-X": {"tiktok": (2.70, 0.806, 30.78, 20.77, 0.232, None, 139.01),
                  "unseen100": (3.38, 0.619, 27.42, 17.80, 0.259, 26.95, 570.98)},
    "DynamiCtrl (paper)": {"tiktok": (2.34, 0.766, 30.22, 20.41, 0.166, 13.77, 152.31),
                           "unseen100": (3.09, 0.623, 29.43, 18.37, 0.235, 17.15, 249.80)},
}  # fmt: skip


def rows(dataset: str) -> list[tuple[str, dict]]:
    """(method, {metric: value or None}) for `tiktok` or `unseen100`; L1 in E-04 units."""
    return [(m, dict(zip(METRICS, d[dataset], strict=True))) for m, d in TABLE2.items()]

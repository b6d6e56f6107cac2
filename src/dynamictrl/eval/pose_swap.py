"""The pose-swap gain: how much of a model's score comes from following the pose.

Each clip is generated twice from the same reference frame, prompt and seed: once driven by its own
poses, once by another clip's (a fixed derangement: clip i takes clip (i+1) mod n's poses, trimmed or
padded with the last pose to its own length). Scored against the clip's own ground truth, the gain is
score(own) - score(swapped) per clip; the report gives its mean over clips and a 95% percentile
bootstrap interval of that mean. A model that ignores the pose generates the same video both times:
its gain is exactly 0, whatever its scores. Pure computation here; the demo, the ablation and
`make eval` (dataset mode, `pose_swap=true`) generate and score.
"""

from __future__ import annotations

from typing import Any

import numpy as np

KEYS = ("psnr_star", "figure_psnr", "ssim")  # the gains reported (figure_psnr when masks were scored)
RESAMPLES = 10_000
SEED = 0


def donors(n: int) -> list[int]:
    """The derangement: clip i is driven by clip donors(n)[i]'s poses, never its own."""
    if n < 2:
        raise ValueError(f"a pose swap needs at least 2 clips; got {n}")
    return [(i + 1) % n for i in range(n)]


def fit_length(frames: np.ndarray, n: int) -> np.ndarray:
    """The first `n` frames of `frames`, the last one repeated when there are fewer (as animate holds
    the last driving pose)."""
    if len(frames) >= n:
        return frames[:n]
    return np.concatenate([frames, np.repeat(frames[-1:], n - len(frames), 0)])


def swapped(items: list[Any]) -> list[Any]:
    """`items` reordered by the derangement: entry i is the donor's (its poses drive clip i)."""
    return [items[j] for j in donors(len(items))]


def bootstrap_ci(values: np.ndarray | list[float], resamples: int = RESAMPLES, seed: int = SEED,
                 level: float = 0.95) -> tuple[float, float]:  # fmt: skip
    """Percentile bootstrap interval of the mean of `values` (clips resampled with replacement)."""
    v = np.asarray(values, dtype=float)
    if v.ndim != 1 or not len(v):
        raise ValueError(f"bootstrap needs a non-empty 1-D array; got shape {v.shape}")
    means = v[np.random.default_rng(seed).integers(0, len(v), (resamples, len(v)))].mean(1)
    lo, hi = np.percentile(means, [50 * (1 - level), 50 * (1 + level)])
    return float(lo), float(hi)


def gains(own: dict[str, dict], swap: dict[str, dict], keys: tuple[str, ...] = KEYS) -> dict[str, Any]:
    """Per-clip scores with own and with swapped poses (`eval.run.score`'s `per_video`, same names) ->
    {key: {"gain": mean over clips, "ci95": [lo, hi], "per_clip": {name: gain}}} for each key both
    scored. Clips whose score is not finite (NaN: no person; inf: an exact copy) are left out of a key."""
    if set(own) != set(swap):
        raise ValueError(f"own and swapped scores name different clips: {sorted(set(own) ^ set(swap))[:5]}")
    out: dict[str, Any] = {}
    for k in keys:
        if not all(k in own[n] and k in swap[n] for n in own):
            continue
        per_clip = {n: own[n][k] - swap[n][k] for n in sorted(own)}
        finite = np.array([g for g in per_clip.values() if np.isfinite(g)])
        if not len(finite):
            out[k] = {"gain": None, "ci95": None, "per_clip": {}, "clips": 0}
            continue
        lo, hi = bootstrap_ci(finite)
        out[k] = {"gain": float(finite.mean()), "ci95": [lo, hi], "clips": len(finite),
                  "per_clip": {n: float(g) for n, g in per_clip.items() if np.isfinite(g)}}  # fmt: skip
    return out


def describe(result: dict[str, Any]) -> str:
    """One line: `psnr_star +0.86 dB [0.61, 1.10]; ...` (None: not computed)."""
    units = {"psnr_star": " dB", "figure_psnr": " dB", "ssim": ""}
    parts = []
    for k, r in result.items():
        if r["gain"] is None:
            parts.append(f"{k} n/a")
        else:
            parts.append(f"{k} {r['gain']:+.3f}{units.get(k, '')} [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}]")
    return "; ".join(parts)

"""make eval ARGS="generated=DIR reference=DIR output=DIR": score videos against references.

Both folders hold videos (or frame folders) with matching names; every figure in the outputs
(metrics.json, metrics.csv, report.md) names the protocol that produced it.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig
from tqdm.auto import tqdm

from dynamictrl.errors import UserError
from dynamictrl.eval.metrics import PROTOCOL, video_metrics
from dynamictrl.utils.video import IMAGE_SUFFIXES, VIDEO_SUFFIXES, read_any

METRICS = ("l1", "ssim", "psnr", "psnr_star")


def entries(folder: Path) -> dict[str, Path]:
    """name -> path for each video file or frame folder in `folder`."""
    if not folder.is_dir():
        raise UserError(f"{folder}: no such folder")
    found = {}
    for p in sorted(folder.iterdir()):
        if p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES:
            found[p.stem] = p
        elif p.is_dir() and any(q.suffix.lower() in IMAGE_SUFFIXES for q in (p / "images" if (p / "images").is_dir() else p).iterdir()):
            found[p.name] = p
    if not found:
        raise UserError(f"{folder}: no videos or frame folders")
    return found


def pair(generated: Path, reference: Path) -> list[tuple[str, Path, Path]]:
    gen, ref = entries(generated), entries(reference)
    only_gen, only_ref = sorted(set(gen) - set(ref)), sorted(set(ref) - set(gen))
    if only_gen or only_ref:
        raise UserError(
            f"names differ between generated and reference: only in generated {only_gen[:5]}, "
            f"only in reference {only_ref[:5]}"
        )
    return [(name, gen[name], ref[name]) for name in sorted(gen)]


def score(generated: str | Path, reference: str | Path, progress: bool = True) -> dict[str, Any]:
    """Per-video and overall (mean over all frames) metrics."""
    per_video, all_frames = {}, {k: [] for k in METRICS}
    for name, g, r in tqdm(pair(Path(generated), Path(reference)), desc="eval", disable=not progress):
        gen, _ = read_any(g)
        ref, _ = read_any(r)
        if len(gen) != len(ref):
            raise UserError(f"{name}: {len(gen)} generated frames but {len(ref)} reference frames")
        m = video_metrics(gen, ref)
        per_video[name] = {k: float(np.mean(v)) for k, v in m.items()} | {"frames": len(gen)}
        for k in METRICS:
            all_frames[k] += m[k]
    overall = {k: float(np.mean(v)) for k, v in all_frames.items()}
    return {**overall, "protocol": PROTOCOL, "videos": len(per_video),
            "frames": len(all_frames["l1"]), "per_video": per_video}  # fmt: skip


def write_report(result: dict[str, Any], out: Path, title: str = "Evaluation") -> None:
    """metrics.json, metrics.csv and report.md in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(result, indent=1))
    with open(out / "metrics.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["video", *METRICS, "frames"])
        for name, m in result["per_video"].items():
            w.writerow([name, *(f"{m[k]:.6g}" for k in METRICS), m["frames"]])
    lines = [f"# {title}", "", f"{result['videos']} videos, {result['frames']} frames. Protocol: "
             f"`{result['protocol']['name']}` (DisCo's definitions, comparable with the paper's Table 2).", "",
             "| metric | value | definition |", "|---|---|---|"]  # fmt: skip
    for k in METRICS:
        lines.append(f"| {k} | {result[k]:.4g} | {result['protocol'][k]} |")
    lines += ["", "Pairing: " + result["protocol"]["pairing"] + ".", "", "## Per video", "",
              "| video | " + " | ".join(METRICS) + " |", "|---" * (len(METRICS) + 1) + "|"]  # fmt: skip
    for name, m in result["per_video"].items():
        lines.append(f"| {name} | " + " | ".join(f"{m[k]:.4g}" for k in METRICS) + " |")
    (out / "report.md").write_text("\n".join(lines) + "\n")


def run(cfg: DictConfig) -> dict[str, Any]:
    for key in ("generated", "reference", "output"):
        if not cfg.get(key):
            raise UserError(f'{key} is not set: make eval ARGS="generated=DIR reference=DIR output=DIR"')
    result = score(cfg.generated, cfg.reference, cfg.get("progress", True))
    write_report(result, Path(cfg.output))
    print(f"eval: L1 {result['l1']:.3e}  SSIM {result['ssim']:.3f}  PSNR {result['psnr']:.2f}  "
          f"PSNR* {result['psnr_star']:.2f} (protocol {result['protocol']['name']}) -> {cfg.output}/report.md")
    return result

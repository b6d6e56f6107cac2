"""A picture of what preprocessing made: for each of a few samples, frames with the rendered pose
blended over them and the person mask's outline, so a person sees at a glance that the skeleton sits
on the body and the mask on the person.

    python -m dynamictrl.preprocess.qc OUTPUT_DIR [--out sheet.png] [--samples 4] [--frames 4]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import cv2
import numpy as np
import webdataset as wds
from PIL import Image, ImageDraw

from dynamictrl.data.shards import decode_sample, list_shards
from dynamictrl.errors import UserError, user_errors
from dynamictrl.pose.render import overlay


def panel(sample: dict, frames: int = 4, height: int = 256) -> np.ndarray:
    """One row: `frames` evenly spaced frames of a decoded sample, pose blended in, mask outlined in
    white, each scaled to `height` pixels, with the key and QC figures written above."""
    t = len(sample["frames"])
    tiles = []
    for i in np.linspace(0, t - 1, frames).round().astype(int):
        tile = overlay(sample["frames"][i], sample["pose"][i], alpha=0.8)
        contours, _ = cv2.findContours(sample["mask"][i].astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(tile, contours, -1, (255, 255, 255), max(1, tile.shape[0] // 150))
        scale = height / tile.shape[0]
        tiles.append(cv2.resize(tile, (round(tile.shape[1] * scale), height), interpolation=cv2.INTER_AREA))
    row = np.concatenate(tiles, axis=1)
    qc = sample["meta"].get("qc", {})
    label = (f"{sample['key']}  pose found {qc.get('pose_detected_ratio', 0):.0%}  "
             f"mask area {qc.get('mean_mask_area', 0):.0%}  people {qc.get('person_count', '?')}")  # fmt: skip
    head = Image.new("RGB", (row.shape[1], 22), "black")
    ImageDraw.Draw(head).text((6, 5), label, fill="white")
    return np.concatenate([np.asarray(head), row], axis=0)


def sheet(shards: str | Path, out: str | Path, samples: int = 4, frames: int = 4, height: int = 256) -> Path:
    """Panels of the first `samples` samples (one per video) of the shards under `shards`, stacked."""
    urls = list_shards(shards)
    if not urls:
        raise UserError(f"{shards}: no shards found")
    rows, seen = [], set()
    for raw in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        s = decode_sample(raw)
        if s["meta"].get("video_id") in seen:
            continue
        seen.add(s["meta"].get("video_id"))
        rows.append(panel(s, frames, height))
        if len(rows) >= samples:
            break
    width = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, 4), (0, width - r.shape[1]), (0, 0))) for r in rows]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.concatenate(rows, axis=0)).save(out)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("shards", help="a preprocessing output folder, a shard or a glob")
    ap.add_argument("--out", default=None, help="PNG to write (default: SHARDS/qc.png)")
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--frames", type=int, default=4)
    args = ap.parse_args(argv)
    with user_errors("qc"):
        out = sheet(args.shards, args.out or Path(args.shards) / "qc.png", args.samples, args.frames)
        print(f"qc: {out}")


if __name__ == "__main__":
    main()

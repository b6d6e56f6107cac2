"""make precompute ARGS="input=SHARDS output=DIR": the frozen encoders' outputs, once, into shards.

Each input shard becomes a shard of the same name in OUTPUT, one sample per clip, same key:

    latents.npy       (F, C, h, w) VAE latent of the clip's first `num_frames` frames (posterior mode,
                      times the scaling factor), float32 unless `dtype=float16`
    pose_latents.npy  the same for the rendered pose video
    text.npy          (L, D) T5 embedding of the caption (padded to the transformer's text length)
    ref.npy           (H, W, 3) uint8 clean reference frame (the clip's frame 0)
    ref_mask.npy      (H, W) bool person mask of frame 0 (for mask_reference)
    txt, json         the caption; the source json plus `precompute` (model, num_frames, dtype)

and OUTPUT/empty_text.npy holds T5("") (L, D): the embedding of a dropped caption, so that training on
these shards never loads T5. `device=auto` is this rank's GPU (cuda:LOCAL_RANK) when there is one.

The reference is kept in pixels: training noises it in pixel space every step (sigma =
exp(N(-3, 0.5))) and encodes that one frame, so the loss is the raw path's (see docs/NOTES.md).
All arrays are .npy loaded with allow_pickle=False. Shards are written under a temporary name and
renamed; a finished shard is not redone; `rank`/`world_size` split the shards (or SLURM_PROCID /
SLURM_NTASKS, RANK / WORLD_SIZE from the environment). A sample that does not decode goes to
OUTPUT/rejects-RANK.jsonl with its reason.
"""

from __future__ import annotations

import io
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds
from omegaconf import DictConfig
from tqdm.auto import tqdm

from dynamictrl.data.shards import decode_sample, list_shards
from dynamictrl.errors import UserError
from dynamictrl.models import latents as Z
from dynamictrl.train.build import EMPTY_TEXT, save_npy
from dynamictrl.utils.device import launcher_world, local_device


def _npy(x: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(x), allow_pickle=False)
    return buf.getvalue()


def rank_and_world(cfg: DictConfig) -> tuple[int, int]:
    if cfg.get("world_size"):
        return int(cfg.rank), int(cfg.world_size)
    return launcher_world()


def load_encoders(path: str, device: str):
    """The frozen VAE and T5 of a pipeline folder (no transformer loaded), the text length, and the
    latent codec (the transformer's temporal patch decides the frame policy)."""
    from dynamictrl.models.pipeline import DynamiCtrlPipeline

    pipe = DynamiCtrlPipeline.from_pretrained(path, transformer=None)
    pipe.vae.to(device).eval()
    pipe.text_encoder.to(device).eval()
    tc = json.loads((Path(path) / "transformer" / "config.json").read_text())
    return pipe, int(tc["max_text_seq_length"]), Z.LatentCodec(pipe.vae, tc.get("patch_size_t"))


@torch.no_grad()
def precompute_sample(pipe: Any, text_len: int, s: dict[str, Any], num_frames: int, device: str,
                      dtype: np.dtype, codec: Z.LatentCodec | None = None) -> dict[str, Any]:  # fmt: skip
    """One decoded raw sample -> precomputed members (the same encoding calls as training's)."""
    if len(s["frames"]) < num_frames:
        raise ValueError(f"{len(s['frames'])} frames, need {num_frames}")
    codec = codec or Z.LatentCodec(pipe.vae)
    frames, pose = s["frames"][:num_frames], s["pose"][:num_frames]
    video = Z.frames_to_tensor(frames, device)[None]  # (1, 3, T, H, W)
    pose_px = Z.frames_to_tensor(pose, device)[None]
    target, pose_lat = codec.encode_video(video)[0], codec.encode_video(pose_px)[0]  # (F, C, h, w)
    text, _ = pipe.encode_prompt([s["caption"]], do_classifier_free_guidance=False, device=device,
                                 max_sequence_length=text_len)  # fmt: skip
    meta = dict(s["meta"])
    meta["precompute"] = {"num_frames": num_frames, "dtype": np.dtype(dtype).name, "latent_shape": list(target.shape),
                          "vae_scaling_factor": float(pipe.vae.config.scaling_factor)}  # fmt: skip
    return {
        "__key__": s["key"],
        "latents.npy": _npy(target.float().cpu().numpy().astype(dtype)),
        "pose_latents.npy": _npy(pose_lat.float().cpu().numpy().astype(dtype)),
        "text.npy": _npy(text[0].float().cpu().numpy().astype(dtype)),
        "ref.npy": _npy(frames[0]),
        "ref_mask.npy": _npy(s["mask"][0].astype(bool)),
        "txt": s["caption"].encode("utf-8"),
        "json": json.dumps(meta, sort_keys=True).encode("utf-8"),
    }


def run(cfg: DictConfig) -> dict[str, Any]:
    from dynamictrl.train.run import model_path

    urls = list_shards(cfg.input)
    if not urls:
        raise UserError(f"input={cfg.input}: no shards found")
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    rank, world = rank_and_world(cfg)
    device = local_device(cfg.device)
    dtype = np.dtype(cfg.dtype)
    if dtype not in (np.float32, np.float16):
        raise UserError(f"dtype={cfg.dtype}: use float32 (exact) or float16 (half the disk)")
    pipe, text_len, codec = load_encoders(model_path(cfg), device)
    try:
        codec.check_frames(int(cfg.num_frames))
    except ValueError as err:
        raise UserError(str(err)) from None
    if not (out / EMPTY_TEXT).is_file():  # a dropped caption's embedding: training then needs no T5
        with torch.no_grad():
            empty, _ = pipe.encode_prompt([""], do_classifier_free_guidance=False, device=device,
                                          max_sequence_length=text_len)  # fmt: skip
        save_npy(out / EMPTY_TEXT, empty[0].float().cpu().numpy().astype(dtype))
    mine = urls[rank::world]
    done = rejected = written = 0
    start = time.perf_counter()
    rejects = out / f"rejects-{rank}.jsonl"
    for url in tqdm(mine, desc="precompute shards", disable=not cfg.progress):
        dst = out / Path(url).name
        if dst.exists():
            done += 1
            continue
        tmp = out / f".{dst.name}.tmp"
        writer = wds.TarWriter(str(tmp))
        errors: list[str] = []

        def bad_shard(exn: Exception, errors: list[str] = errors) -> bool:
            errors.append(f"{type(exn).__name__}: {exn}")
            return True

        stream = wds.DataPipeline(wds.SimpleShardList([url]), wds.tarfile_to_samples(handler=bad_shard))
        for raw in stream:
            try:
                writer.write(precompute_sample(pipe, text_len, decode_sample(raw), cfg.num_frames, device, dtype, codec))
                written += 1
            except Exception as e:  # noqa: BLE001 - a bad sample is a reject, not the end of the run
                rejected += 1
                errors.append(f"{raw.get('__key__')}: {type(e).__name__}: {e}")
        writer.close()
        os.replace(tmp, dst)
        if errors:
            with open(rejects, "a") as f:
                f.writelines(json.dumps({"shard": url, "reason": r}) + "\n" for r in errors)
    seconds = time.perf_counter() - start
    print(f"precompute: {written} clips in {len(mine) - done} shards ({done} already done, {rejected} rejected), "
          f"{written / max(seconds, 1e-9):.2f} clips/s -> {out}")  # fmt: skip
    return {"output": str(out), "clips": written, "rejected": rejected, "shards": len(mine), "seconds": seconds}

"""Exporting weights of any size: each tensor made whole from the strategy's shards one at a time (FSDP2
DTensors, DeepSpeed ZeRO-3 partitions, or already whole), kept on rank 0 only, and streamed to disk in
diffusers' sharded safetensors layout. No rank ever holds the full state: rank 0 holds one shard of the
file plus the incoming tensor, the others nothing (CogVideoX-5B is 23 GB in fp32, 8 ranks a node).

The layout is what `save_pretrained` writes and `from_pretrained` reads: a single
`diffusion_pytorch_model.safetensors`, or `diffusion_pytorch_model-0000K-of-0000N.safetensors` files and
`diffusion_pytorch_model.safetensors.index.json` (`metadata.total_size`, `weight_map`).
"""

from __future__ import annotations

import json
from collections.abc import Collection, Iterable, Iterator
from pathlib import Path

import torch
from torch import nn

WEIGHTS = "diffusion_pytorch_model"  # diffusers' file stem
SHARD_BYTES = 5 * 10**9  # per safetensors file: rank 0's host memory for the export is about this much

Named = Iterator[tuple[str, torch.Tensor | None]]


def gathered(named: Iterable[tuple[str, torch.Tensor]], keep: bool) -> Named:
    """Each (name, tensor) whole on the CPU where `keep` (rank 0), None elsewhere, one at a time.

    A DTensor's `full_tensor()` is a collective: every rank must iterate the same names in the same order.
    """
    from torch.distributed.tensor import DTensor

    for name, t in named:
        # (a CPU-offloaded shard gathers on the mesh's device)
        full = t.to(t.device_mesh.device_type).full_tensor() if isinstance(t, DTensor) else t
        out = full.detach().cpu() if keep else None
        del full  # the other ranks' gathered copy goes now, not at the next gather
        yield name, out


def zero3_gathered(model: nn.Module, keep: bool, names: Collection[str] | None = None) -> Named:
    """`gathered` for DeepSpeed ZeRO-3 partitions: module by module, its own parameters gathered together
    (`GatheredParameters`, a collective), its state entries copied on rank 0, the gather released."""
    import deepspeed

    for prefix, m in model.named_modules():
        own = list(m.named_parameters(recurse=False))
        entries = own + [(n, b) for n, b in m.named_buffers(recurse=False) if n not in m._non_persistent_buffers_set]
        entries = [(f"{prefix}.{n}" if prefix else n, t) for n, t in entries]
        entries = [(k, t) for k, t in entries if names is None or k in names]
        if not entries:
            continue
        with deepspeed.zero.GatheredParameters([p for _, p in own], modifier_rank=None):
            # a copy: an offloaded parameter's CPU storage is released when the gather ends
            full = [(k, t.detach().to("cpu", copy=True) if keep else None) for k, t in entries]
        yield from full


def write_weights(folder: str | Path, tensors: Iterable[tuple[str, torch.Tensor]],
                  shard_bytes: int = SHARD_BYTES) -> list[Path]:  # fmt: skip
    """Stream `tensors` into FOLDER's safetensors (diffusers' names), a file written and dropped whenever
    the next tensor would take it past `shard_bytes` (a tensor larger than that gets a file of its own).
    Earlier weight files in FOLDER are removed first. Returns the files written."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob(f"{WEIGHTS}*.safetensors*"):
        old.unlink()
    parts: list[Path] = []
    shard: dict[str, torch.Tensor] = {}
    where: dict[str, int] = {}
    size = total = 0

    def flush() -> None:
        nonlocal shard, size
        parts.append(folder / f"{WEIGHTS}-{len(parts) + 1:05d}.partial")  # named once the count is known
        save_file(shard, str(parts[-1]), metadata={"format": "pt"})
        shard, size = {}, 0

    for name, t in tensors:
        n = t.numel() * t.element_size()
        if shard and size + n > shard_bytes:
            flush()
        shard[name], where[name] = t.contiguous(), len(parts)
        size, total = size + n, total + n
    if shard or not parts:
        flush()
    if len(parts) == 1:
        return [parts[0].rename(folder / f"{WEIGHTS}.safetensors")]
    names = [f"{WEIGHTS}-{i:05d}-of-{len(parts):05d}.safetensors" for i in range(1, len(parts) + 1)]
    files = [p.rename(folder / n) for p, n in zip(parts, names, strict=True)]
    index = {"metadata": {"total_size": total}, "weight_map": {k: names[i] for k, i in where.items()}}
    (folder / f"{WEIGHTS}.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return files


def read_weights(folder: str | Path) -> dict[str, torch.Tensor]:
    """All weights of an exported folder, single-file or sharded."""
    from safetensors.torch import load_file

    folder = Path(folder)
    index = folder / f"{WEIGHTS}.safetensors.index.json"
    if not index.is_file():
        return load_file(str(folder / f"{WEIGHTS}.safetensors"))
    out: dict[str, torch.Tensor] = {}
    for name in dict.fromkeys(json.loads(index.read_text())["weight_map"].values()):
        out.update(load_file(str(folder / name)))
    return out

"""The GPU of this process: under torchrun or SLURM each rank takes its own (cuda:LOCAL_RANK), so the
ranks of a node do not all pile onto GPU 0."""

from __future__ import annotations

import os


def local_rank() -> int:
    """This process's rank on its node: LOCAL_RANK (torchrun, Lightning), else SLURM_LOCALID, else 0."""
    for var in ("LOCAL_RANK", "SLURM_LOCALID"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 0


def local_device(device: str = "auto") -> str:
    """`auto` (or a bare `cuda`) -> cuda:N for this rank when CUDA is available, else cpu; anything
    else (cpu, cuda:3, mps) as given. N wraps around the visible GPUs (more ranks than GPUs share)."""
    if device not in ("auto", "cuda"):
        return device
    import torch

    if not torch.cuda.is_available():
        return "cpu" if device == "auto" else device
    return f"cuda:{local_rank() % torch.cuda.device_count()}"

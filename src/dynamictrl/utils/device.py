"""Where this process stands in its job, from the launcher's variables: its GPU (under torchrun or SLURM
each rank takes its own, cuda:LOCAL_RANK, so the ranks of a node do not all pile onto GPU 0), its
global rank, and the rank/world split of a data-parallel stage."""

from __future__ import annotations

import os


def local_rank() -> int:
    """This process's rank on its node: LOCAL_RANK (torchrun, Lightning), else SLURM_LOCALID, else 0."""
    rank = _env_int("LOCAL_RANK", "SLURM_LOCALID")
    return 0 if rank is None else rank


def local_device(device: str = "auto") -> str:
    """`auto` (or a bare `cuda`) -> cuda:N for this rank when CUDA is available, else cpu; anything
    else (cpu, cuda:3, mps) as given. N wraps around the visible GPUs (more ranks than GPUs share)."""
    if device not in ("auto", "cuda"):
        return device
    import torch

    if not torch.cuda.is_available():
        return "cpu" if device == "auto" else device
    return f"cuda:{local_rank() % torch.cuda.device_count()}"


def _env_int(*names: str) -> int | None:
    for var in names:
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return None


def global_rank() -> int:
    """This process's rank in the whole job, from the launcher, before any process group exists:
    RANK (torchrun, Lightning, DeepSpeed), else SLURM_PROCID (`srun` sets no RANK), else 0. Every file a
    training run writes once per job (the wandb id, the moved metrics) is written where this is 0."""
    rank = _env_int("RANK", "SLURM_PROCID")
    return 0 if rank is None else rank


def launcher_world() -> tuple[int, int]:
    """(rank, world size) from the launcher: a SLURM array task, else RANK/WORLD_SIZE, else
    SLURM_PROCID/SLURM_NTASKS (srun), else (0, 1). For stages that split their inputs by rank."""
    env = os.environ
    if "SLURM_ARRAY_TASK_ID" in env and "SLURM_ARRAY_TASK_COUNT" in env:
        return int(env["SLURM_ARRAY_TASK_ID"]) - int(env.get("SLURM_ARRAY_TASK_MIN", 0)), int(env["SLURM_ARRAY_TASK_COUNT"])
    for r, w in (("RANK", "WORLD_SIZE"), ("SLURM_PROCID", "SLURM_NTASKS")):
        if env.get(r, "").isdigit() and env.get(w, "").isdigit():
            return int(env[r]), int(env[w])
    return 0, 1

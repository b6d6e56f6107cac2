"""Building the trainable transformer and the frozen encoders where they belong.

The transformer is created on the meta device (no memory), optionally sharded by the strategy (FSDP2
`fully_shard` turns each parameter into a DTensor shard), materialised straight on the training
device, and filled from the checkpoint's safetensors one tensor at a time through memory maps:
each rank reads only its rows of a sharded parameter (`safe_open(...).get_slice`), so no rank ever
holds the full model in fp32 on the CPU. Under DeepSpeed ZeRO-3 the parameters are partitioned as
they are created (Lightning's `deepspeed.zero.Init`) and each module's tensors are written by rank 0
inside `GatheredParameters`. Under LoRA the adapters are added to the meta model before it is sharded
(`models.lora.add_lora`), so they are sharded like the rest; `init_adapters` fills them after loading.

The frozen VAE and T5 load in a configurable dtype and stay on the CPU until the module moves what a
run needs to its device; T5 is not loaded at all when training reads precomputed shards.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dynamictrl.errors import UserError
from dynamictrl.models.transformer import DynamiCtrlTransformer3DModel

EMPTY_TEXT = "empty_text.npy"  # T5("") beside precomputed shards: the embedding of a dropped caption


def transformer_config(model_path: str, **choice: Any) -> dict[str, Any]:
    """The transformer's config from `MODEL/transformer/config.json`, with `control`/`pose_init` overrides."""
    config = DynamiCtrlTransformer3DModel.load_config(model_path, subfolder="transformer")
    return {k: v for k, v in config.items() if not k.startswith("_")} | choice


def empty_transformer(config: dict[str, Any], dtype: torch.dtype = torch.float32) -> DynamiCtrlTransformer3DModel:
    """The transformer with parameters on the meta device in `dtype` (buffers real: checkpoints lack them)."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        model = DynamiCtrlTransformer3DModel.from_config(config)
    return model if dtype == torch.float32 else model.to(dtype)


def _materialise(model: nn.Module, device: torch.device | str) -> None:
    """Allocate the meta parameters on `device` (uninitialised), keeping the real buffers' values."""
    buffers = dict(model.named_buffers())
    model.to_empty(device=device)
    for name, b in buffers.items():
        owner, _, leaf = name.rpartition(".")
        model.get_submodule(owner)._buffers[leaf] = b.to(device)


def _is_dtensor(t: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def _local_rows(param: torch.Tensor) -> tuple[int, int] | None:
    """(start, stop) of the dim-0 rows this rank holds of an FSDP2 Shard(0) DTensor; None if replicated."""
    from torch.distributed.tensor import Shard

    if not _is_dtensor(param):
        return None
    (placement,) = param.placements
    if not isinstance(placement, Shard) or placement.dim != 0:
        raise NotImplementedError(f"only Shard(0) DTensors load shard-wise (got {placement})")
    n, world = param.shape[0], param.device_mesh.size()
    chunk = -(-n // world)  # torch.chunk's split, which FSDP2 uses
    start = min(param.device_mesh.get_local_rank() * chunk, n)
    return start, start + param.to_local().shape[0]


def _checkpoint_files(folder: Path) -> list[Path]:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise UserError(f"{folder}: no .safetensors weights (this loader reads safetensors only)")
    return files


@torch.no_grad()
def load_weights(model: DynamiCtrlTransformer3DModel, folder: str | Path,
                 device: torch.device | str) -> dict[str, list[str]]:  # fmt: skip
    """Materialise a meta (possibly FSDP2-sharded) transformer on `device` and fill it from
    `folder`'s safetensors. The pose branch a base CogVideoX checkpoint lacks is initialised as the
    model's `pose_init` says. A layer peft wrapped (LoRA) takes the checkpoint's `NAME.weight` as
    `NAME.base_layer.weight`; its adapters are left to `init_adapters`. Returns the loading report
    (missing / unexpected keys).
    """
    from safetensors import safe_open

    folder = Path(folder)
    files = _checkpoint_files(folder)
    _materialise(model, device)
    model.init_pose_branch()  # overwritten below where the checkpoint has the pose branch
    targets = dict(model.state_dict(keep_vars=True))
    names = {k.replace(".base_layer.", "."): k for k in targets}  # checkpoint name -> the model's
    seen, unexpected = set(), []
    for file in files:
        with safe_open(str(file), framework="pt", device="cpu") as st:
            for key in st.keys():
                if key not in names:
                    unexpected.append(key)
                    continue
                seen.add(names[key])
                _copy(targets[names[key]], st.get_slice(key), key, model)
    new = tuple(model.new_modules())
    missing = sorted(k for k in targets if k not in seen)
    bad = [k for k in missing if not k.startswith(new) and not _is_adapter(k)]
    if bad:
        raise UserError(f"{folder}: transformer weights lack {len(bad)} tensors the model needs (first: {bad[0]})")
    return {"missing_keys": missing, "unexpected_keys": unexpected}


def _is_adapter(key: str) -> bool:
    return ".lora_A." in key or ".lora_B." in key


@torch.no_grad()
def init_adapters(model: nn.Module, seed: int = 0) -> int:
    """Set every LoRA adapter of a materialised (possibly sharded) transformer as peft initialises it
    (`init_lora_weights=True`: A Kaiming-uniform with a=sqrt(5), B zero, so the adapted model starts as
    the base), drawn from `seed` on the CPU in full and copied row-wise, so the values do not depend on
    the device or the number of shards. Returns the number of adapter tensors set."""
    g = torch.Generator().manual_seed(seed)
    done = 0
    for name, param in model.named_parameters():
        if not _is_adapter(name):
            continue
        full = torch.zeros(param.shape, dtype=torch.float32)
        if ".lora_A." in name:
            torch.nn.init.kaiming_uniform_(full, a=math.sqrt(5), generator=g)
        rows = _local_rows(param)
        local = param.to_local() if rows is not None else param
        local.copy_(full[rows[0] : rows[1]] if rows else full)
        done += 1
    return done


def _copy(param: torch.Tensor, source: Any, key: str, model: DynamiCtrlTransformer3DModel) -> None:
    """Copy checkpoint tensor `source` (a safetensors slice) into `param`: this rank's rows for a shard;
    a UVT patch embedding takes the base checkpoint's narrower weight into its first columns."""
    rows = _local_rows(param)
    local = param.to_local() if rows is not None else param
    shape = tuple(source.get_shape())
    full = tuple(param.shape)
    if shape != full:
        if not (key == "patch_embed.proj.weight" and model.config.control == "uvt" and shape[0] == full[0]):
            raise UserError(f"checkpoint tensor {key} has shape {shape}; the model expects {full}")
        t = source[rows[0] : rows[1]] if rows else source[:]
        local[:, : t.shape[1]].copy_(t)
        return
    t = source[rows[0] : rows[1]] if rows else source[:]
    local.copy_(t)


@torch.no_grad()
def random_weights(model: DynamiCtrlTransformer3DModel, device: torch.device | str, seed: int = 0) -> None:
    """Materialise a meta transformer with random weights (PyTorch's default init; for the GPU check)."""
    _materialise(model, device)
    torch.manual_seed(seed)
    for m in model.modules():
        if hasattr(m, "reset_parameters") and any(True for _ in m.parameters(recurse=False)):
            m.reset_parameters()
    model.init_pose_branch()


@torch.no_grad()
def load_weights_zero3(model: DynamiCtrlTransformer3DModel, folder: str | Path, rank: int) -> dict[str, list[str]]:
    """Fill a transformer whose parameters DeepSpeed ZeRO-3 partitioned at creation: the pose branch is
    initialised with its parameters gathered, then module by module rank 0 writes the checkpoint's
    tensors into the gathered parameters and DeepSpeed re-partitions them on exit. The checkpoint is
    checked first, on every rank, as `load_weights` checks it: a tensor the model needs and the files
    lack (wrong key names) is an error, not a silent random init. Returns the loading report."""
    import deepspeed
    from safetensors import safe_open

    handles = [safe_open(str(f), framework="pt", device="cpu") for f in _checkpoint_files(Path(folder))]
    where = {k: h for h in handles for k in h.keys()}
    params = dict(model.named_parameters())
    new = tuple(model.new_modules())
    missing = sorted(k for k in params if k not in where)
    bad = [k for k in missing if not k.startswith(new)]
    if bad:
        raise UserError(f"{folder}: transformer weights lack {len(bad)} tensors the model needs (first: {bad[0]})")
    init_pose_branch_zero3(model, rank)  # overwritten below where the checkpoint has the pose branch
    for prefix, module in model.named_modules():
        local = dict(module.named_parameters(recurse=False))
        keys = {leaf: f"{prefix}.{leaf}" if prefix else leaf for leaf in local}
        if not any(k in where for k in keys.values()):
            continue
        with deepspeed.zero.GatheredParameters(list(local.values()), modifier_rank=0):
            if rank != 0:
                continue
            for leaf, p in local.items():
                if keys[leaf] in where:
                    _copy(p, where[keys[leaf]].get_slice(keys[leaf]), keys[leaf], model)
    return {"missing_keys": missing, "unexpected_keys": sorted(k for k in where if k not in params)}


@torch.no_grad()
def init_pose_branch_zero3(model: DynamiCtrlTransformer3DModel, rank: int) -> None:
    """`init_pose_branch` on a ZeRO-3 partitioned model: rank 0 initialises the gathered pose branch (and
    the patch embedding, whose pose columns UVT zeroes); DeepSpeed re-partitions it on exit."""
    import deepspeed

    new = tuple(model.new_modules())
    branch = [p for k, p in model.named_parameters() if k.startswith(new)] + list(model.patch_embed.parameters())
    with deepspeed.zero.GatheredParameters(branch, modifier_rank=0):
        if rank == 0:
            model.init_pose_branch()


def outside_zero_init():
    """A context in which modules are built whole, even inside DeepSpeed's `zero.Init` (Lightning runs
    `configure_model` in it under ZeRO-3): the frozen VAE and T5 must not be partitioned, or the VAE's
    encode fails on its empty pieces."""
    import contextlib

    try:
        from deepspeed.runtime.zero.partition_parameters import restore_init_context, shutdown_init_context
    except ImportError:
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def whole():
        shutdown_init_context()
        try:
            yield
        finally:
            restore_init_context()

    return whole()


def frozen_dtype(name: str, precision: str) -> torch.dtype:
    """`module.encoder_dtype`: auto = bfloat16 under bf16 training precisions, else float32."""
    if name == "auto":
        return torch.bfloat16 if "bf16" in str(precision) else torch.float32
    if name not in ("float32", "bfloat16", "float16"):
        raise UserError(f"module.encoder_dtype={name}: use auto, float32, bfloat16 or float16")
    return getattr(torch, name)


def load_frozen(model_path: str, dtype: torch.dtype, text_encoder: bool) -> dict[str, Any]:
    """VAE (and tokenizer + T5 when `text_encoder`), frozen, on the CPU in `dtype`; the scheduler."""
    from diffusers import AutoencoderKLCogVideoX, CogVideoXDPMScheduler

    parts: dict[str, Any] = {"tokenizer": None, "text_encoder": None}
    parts["vae"] = AutoencoderKLCogVideoX.from_pretrained(model_path, subfolder="vae", torch_dtype=dtype)
    parts["scheduler"] = CogVideoXDPMScheduler.from_pretrained(model_path, subfolder="scheduler")
    if text_encoder:
        from transformers import AutoTokenizer, T5EncoderModel

        parts["tokenizer"] = AutoTokenizer.from_pretrained(model_path, subfolder="tokenizer")
        parts["text_encoder"] = T5EncoderModel.from_pretrained(model_path, subfolder="text_encoder", dtype=dtype)
    for m in (parts["vae"], parts["text_encoder"]):
        if m is not None:
            m.requires_grad_(False).eval()
    return parts


def load_frozen_configs(model_path: str, dtype: torch.dtype) -> dict[str, Any]:
    """A VAE with random weights from its config, and the scheduler; no T5 (`module.weights=random`
    trains on precomputed shards: the GPU check, which has no weight files)."""
    from diffusers import AutoencoderKLCogVideoX, CogVideoXDPMScheduler

    vae = AutoencoderKLCogVideoX.from_config(AutoencoderKLCogVideoX.load_config(model_path, subfolder="vae"))
    return {"tokenizer": None, "text_encoder": None, "vae": vae.to(dtype).requires_grad_(False).eval(),
            "scheduler": CogVideoXDPMScheduler.from_pretrained(model_path, subfolder="scheduler")}  # fmt: skip


def empty_text_embedding(shards_dir: str | Path, model_path: str, text_len: int, dtype: torch.dtype) -> torch.Tensor:
    """(L, D) T5("") for precomputed training: `SHARDS/empty_text.npy` (written by precompute), else
    encoded once with T5 on the CPU and cached there (when the folder is writable)."""
    path = Path(shards_dir) / EMPTY_TEXT
    if path.is_file():
        return torch.from_numpy(np.load(path, allow_pickle=False))
    parts = load_frozen(model_path, dtype, text_encoder=True)
    emb = encode_empty(parts["tokenizer"], parts["text_encoder"], text_len)
    try:
        save_npy(path, emb.float().numpy())
    except OSError:
        pass  # a read-only data folder: each run encodes it once
    return emb


@torch.no_grad()
def encode_empty(tokenizer: Any, text_encoder: nn.Module, text_len: int) -> torch.Tensor:
    """(L, D) T5 embedding of the empty prompt, as the pipeline's `encode_prompt` computes it."""
    from dynamictrl.models.pipeline import DynamiCtrlPipeline

    pipe = DynamiCtrlPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=None, transformer=None,
                              scheduler=None)  # fmt: skip
    device = next(text_encoder.parameters()).device
    embeds, _ = pipe.encode_prompt([""], do_classifier_free_guidance=False, device=device, max_sequence_length=text_len)
    return embeds[0].cpu()


def save_npy(path: Path, array: np.ndarray) -> None:
    """Write a .npy atomically (a temporary name, then a rename: ranks may race to write the same file)."""
    tmp = path.with_name(f".{path.name}.{id(array)}.tmp")
    with open(tmp, "wb") as f:
        np.save(f, np.ascontiguousarray(array), allow_pickle=False)
    tmp.replace(path)


def frame_policy(model_path: str) -> Any:
    """The latent codec's frame policy of a pipeline folder from its configs alone (a VAE on the meta
    device: nothing loaded), to check `data.num_frames` before the run builds anything."""
    from diffusers import AutoencoderKLCogVideoX

    from dynamictrl.models.latents import LatentCodec

    with torch.device("meta"):
        vae = AutoencoderKLCogVideoX.from_config(AutoencoderKLCogVideoX.load_config(model_path, subfolder="vae"))
    return LatentCodec(vae, transformer_config(model_path).get("patch_size_t"))


def text_length(model_path: str) -> int:
    return int(json.loads((Path(model_path) / "transformer" / "config.json").read_text())["max_text_seq_length"])

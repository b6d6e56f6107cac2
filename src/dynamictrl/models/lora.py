"""LoRA fine-tuning of DynamiCtrl: peft adapters through diffusers' `add_adapter`, the pose branch in full.

Training (`module.lora.rank=R`): the transformer's weights are frozen, LoRA adapters (peft, through
diffusers' `PeftAdapterMixin.add_adapter`) go on the attention projections and on `norm1.linear`, the
adaLN modulation whose output PadaLN's is added to, and the pose branch is trained in full: a base
CogVideoX checkpoint has no pose weights at all, so they cannot be a low-rank update of anything
(PadaLN's `control_norm1`, cross-attention's `attn2`/`norm_cross`, UVT's widened `patch_embed.proj`).

A saved LoRA is a folder:
- `pytorch_lora_weights.safetensors`: the adapters in diffusers' format (keys
  `transformer.<module>.lora_A.weight` / `lora_B.weight`, the peft config in the file's metadata),
  what `DynamiCtrlPipeline.save_lora_weights` writes and `load_lora_weights` reads;
- `pose_branch.safetensors`: the full pose-branch weights under the transformer's own names
  (`transformer_blocks.N.control_norm1.linear.weight`, ...), restored with `load_state_dict`.
  They are not a LoRA, so they cannot go in the first file (diffusers' loader wants every key to be one).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dynamictrl.errors import UserError

LORA_FILE = "pytorch_lora_weights.safetensors"  # diffusers' LORA_WEIGHT_NAME_SAFE
POSE_FILE = "pose_branch.safetensors"
ADAPTER = "dynamictrl"  # the adapter's name once loaded for inference (training uses peft's "default")
DEFAULT_TARGETS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "norm1.linear")


def pose_branch(model: nn.Module) -> tuple[str, ...]:
    """Names of the modules trained in full under LoRA: those a base CogVideoX checkpoint lacks."""
    names = list(model.new_modules())
    if model.config.control == "uvt":
        names.append("patch_embed.proj")
    return tuple(names)


def _inside(name: str, prefixes: Sequence[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def check_rank(rank: Any) -> None:
    """`module.lora.rank` must be a positive integer; a one-line UserError otherwise."""
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise UserError(f"module.lora.rank={rank!r}: must be a positive integer (null or 0 turns LoRA off)")


def add_lora(model: nn.Module, rank: int, alpha: float | None = None, dropout: float = 0.0,
             target_modules: Sequence[str] = DEFAULT_TARGETS, base_dtype: str | None = None) -> list[str]:  # fmt: skip
    """Freeze `model`, add a LoRA adapter of `rank` to every Linear whose name ends with one of
    `target_modules` (outside the pose branch), and make the pose branch trainable in full.

    Args:
        rank: the adapters' rank r.
        alpha: peft's lora_alpha; the update is (alpha / r) * B @ A. None: alpha = r.
        dropout: dropout on the adapters' input.
        target_modules: module-name suffixes, e.g. "to_q" (every attention) or "attn1.to_q".
        base_dtype: cast the frozen weights to this dtype (e.g. "bfloat16": half their memory); the
            trainable weights (adapters, pose branch) are kept in float32 for the optimizer.

    Works on the meta device too (training adds the adapters before sharding and loading; the
    adapters' values are then set by `train.build.init_adapters`).

    Returns the names of the modules that got an adapter.
    """
    from peft import LoraConfig

    check_rank(rank)
    full = pose_branch(model)
    suffixes = tuple(target_modules)
    targets = [n for n, m in model.named_modules()
               if isinstance(m, nn.Linear) and not _inside(n, full)
               and any(n == s or n.endswith("." + s) for s in suffixes)]  # fmt: skip
    if not targets:
        raise UserError(f"module.lora.target_modules={list(suffixes)}: matches no linear layer of the transformer")
    if base_dtype:
        model.to(getattr(torch, base_dtype))
    model.requires_grad_(False)
    # Explicit full names: peft would also match a suffix inside the pose branch (attn2.to_q for "to_q").
    model.add_adapter(LoraConfig(r=rank, lora_alpha=alpha or rank, lora_dropout=dropout, target_modules=targets,
                                 init_lora_weights=True))  # fmt: skip
    for name in full:
        model.get_submodule(name).requires_grad_(True)
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    return targets


def lora_config(model: nn.Module) -> dict[str, Any]:
    """The adapter's peft config as JSON-able values (saved in the safetensors metadata)."""
    cfg = model.peft_config["default"].to_dict()
    return {k: sorted(v) if isinstance(v, set) else v for k, v in cfg.items()}


def split_state(model: nn.Module, state: dict[str, torch.Tensor] | None = None
                ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:  # fmt: skip
    """(adapters under diffusers' names without the "transformer." prefix, pose-branch weights) of a
    LoRA-wrapped transformer; `state` replaces its own weights (e.g. the EMA ones)."""
    from peft.utils import get_peft_model_state_dict

    state = model.state_dict() if state is None else state
    adapters = get_peft_model_state_dict(model, state_dict=state, adapter_name="default")
    full = pose_branch(model)
    pose = {k: v for k, v in state.items() if _inside(k.rsplit(".", 1)[0], full)}
    return adapters, pose


def save_lora(folder: str | Path, model: nn.Module, state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write FOLDER/pytorch_lora_weights.safetensors (diffusers) and FOLDER/pose_branch.safetensors."""
    from safetensors.torch import save_file

    from dynamictrl.models.pipeline import DynamiCtrlPipeline

    folder = Path(folder)
    adapters, pose = split_state(model, state)
    cpu = {k: v.detach().cpu().contiguous() for k, v in adapters.items()}
    DynamiCtrlPipeline.save_lora_weights(folder, transformer_lora_layers=cpu,
                                         transformer_lora_adapter_metadata=lora_config(model))  # fmt: skip
    save_file({k: v.detach().cpu().contiguous() for k, v in pose.items()}, str(folder / POSE_FILE),
              metadata={"format": "pt"})  # fmt: skip
    return folder


def _read(path: Path, arg: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as err:
        raise UserError(f"{arg}: {path.name} is not a readable safetensors file ({str(err).splitlines()[0]})") from None


def lora_file(path: str | Path) -> Path:
    """The adapter file of `lora=PATH` (a folder written by training, or the file itself)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"lora={path}: no such file or folder")
    file = path / LORA_FILE if path.is_dir() else path
    if not file.is_file():
        raise UserError(f"lora={path}: no {LORA_FILE} in this folder (training with module.lora.rank writes OUTPUT/lora/)")
    return file


def pose_control(path: str | Path) -> str | None:
    """The `control` mode whose pose branch a saved LoRA carries (None: it carries none), so that a
    plain CogVideoX base can be given the matching branch before the weights are loaded."""
    pose = lora_file(path).parent / POSE_FILE
    if not pose.is_file():
        return None
    keys = _read(pose, f"lora={path}")[0].keys()
    if any(".control_norm1." in k for k in keys):
        return "padaln"
    if any(".attn2." in k for k in keys):
        return "cross_attn"
    return "uvt" if any(k.startswith("patch_embed.proj.") for k in keys) else None


def check_lora(path: str | Path, model: nn.Module) -> tuple[Path, dict, dict, dict]:
    """Resolve and validate a saved LoRA for `model`; one-line UserErrors name `lora=PATH` and the problem.

    Returns the LoRA file, its adapter weights, the pose-branch weights (empty if the folder has none)
    and the file's metadata."""
    arg = f"lora={path}"
    file = lora_file(path)
    adapters, meta = _read(file, arg)
    modules = dict(model.named_modules())
    for key, value in adapters.items():
        name, _, kind = key.removeprefix("transformer.").rpartition(".lora_")
        if kind not in ("A.weight", "B.weight") or not key.startswith("transformer."):
            raise UserError(f"{arg}: {key} is not a diffusers LoRA key (transformer.<module>.lora_A/B.weight)")
        layer = modules.get(name)
        base = getattr(layer, "base_layer", layer)  # a layer that already carries an adapter
        if not isinstance(base, nn.Linear):
            raise UserError(f"{arg}: {name} is not a linear layer of this model (a LoRA for another model?)")
        want = base.in_features if kind == "A.weight" else base.out_features
        got = value.shape[1] if kind == "A.weight" else value.shape[0]
        if value.ndim != 2 or got != want:
            raise UserError(f"{arg}: {key} has shape {tuple(value.shape)}, which does not fit {name} "
                            f"({base.in_features} -> {base.out_features}; a LoRA for another model?)")  # fmt: skip
    if not adapters:
        raise UserError(f"{arg}: {file.name} holds no weights")
    pose: dict[str, torch.Tensor] = {}
    if (file.parent / POSE_FILE).is_file():
        pose, _ = _read(file.parent / POSE_FILE, arg)
        own = model.state_dict()
        for key, value in pose.items():
            if key not in own or own[key].shape != value.shape:
                raise UserError(f"{arg}: {POSE_FILE} has {key} {tuple(value.shape)}, which this model "
                                f"{'lacks' if key not in own else 'holds as ' + str(tuple(own[key].shape))}")  # fmt: skip
    return file, adapters, pose, meta


def load_lora(pipe: Any, path: str | Path, scale: float = 1.0) -> dict[str, Any]:
    """Load a saved LoRA into `pipe.transformer` as adapter "dynamictrl" at `scale` (unfused), and its
    pose-branch weights in place of the pipeline's. Returns a summary of what was loaded."""
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise UserError(f"lora_scale={scale!r}: must be a number")
    file, adapters, pose, meta = check_lora(path, pipe.transformer)
    pipe.load_lora_weights(str(file.parent), weight_name=file.name, adapter_name=ADAPTER)
    pipe.set_adapters([ADAPTER], [float(scale)])
    if pose:
        ref = next(pipe.transformer.parameters())
        pipe.transformer.load_state_dict({k: v.to(ref.dtype) for k, v in pose.items()}, strict=False)
    config = json.loads(meta.get("lora_adapter_metadata") or "{}")
    return {"lora": str(file.parent), "lora_scale": float(scale), "lora_layers": len(adapters) // 2,
            "pose_branch_tensors": len(pose), "rank": config.get("transformer.r")}  # fmt: skip

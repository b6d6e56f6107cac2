"""Strategy builders for the trainer configs: YAML names classes by string; these turn them into
the sets Lightning wants, and build DeepSpeed's config as a plain dict (testable without DeepSpeed)."""

from __future__ import annotations

from typing import Any

from dynamictrl.errors import UserError


def _classes(names: list[str] | tuple[str, ...]) -> set[type]:
    from dynamictrl.models import transformer

    return {getattr(transformer, n) for n in names}


def fsdp(sharding_strategy: str = "FULL_SHARD", wrap: list[str] = ("DynamiCtrlBlock",),
         activation_checkpointing: list[str] = ("DynamiCtrlBlock",), state_dict_type: str = "sharded",
         **kwargs: Any):  # fmt: skip
    """FSDPStrategy wrapping each transformer block; `state_dict_type=sharded` writes last.ckpt as a
    folder of per-rank shards (the train app gathers the full weights for the safetensors export)."""
    from lightning.pytorch.strategies import FSDPStrategy

    return FSDPStrategy(sharding_strategy=sharding_strategy, auto_wrap_policy=_classes(wrap),
                        activation_checkpointing_policy=_classes(activation_checkpointing) or None,
                        state_dict_type=state_dict_type, **kwargs)  # fmt: skip


def deepspeed_config(stage: int = 2, offload_optimizer: bool = True, offload_device: str = "cpu",
                     bucket_size: float = 5e8) -> dict[str, Any]:  # fmt: skip
    """ZeRO config (the official recipe: ZeRO-2 with the optimizer on the CPU). Lightning fills in
    batch size, gradient accumulation, clipping and precision from the trainer."""
    zero: dict[str, Any] = {"stage": stage, "overlap_comm": True, "contiguous_gradients": True,
                            "reduce_bucket_size": bucket_size, "allgather_bucket_size": bucket_size}  # fmt: skip
    if offload_optimizer:
        zero["offload_optimizer"] = {"device": offload_device, "pin_memory": True}
    # torch's AdamW from conf/train.yaml works offloaded; DeepSpeedCPUAdam is faster (module.optimizer)
    return {"zero_optimization": zero, "zero_allow_untested_optimizer": True, "zero_force_ds_cpu_optimizer": False}


def deepspeed(**kwargs: Any):
    """DeepSpeedStrategy from `deepspeed_config(**kwargs)`; needs the deepspeed package."""
    try:
        import deepspeed  # noqa: F401
    except ImportError as e:
        raise UserError("trainer=deepspeed_zero2_offload needs DeepSpeed: pip install deepspeed "
                        "(an sdist; DS_BUILD_OPS=0 builds it without compiling its CUDA ops)") from e  # fmt: skip
    from lightning.pytorch.strategies import DeepSpeedStrategy

    return DeepSpeedStrategy(config=deepspeed_config(**kwargs))

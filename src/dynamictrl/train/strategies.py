"""Strategy builders for the trainer configs: FSDP2 over Lightning's ModelParallelStrategy (the module
shards its transformer through `strategy.shard`), and DeepSpeed's config as a plain dict (testable
without DeepSpeed)."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.strategies import ModelParallelStrategy

from dynamictrl.errors import UserError


def _classes(names: list[str] | tuple[str, ...]) -> set[type]:
    from dynamictrl.models import transformer

    return {getattr(transformer, n) for n in names}


class FSDP2Strategy(ModelParallelStrategy):
    """FSDP2 (`fully_shard`) over every rank: the LightningModule calls `shard(transformer)` in
    `configure_model` while the transformer is still on the meta device, then fills each rank's
    shard from the checkpoint. Checkpoints are torch.distributed.checkpoint folders of shards.
    Unlike Lightning's FSDPStrategy (FSDP1) it also runs on CPU with gloo (tested with 2 processes)."""

    def __init__(self, wrap: list[str] | tuple[str, ...] = ("DynamiCtrlBlock",), param_dtype: str | None = "bfloat16",
                 reduce_dtype: str | None = "float32", reshard_after_forward: bool = True, cpu_offload: bool = False,
                 **kwargs: Any):  # fmt: skip
        kwargs.setdefault("tensor_parallel_size", 1)
        super().__init__(**kwargs)
        self.wrap, self.reshard_after_forward, self.cpu_offload = tuple(wrap), reshard_after_forward, cpu_offload
        self.param_dtype, self.reduce_dtype = param_dtype, reduce_dtype

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes  # pure data parallel: shard over all
        super().setup_environment()

    def shard(self, model: Any) -> Any:
        """fully_shard each block (classes named in `wrap`), then the rest of the model."""
        import torch
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

        mesh = self.device_mesh["data_parallel"]
        dtype = {None: None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
        opts = {"mesh": mesh, "mp_policy": MixedPrecisionPolicy(dtype[self.param_dtype], dtype[self.reduce_dtype])}
        if self.cpu_offload:
            opts["offload_policy"] = CPUOffloadPolicy()
        classes = tuple(_classes(self.wrap))
        for m in model.modules():
            if isinstance(m, classes):
                fully_shard(m, reshard_after_forward=self.reshard_after_forward, **opts)
        fully_shard(model, reshard_after_forward=self.reshard_after_forward, **opts)
        return model

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        """Lightning's load, except for a module with `strict_loading` off (LoRA) and a sharded folder:
        its checkpoints hold part of the weights (the trainable ones and their EMA), so only the keys the
        folder holds are read, after checking that every key the module needs is among them."""
        from pathlib import Path

        import torch
        from torch.distributed.checkpoint import FileSystemReader, load
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
            set_optimizer_state_dict,
        )

        from dynamictrl.train.module import check_resume_keys

        module = self.lightning_module
        path = Path(self.broadcast(checkpoint_path))
        if module.strict_loading or not (path.is_dir() and (path / "meta.pt").is_file()):
            return super().load_checkpoint(checkpoint_path, weights_only=weights_only)
        saved = {k.removeprefix("state_dict.") for k in FileSystemReader(path).read_metadata().state_dict_metadata}
        needed = module.checkpoint_keys() if hasattr(module, "checkpoint_keys") else []
        check_resume_keys(needed, saved)
        state = {k: v for k, v in get_model_state_dict(self.model).items() if k in saved}
        load({"state_dict": state}, checkpoint_id=path)
        self.model.load_state_dict(state, strict=False)
        for idx, optimizer in enumerate(self.optimizers):  # as Lightning does: the trainable params only
            optim_state = {f"optimizer_{idx}": get_optimizer_state_dict(self.model, optimizer)}
            load(optim_state, checkpoint_id=path)
            set_optimizer_state_dict(self.model, optimizer, optim_state_dict=optim_state[f"optimizer_{idx}"],
                                     options=StateDictOptions(cpu_offload=True))  # fmt: skip
        return torch.load(path / "meta.pt", weights_only=weights_only)


def fsdp(**kwargs: Any):
    """The FSDP2 strategy (`conf/trainer/fsdp.yaml`): full shard of weights, grads and optimizer state,
    one unit per transformer block, bf16 compute with fp32 master weights and gradient reduction."""
    return FSDP2Strategy(**kwargs)


def deepspeed_config(stage: int = 2, offload_optimizer: bool = True, offload_device: str = "cpu",
                     bucket_size: float = 5e8, offload_params: bool = False) -> dict[str, Any]:  # fmt: skip
    """ZeRO config (the official recipe: ZeRO-2 with the optimizer on the CPU; ZeRO-3 can also keep the
    parameters there). Lightning fills in batch size, accumulation, clipping and precision."""
    zero: dict[str, Any] = {"stage": stage, "overlap_comm": True, "contiguous_gradients": True,
                            "reduce_bucket_size": bucket_size, "allgather_bucket_size": bucket_size}  # fmt: skip
    if offload_optimizer:
        zero["offload_optimizer"] = {"device": offload_device, "pin_memory": True}
    if offload_params:
        if stage != 3:
            raise UserError(f"trainer.strategy.offload_params=true needs ZeRO stage 3 (got stage {stage})")
        zero["offload_param"] = {"device": offload_device, "pin_memory": True}
    # torch's AdamW from conf/train.yaml works offloaded; DeepSpeedCPUAdam is faster (module.optimizer)
    return {"zero_optimization": zero, "zero_allow_untested_optimizer": True, "zero_force_ds_cpu_optimizer": False}


def deepspeed(**kwargs: Any):
    """DeepSpeedStrategy from `deepspeed_config(**kwargs)`; needs the deepspeed package."""
    try:
        import deepspeed  # noqa: F401
    except ImportError as e:
        raise UserError("trainer=deepspeed_* needs DeepSpeed: pip install deepspeed "
                        "(an sdist; DS_BUILD_OPS=0 builds it without compiling its CUDA ops)") from e  # fmt: skip
    from lightning.pytorch.strategies import DeepSpeedStrategy

    return DeepSpeedStrategy(config=deepspeed_config(**kwargs))

"""Strategy builders for the trainer configs: FSDP2 over Lightning's ModelParallelStrategy (the module
shards its transformer through `strategy.shard`), and DeepSpeed's config as a plain dict (testable
without DeepSpeed)."""

from __future__ import annotations

import functools
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
        # No input casts: FSDP2 would cast every floating argument to param_dtype, the RoPE cos/sin included,
        # which inference keeps in fp32. The model casts its own inputs where no autocast does it.
        policy = MixedPrecisionPolicy(dtype[self.param_dtype], dtype[self.reduce_dtype], cast_forward_inputs=False)
        opts = {"mesh": mesh, "mp_policy": policy}
        if self.cpu_offload:
            opts["offload_policy"] = CPUOffloadPolicy()
        classes = tuple(_classes(self.wrap))
        for m in model.modules():
            if isinstance(m, classes):
                fully_shard(m, reshard_after_forward=self.reshard_after_forward, **opts)
        fully_shard(model, reshard_after_forward=self.reshard_after_forward, **opts)
        return model

    @property
    def fill_device(self) -> Any:
        """Where the shards are materialised and filled: host memory under CPU offload (FSDP2 computes
        with offloaded parameters only if they live on the CPU), else the training device."""
        import torch

        return torch.device("cpu") if self.cpu_offload else self.root_device

    def model_to_device(self) -> None:
        """Lightning moves the whole module to the device after configure_model; under CPU offload the
        sharded parameters must stay in host memory, so only the transformer's buffers move."""
        if not self.cpu_offload:
            return super().model_to_device()
        from torch.distributed.tensor import DTensor

        for module in self.model.modules():  # DTensor buffers (the EMA's shards) stay with the parameters
            for name, buf in module._buffers.items():
                if buf is not None and not isinstance(buf, DTensor):
                    module._buffers[name] = buf.to(self.root_device)

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

        weights_only = True if weights_only is None else weights_only  # a checkpoint is data: no pickle
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
                     bucket_size: float = 5e8, offload_params: bool = False, micro_batch_size: int = 1) -> dict[str, Any]:  # fmt: skip
    """ZeRO config (the official recipe: ZeRO-2 with the optimizer on the CPU; ZeRO-3 can also keep the
    parameters there). Lightning fills in accumulation, clipping and precision; the micro-batch size is
    given (`data.batch_size`): Lightning would read it from the loader's batch sampler, which a
    webdataset loader (batched in the dataset) does not have."""
    zero: dict[str, Any] = {"stage": stage, "overlap_comm": True, "contiguous_gradients": True,
                            "reduce_bucket_size": bucket_size, "allgather_bucket_size": bucket_size}  # fmt: skip
    if offload_optimizer:
        zero["offload_optimizer"] = {"device": offload_device, "pin_memory": True}
    if offload_params:
        if stage != 3:
            raise UserError(f"trainer.strategy.offload_params=true needs ZeRO stage 3 (got stage {stage})")
        zero["offload_param"] = {"device": offload_device, "pin_memory": True}
    # torch's AdamW from conf/train.yaml works offloaded; DeepSpeedCPUAdam is faster (module.optimizer)
    return {"zero_optimization": zero, "zero_allow_untested_optimizer": True, "zero_force_ds_cpu_optimizer": False,
            "train_micro_batch_size_per_gpu": int(micro_batch_size)}  # fmt: skip


def deepspeed(process_group_backend: str | None = None, **kwargs: Any):
    """DeepSpeedStrategy from `deepspeed_config(**kwargs)`; needs the deepspeed package."""
    try:
        import deepspeed  # noqa: F401
    except ImportError as e:
        raise UserError("trainer=deepspeed_* needs DeepSpeed: pip install deepspeed "
                        "(an sdist; DS_BUILD_OPS=0 builds it without compiling its CUDA ops)") from e  # fmt: skip
    return _deepspeed_classes()[0](config=deepspeed_config(**kwargs), process_group_backend=process_group_backend)


@functools.cache
def _deepspeed_classes() -> tuple[type, type]:
    """The DeepSpeed strategy and precision classes, defined on first use (Lightning's DeepSpeed module
    needs the deepspeed package at class creation)."""
    import torch
    from lightning.pytorch.accelerators import CPUAccelerator
    from lightning.pytorch.plugins.precision import DeepSpeedPrecision
    from lightning.pytorch.strategies import DeepSpeedStrategy as LightningDeepSpeed

    class DeepSpeedAutocast(DeepSpeedPrecision):
        """bf16-mixed / 16-mixed as the module's loss needs it. Lightning's DeepSpeed precision casts the
        whole batch to the engine's dtype and adds no autocast, while the engine holds the weights in that
        dtype: fp32 inputs (latents, noise) then meet bf16 weights (`mat1 and mat2 must have the same
        dtype`), and the loss targets are rounded. Here the batch stays fp32 (targets and loss in fp32)
        and the forward runs under autocast to the engine's dtype."""

        def __init__(self, precision: str, device_type: str):
            super().__init__(precision)
            self.device_type = device_type

        def convert_input(self, data: Any) -> Any:
            return data if "mixed" in self.precision else super().convert_input(data)

        def forward_context(self):
            if "mixed" not in self.precision:
                return super().forward_context()
            return torch.autocast(self.device_type, dtype=self._desired_dtype)

    class DeepSpeedStrategy(LightningDeepSpeed):
        """Lightning's DeepSpeedStrategy with the precision above, and on a CPU accelerator too: DeepSpeed
        has a CPU accelerator of its own (chosen when no GPU is visible) and trains over gloo, which is how
        `make rehearse` runs both ZeRO configs on CPU processes. Lightning refuses anything but CUDA."""

        def setup_environment(self) -> None:
            if isinstance(self.accelerator, CPUAccelerator):
                super(LightningDeepSpeed, self).setup_environment()  # skip only the CUDA-only check
            else:
                super().setup_environment()
            self.precision_plugin = DeepSpeedAutocast(self.precision_plugin.precision, self.root_device.type)

        @property
        def root_device(self) -> torch.device:
            device = super().root_device  # DeepSpeed takes its rank's device from the index, None on CPU
            return torch.device("cpu", self.local_rank) if device.type == "cpu" else device

        def setup_distributed(self) -> None:
            if not isinstance(self.accelerator, CPUAccelerator):
                return super().setup_distributed()
            from lightning.fabric.utilities.seed import reset_seed

            reset_seed()  # as Lightning's, less its check of CUDA device indices (CPU devices have none)
            self.set_world_ranks()
            self._init_deepspeed_distributed()

    return DeepSpeedStrategy, DeepSpeedAutocast

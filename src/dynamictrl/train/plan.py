"""Memory plan: the predicted per-GPU memory of a training run, and whether it fits a GPU.

    python -m dynamictrl.train.plan model=cogvideox1.5-5b-i2v trainer=fsdp gpus=8 gpu_gb=80
    python -m dynamictrl.train.plan model=cogvideox1.5-5b-i2v trainer=all frames=37

Arguments are the train app's Hydra overrides plus the plan's own: `gpus` (ranks sharing the model,
default 8), `gpu_gb` (default 80), `frames`/`height`/`width` (default the model config's clip),
`batch_size` (1), `precomputed` (true: no T5 in training), `trainer=all` (every trainer config),
`measure` (true; false skips the activation run and prints the state only).

Weights, gradients, optimizer state, EMA and frozen encoders are counted from the parameters of the
model built on the meta device and each strategy's bytes per parameter. Activations are MEASURED:
one real training step (`DynamiCtrlModule.loss` on a precomputed-style batch, its VAE encode of the
reference included, then backward) at the full clip and width runs under FakeTensorMode (no memory,
no FLOPs spent) with torch's MemTracker, with 2 and 3 of the model's blocks; every further block adds
the same, so the full depth is the linear extrapolation (tested against a direct run). Weight gradients
are dropped as soon as they are accumulated, so the peak is activations plus temporaries. The run
uses bf16 weights under bf16 autocast, as FSDP2's and DeepSpeed's compute copies are; AMP strategies
(gpu, ddp) add autocast's bf16 weight copies as a formula row.

The GPUs planned for run CUDA autocast, which computes the ops of its float32 list (torch.amp's "CUDA
Ops that can autocast to float32": LayerNorm, GroupNorm, softmax, exp, pow, sum, ...) in fp32 and returns
fp32; CPU autocast has no kernel for them and leaves them in bf16. On a GPU every LayerNorm of the model
(norm1 / norm2, PadaLN's control_norm1, the q/k norms, norm_final) and every GroupNorm of the VAE returns
fp32, and the elementwise ops after it (the modulation, the pose stream before its cast back) are fp32 and
saved for backward in fp32. So the step is measured under `cuda_autocast_policy`, which gives CPU autocast
CUDA's policy for those ops (`CUDA_FP32_OPS`) at the dispatch key CPU autocast runs at, as CUDA's runs at
its own: above autograd (autograd saves the fp32 tensors) and on aten ops (ops called inside Python
composites are caught). Matrix products, convolutions and attention (linear, matmul, mm, addmm, bmm,
baddbmm, conv, SDPA) are bf16 under both autocasts already; CUDA's promote ops and its lower-precision
ops without a CPU kernel (einsum, mv, RNN cells) are not emulated (the model calls none of them).
`tests/test_train_plan.py` checks the emulation against CUDA autocast itself, on fake CUDA tensors (no GPU
needed): every module's output dtype matches. Backward runs outside autocast, as Lightning runs it (a
checkpointed block's recomputation re-enters it); under autocast its bias-gradient sums would be fp32 and
autocast's cache would keep each recomputed block's bf16 copies of fp32 weights (LoRA, PadaLN) to the end.

`trainable_parameters` decides what trains: every parameter in full fine-tuning; with
`module.lora.rank` it adds the LoRA adapters to the meta model (`models.lora.add_lora`, as training
does) and only the adapters and the pose branch (PadaLN) train, the frozen base counted in
`module.lora.base_dtype`. The gradient, optimizer and EMA rows follow it, and the activation run
uses the adapted model (a frozen linear saves no input for a weight gradient).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from dynamictrl import config
from dynamictrl.errors import UserError

GB = 1e9
PLAN_KEYS = {"gpus": 8, "gpu_gb": 80.0, "frames": None, "height": None, "width": None, "batch_size": 1,
             "precomputed": True, "measure": True}  # fmt: skip
FITTING = ("fsdp", "deepspeed_zero2_offload", "deepspeed_zero3_offload")  # what a refusal suggests, in order
MARGIN = 0.9  # of the GPU usable for tensors: the CUDA context, allocator fragmentation and NCCL buffers
T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
              feed_forward_proj="gated-gelu")  # fmt: skip


# 1. The model's parameters.
def model_architecture(cfg: DictConfig) -> dict[str, Any]:
    """The transformer's constructor arguments: the model config's `transformer`, else `model.path`'s
    config.json, else the embedded tiny model's."""
    model = cfg.model
    arch: dict[str, Any]
    if "transformer" in model:
        arch = OmegaConf.to_container(model.transformer, resolve=True)  # type: ignore[assignment]
    elif model.get("path"):
        from dynamictrl.train.build import transformer_config

        arch = transformer_config(str(model.path))
    else:
        from dynamictrl.models.embedded import TRANSFORMER

        arch = dict(TRANSFORMER)
    return arch | {k: model[k] for k in ("control", "pose_init") if model.get(k)}


def meta_transformer(cfg: DictConfig) -> torch.nn.Module:
    from dynamictrl.models.transformer import DynamiCtrlTransformer3DModel

    with torch.device("meta"):
        return DynamiCtrlTransformer3DModel(**model_architecture(cfg))


def lora_settings(cfg: DictConfig) -> dict[str, Any] | None:
    """`module.lora` when LoRA is on (a rank), else None."""
    lora = cfg.module.get("lora")
    return dict(OmegaConf.to_container(lora, resolve=True)) if lora and lora.get("rank") else None  # type: ignore[arg-type]


def trainable_parameters(model: torch.nn.Module, cfg: DictConfig,
                         cast: bool = True) -> list[tuple[str, torch.nn.Parameter]]:  # fmt: skip
    """What the optimizer trains. Full fine-tuning: every parameter. With `module.lora.rank`, the LoRA
    adapters are added to `model` (in place, as training adds them; the frozen base cast to
    `base_dtype`) and the adapters and the pose branch train; the plan's grads/optimizer/EMA rows
    follow this list. `cast=False` leaves the base's dtype alone (a model built in bf16 already)."""
    lora = lora_settings(cfg)
    if lora:
        from dynamictrl.models.lora import add_lora

        add_lora(model, **(lora if cast else lora | {"base_dtype": None}))
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


@dataclass
class Counts:
    total: int
    trainable: int
    block: int  # the largest block's parameters: FSDP2's gathered working set
    layers: int
    vae: int
    t5: int
    frozen_bytes: float = 0.0  # the transformer's frozen weights (LoRA's base), in their dtype
    frozen_dtype: str = "float32"
    block_trainable: int = 0  # the largest block's trainable parameters (its unsharded gradients)


def count(cfg: DictConfig) -> Counts:
    from diffusers import AutoencoderKLCogVideoX
    from transformers import T5Config, T5EncoderModel

    model = meta_transformer(cfg)
    trainable = trainable_parameters(model, cfg)  # LoRA: adds the adapters to `model`
    blocks = [sum(p.numel() for p in b.parameters()) for b in model.transformer_blocks]
    frozen = [p for p in model.parameters() if not p.requires_grad]
    with torch.device("meta"):
        if cfg.model.get("path") or "transformer" not in cfg.model:  # the folder's own VAE / T5
            vae, t5 = _frozen_meta(cfg)
        else:  # full-size configs: CogVideoX's VAE (diffusers' defaults) and T5-XXL
            vae, t5 = AutoencoderKLCogVideoX(), T5EncoderModel(T5Config(**T5_XXL))
    return Counts(total=sum(p.numel() for p in model.parameters()), trainable=sum(p.numel() for _, p in trainable),
                  block=max(blocks), layers=len(blocks), vae=sum(p.numel() for p in vae.parameters()),
                  t5=sum(p.numel() for p in t5.parameters()),
                  frozen_bytes=float(sum(p.numel() * p.element_size() for p in frozen)),
                  frozen_dtype=str(frozen[0].dtype).removeprefix("torch.") if frozen else "float32",
                  block_trainable=max(sum(p.numel() for p in b.parameters() if p.requires_grad)
                                      for b in model.transformer_blocks))  # fmt: skip


def _frozen_meta(cfg: DictConfig):
    from diffusers import AutoencoderKLCogVideoX
    from transformers import T5Config, T5EncoderModel

    from dynamictrl.models import embedded

    path = str(cfg.model.path) if cfg.model.get("path") else None
    if path is None:
        return AutoencoderKLCogVideoX(**embedded.VAE), T5EncoderModel(T5Config(vocab_size=300, **embedded.T5))
    vae = AutoencoderKLCogVideoX.from_config(AutoencoderKLCogVideoX.load_config(path, subfolder="vae"))
    return vae, T5EncoderModel(T5Config.from_pretrained(path, subfolder="text_encoder"))


# 2. What each trainer config keeps on a GPU.
def strategy_kind(trainer: DictConfig) -> str:
    """cpu | single | ddp | fsdp | zero2 | zero3: what the trainer config's strategy object is (built
    from its `_target_`, or Lightning's registry for a name like `ddp`; nothing is set up)."""
    from hydra.utils import instantiate
    from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, FSDPStrategy, StrategyRegistry

    from dynamictrl.train.strategies import FSDP2Strategy

    strategy = trainer.get("strategy")
    if isinstance(strategy, DictConfig):
        strategy = instantiate(strategy, _convert_="all")
    elif isinstance(strategy, str) and strategy in StrategyRegistry:
        strategy = StrategyRegistry.get(strategy)
    if isinstance(strategy, FSDP2Strategy):
        return "fsdp"
    if isinstance(strategy, FSDPStrategy):  # would pass as one unsharded replica below, then fail in the build
        raise UserError(f"trainer.strategy={type(strategy).__name__}: Lightning's FSDP1 is not supported (the build "
                        "fills FSDP2's DTensor shards); use trainer=fsdp (dynamictrl.train.strategies.FSDP2Strategy)")  # fmt: skip
    if isinstance(strategy, DeepSpeedStrategy):  # before DDP: Lightning's DeepSpeedStrategy is a DDPStrategy
        return "zero3" if int(strategy.config["zero_optimization"]["stage"]) == 3 else "zero2"
    if isinstance(strategy, DDPStrategy):
        return "ddp"
    return "cpu" if trainer.get("accelerator") == "cpu" else "single"


@dataclass
class Plan:
    trainer: str
    kind: str
    gpus: int
    rows: dict[str, float] = field(default_factory=dict)  # bytes per GPU
    host: dict[str, float] = field(default_factory=dict)  # bytes per rank in host memory
    activations: dict[bool, float] = field(default_factory=dict)  # checkpointing -> bytes
    checkpointing: bool = True
    source: str = ""

    def total(self, checkpointing: bool | None = None) -> float:
        c = self.checkpointing if checkpointing is None else checkpointing
        return sum(self.rows.values()) + self.activations.get(c, 0.0)

    def fits(self, gpu_gb: float, checkpointing: bool | None = None) -> bool:
        return self.total(checkpointing) <= MARGIN * gpu_gb * GB


def state_rows(kind: str, c: Counts, gpus: int, cfg: DictConfig) -> tuple[dict[str, float], dict[str, float]]:
    """Bytes per GPU (and per rank in host memory) for weights, gradients, optimizer and EMA."""
    P, T, n = c.total, c.trainable, max(int(gpus), 1)  # noqa: N806 - the usual names
    ema = bool(cfg.module.get("ema_decay"))
    ema_gpu = ema and cfg.module.get("ema_device", "same") == "same"
    rows: dict[str, float] = {}
    host: dict[str, float] = {}
    bucket = 2 * 5e8 * 2  # DeepSpeed's reduce + all-gather buckets (5e8 elements, bf16)
    if kind in ("zero2", "zero3") and c.frozen_bytes:
        raise UserError("module.lora: LoRA trains under trainer=gpu, ddp or fsdp, not DeepSpeed")
    if kind in ("cpu", "single", "ddp"):
        if c.frozen_bytes:  # LoRA: the frozen base in its own dtype, the trainable weights in fp32
            rows["weights, trainable (fp32)"] = 4 * T
            rows[f"weights, frozen ({c.frozen_dtype})"] = c.frozen_bytes
        else:
            rows["weights (fp32)"] = 4 * P
        if kind != "cpu":  # autocast caches bf16 copies of the weights that require grad only
            rows["autocast bf16 weight copies"] = 2 * T
        rows["gradients (fp32)"] = 4 * T
        rows["AdamW state (fp32 m, v)"] = 8 * T
        if ema:
            (rows if ema_gpu else host)["EMA (fp32)"] = 4 * T
    elif kind == "fsdp":
        offload = bool(cfg.trainer.strategy.get("cpu_offload"))
        shards = host if offload else rows  # CPUOffloadPolicy keeps the shards and AdamW in host memory
        if c.frozen_bytes:
            shards["weights, trainable (fp32 shard)"] = 4 * T / n
            shards[f"weights, frozen ({c.frozen_dtype} shard)"] = c.frozen_bytes / n
        else:
            shards["weights (fp32 shard)"] = 4 * P / n
        rows["gathered blocks (bf16, 2 in flight)"] = 2 * 2 * c.block if n > 1 or offload else 0.0
        shards["gradients (fp32 shard)"] = 4 * T / n
        rows["gradients (a block unsharded)"] = 4 * (c.block_trainable or c.block)
        shards["AdamW state (fp32 shard)"] = 8 * T / n
        if ema:
            (rows if ema_gpu and not offload else host)["EMA (fp32 shard)"] = 4 * T / n
    elif kind == "zero2":
        rows["weights (bf16)"] = 2 * P
        rows["gradients (bf16 partition + buckets)"] = 2 * T / n + bucket
        host["master weights + AdamW (fp32, offloaded)"] = 12 * T / n
        if ema:
            (rows if ema_gpu else host)["EMA (fp32)"] = 4 * T
    elif kind == "zero3":
        rows["weights (bf16 live params, max_live_parameters 1e9)"] = 2 * min(P, 1e9)
        rows["gradients (buckets)"] = bucket
        host["weights + master + AdamW (offloaded)"] = (2 + 12) * T / n + 2 * (P - T) / n
    return rows, host


# 3. Activations, measured.
# CUDA autocast's float32 ops (aten/src/ATen/autocast_mode.h: AT_FORALL_FP32, AT_FORALL_FP32_SET_OPT_DTYPE
# and norm's fp32_append_dtype) that have no AutocastCPU kernel: the ops CPU autocast leaves in bf16.
CUDA_FP32_OPS = (
    "layer_norm", "native_layer_norm", "group_norm", "rms_norm", "softmax.int", "log_softmax.int",
    "exp", "expm1", "log", "log10", "log1p", "log2", "reciprocal", "rsqrt", "pow.Scalar", "pow.Tensor_Scalar",
    "pow.Tensor_Tensor", "acos", "asin", "cosh", "sinh", "tan", "erfinv", "softplus", "sum", "sum.dim_IntList",
    "cumsum", "cumprod", "logsumexp", "norm.Scalar", "norm.ScalarOpt_dim", "linalg_vector_norm",
    "linalg_matrix_norm", "linalg_matrix_norm.str_ord", "frobenius_norm.dim", "nuclear_norm", "nuclear_norm.dim",
    "cosine_similarity", "dist", "pdist", "renorm", "upsample_nearest1d", "upsample_nearest2d",
    "upsample_nearest3d", "_upsample_nearest_exact1d", "_upsample_nearest_exact2d", "_upsample_nearest_exact3d",
    "upsample_linear1d", "upsample_bilinear2d", "_upsample_bilinear2d_aa", "upsample_trilinear3d",
    "upsample_bicubic2d", "_upsample_bicubic2d_aa",
)  # fmt: skip
_LOW = (torch.bfloat16, torch.float16)


@contextmanager
def cuda_autocast_policy() -> Iterator[None]:
    """While open, CPU autocast computes `CUDA_FP32_OPS` as CUDA autocast does: in fp32, returning fp32
    (see the module docstring for why the plan needs it). Each op gets a kernel at the AutocastCPU key
    that, like CUDA's, excludes autocast and calls the op again with every bf16/fp16 tensor argument cast
    to fp32, or, for the ops with a `dtype` argument (softmax, sum, cumsum, vector norms: CUDA's
    fp32_set_opt_dtype), with dtype=float32 when none is given and the input is bf16/fp16. Process-wide
    while open (the dispatcher's registrations); outside autocast it changes nothing."""
    lib = torch.library.Library("aten", "IMPL")
    try:
        for name in CUDA_FP32_OPS:
            base, _, overload = name.partition(".")
            lib.impl(name, _fp32_kernel(getattr(getattr(torch.ops.aten, base), overload or "default")), "AutocastCPU")
        yield
    finally:
        lib._destroy()


def _fp32_kernel(op: Any) -> Any:
    from torch.utils._pytree import tree_map_only

    names = [a.name for a in op._schema.arguments]
    below_autocast = torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCPU)

    def kernel(*args: Any, **kwargs: Any) -> Any:
        with torch._C._ExcludeDispatchKeyGuard(below_autocast):
            if "dtype" not in names:  # CUDA's fp32: every bf16/fp16 tensor argument cast
                args, kwargs = tree_map_only(torch.Tensor, lambda t: t.float() if t.dtype in _LOW else t,
                                             (args, kwargs))  # fmt: skip
            elif args[0].dtype in _LOW:  # CUDA's fp32_set_opt_dtype: computed in fp32 unless a dtype is given
                call = dict(zip(names, args, strict=False)) | kwargs  # trailing defaults are left out
                return op(**call | {"dtype": call.get("dtype") or torch.float32})
            return op(*args, **kwargs)

    return kernel


def measure_activations(cfg: DictConfig, frames: int, height: int, width: int, batch: int, checkpointing: bool,
                        num_layers: int | None = None, count_flops: bool = False) -> dict[str, float]:  # fmt: skip
    """Peak bytes of activations and temporaries (weight gradients excluded) while the transformer
    (forward and backward) and while the VAE (the reference encode) run in one training step:
    `DynamiCtrlModule.loss` + backward on a precomputed-style batch under FakeTensorMode + MemTracker,
    with the model's blocks or `num_layers` of them. `count_flops`: the step's FLOPs instead."""
    from diffusers import AutoencoderKLCogVideoX, CogVideoXDPMScheduler
    from torch._subclasses.fake_tensor import FakeTensorMode, unset_fake_temporarily
    from torch.distributed._tools.mem_tracker import MemTracker

    from dynamictrl.models import embedded
    from dynamictrl.models.pipeline import DynamiCtrlPipeline
    from dynamictrl.models.transformer import DynamiCtrlTransformer3DModel
    from dynamictrl.train.module import DynamiCtrlModule

    arch = model_architecture(cfg) | ({"num_layers": num_layers} if num_layers else {})
    tiny = "transformer" not in cfg.model and not cfg.model.get("path")
    vae_cfg = embedded.VAE if tiny else {}
    module = DynamiCtrlModule(model_path="", optimizer=None, ref_drop=0.0, text_drop=0.0,
                              mask_reference=bool(cfg.module.get("mask_reference")))  # fmt: skip
    scheduler = CogVideoXDPMScheduler(**embedded.SCHEDULER)
    default = torch.get_default_dtype()
    with FakeTensorMode(allow_non_fake_inputs=True):
        torch.set_default_dtype(torch.bfloat16)  # bf16 weights: the compute copies FSDP2 / DeepSpeed run with
        try:
            model = DynamiCtrlTransformer3DModel(**arch)
            vae = AutoencoderKLCogVideoX(**vae_cfg)  # encodes under no_grad; MemTracker hooks need grad-able params
        finally:
            torch.set_default_dtype(default)
        # LoRA: the adapted model, adapters fp32. peft's `.to()` of new layers cannot swap fake tensors, so
        # the adapters are made real (small: r x width each) and the base stays bf16, as built.
        with unset_fake_temporarily():
            trainable_parameters(model, cfg, cast=False)
        if checkpointing:
            model.enable_gradient_checkpointing()
        for p in model.parameters():  # drop each weight gradient once accumulated: not an activation
            if p.requires_grad:
                p.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None))
        module.transformer = model
        pipe = DynamiCtrlPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=model, scheduler=scheduler)
        object.__setattr__(module, "pipe", pipe)
        module.codec = pipe.latent_codec()
        stride, t_ratio = 2 ** (len(vae.config.block_out_channels) - 1), vae.config.temporal_compression_ratio
        n_lat, h, w = (frames - 1) // t_ratio + 1, height // stride, width // stride
        lat = (batch, n_lat, vae.config.latent_channels, h, w)
        data = {"latents": torch.randn(lat), "pose_latents": torch.randn(lat),
                "text_embeds": torch.randn(batch, arch["max_text_seq_length"], arch["text_embed_dim"]),
                "ref": torch.rand(batch, 3, height, width) * 2 - 1, "ref_mask": torch.ones(batch, height, width, dtype=torch.bool),
                "caption": ["a person"] * batch}  # fmt: skip
        module._empty_text = torch.zeros(arch["max_text_seq_length"], arch["text_embed_dim"])
    # The step itself runs outside the mode: its random draws (and their float() tests) stay real and
    # small; every op touching the fake weights and batch is still faked.
    if count_flops:  # a run of its own: the FLOP counter's module hooks keep activations alive
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as flops, torch.autocast("cpu", dtype=torch.bfloat16):
            module.loss(data, generator=torch.Generator().manual_seed(0)).backward()
        return {"flops": float(flops.get_total_flops())}
    tracker = MemTracker()
    tracker.track_external(model, vae)
    for p in model.parameters():  # LoRA's frozen base: MemTracker would hook every weight's gradient
        if not p.requires_grad:
            tracker._param_to_grad_hook_handles[p] = (_NO_HOOK, _NO_HOOK)
    with tracker, cuda_autocast_policy():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = module.loss(data, generator=torch.Generator().manual_seed(0))
        loss.backward()  # outside autocast, as Lightning runs it; a checkpointed block's recompute re-enters it
    return {"transformer": _module_peak(tracker, model), "vae": _module_peak(tracker, vae.encoder)}


class _NoHook:
    """Stands for MemTracker's gradient-hook handles of a frozen weight (no gradient, no hook)."""

    def remove(self) -> None:
        pass


_NO_HOOK = _NoHook()


def _module_peak(tracker: Any, module: torch.nn.Module) -> float:
    """The highest memory in use (activations and temporaries: weights, buffers, gradients and optimizer
    state left out) while `module` ran forward or backward."""
    from torch.distributed._tools.mem_tracker import _ModState

    stats = tracker.memory_tracking[module]
    best = 0.0
    for state in (_ModState.PEAK_FW, _ModState.PEAK_BW):
        for snap in stats.snapshots.get(state, []):
            for by_type in snap.values():
                resident = sum(v for k, v in by_type.items() if str(k).endswith(("PARAM", "BUFFER", "GRAD", "OPT")))
                best = max(best, float(by_type["Total"] - resident))
    return best


# 4. The plan.
def make_plan(cfg: DictConfig, trainer_name: str, gpus: int, clip: tuple[int, int, int], batch: int,
              precomputed: bool, measure: bool = True, counts: Counts | None = None,
              activations: dict[bool, float] | None = None) -> Plan:  # fmt: skip
    from dynamictrl.train.build import frozen_dtype

    kind = strategy_kind(cfg.trainer)
    c = counts or count(cfg)
    n = 1 if kind in ("cpu", "single") else gpus
    rows, host = state_rows(kind, c, n, cfg)
    enc = frozen_dtype(str(cfg.module.get("encoder_dtype", "auto")), str(cfg.trainer.get("precision"))).itemsize
    rows["VAE (frozen)"] = enc * c.vae
    if not precomputed:
        rows["T5 (frozen; not loaded with precomputed shards)"] = enc * c.t5
    setting = cfg.module.get("gradient_checkpointing", "auto")
    plan = Plan(trainer_name, kind, n, rows, host, checkpointing=(c.total > 1e9) if setting == "auto" else bool(setting))
    if activations is not None:
        plan.activations = dict(activations)
    elif measure:
        plan.activations = {ck: activations_by_scaling(cfg, clip, batch, ck) for ck in (True, False)}
    plan.source = (f"activations MEASURED: one DynamiCtrlModule.loss + backward (precomputed batch, reference "
                   f"VAE encode included, bf16 autocast with CUDA autocast's fp32 ops) under FakeTensorMode with "
                   f"torch's MemTracker, at 2 and 3 full-size blocks and the full clip, extrapolated linearly to {c.layers} blocks"
                   if plan.activations else "activations not measured (measure=false)")  # fmt: skip
    return plan


def activations_by_scaling(cfg: DictConfig, clip: tuple[int, int, int], batch: int, checkpointing: bool) -> float:
    """Activation bytes of the full model from measured runs with 2 and 3 of its blocks: from the
    second block on every block adds the same (its saved inputs with checkpointing: the video tokens
    and the pose stream, both in the compute dtype; its whole activations without), so the
    transformer's peak is a + b * layers; the step's peak is the larger of that and the VAE's (the
    reference encode comes first). (A 42-block fake run takes minutes on 2 CPU cores; this, seconds.)"""
    full = scaled(cfg, clip, batch, checkpointing)
    return max(full["transformer"], full["vae"])


def by_blocks(cfg: DictConfig, clip: tuple[int, int, int], batch: int, checkpointing: bool,
              count_flops: bool = False) -> dict[str, tuple[float, float]]:  # fmt: skip
    """Each figure of `measure_activations` as (a, b): with n of the model's blocks it is a + b * n,
    from runs with 2 and 3 blocks (the VAE's b is 0: it runs before the transformer)."""
    two, three = (measure_activations(cfg, *clip, batch, checkpointing, num_layers=n, count_flops=count_flops)
                  for n in (2, 3))  # fmt: skip
    slope = {k: 0.0 if k == "vae" else three[k] - two[k] for k in three}
    return {k: (three[k] - 3 * slope[k], slope[k]) for k in three}


def scaled(cfg: DictConfig, clip: tuple[int, int, int], batch: int, checkpointing: bool,
           count_flops: bool = False) -> dict[str, float]:  # fmt: skip
    """`measure_activations`' figures (transformer and VAE peaks, or the step's FLOPs) for the model's
    full depth, from runs with 2 and 3 blocks."""
    layers = int(model_architecture(cfg)["num_layers"])
    if layers <= 3:
        return measure_activations(cfg, *clip, batch, checkpointing, count_flops=count_flops)
    return {k: a + b * layers for k, (a, b) in by_blocks(cfg, clip, batch, checkpointing, count_flops).items()}


def step_flops(cfg: DictConfig, clip: tuple[int, int, int], batch: int) -> float:
    """Model FLOPs of one training step (forward + backward, no recomputation), for MFU."""
    return scaled(cfg, clip, batch, checkpointing=False, count_flops=True)["flops"]  # the reference encode runs first, before the transformer's peak


def state_bytes(cfg: DictConfig, gpus: int) -> tuple[float, Plan]:
    """Weights + gradients + optimizer + EMA + frozen encoders per GPU, with no activations: a lower bound."""
    plan = make_plan(cfg, str(cfg.trainer.get("_name_", "")), gpus, (1, 1, 1), 1, precomputed=True, measure=False)
    return sum(plan.rows.values()), plan


def check_fits(cfg: DictConfig) -> None:
    """Refuse, before anything loads, a model whose state alone (no activations) exceeds the memory of
    one GPU under this trainer config (`gpu_gb`, else the device's; host RAM for CPU trainers)."""
    kind = strategy_kind(cfg.trainer)
    devices, nodes = cfg.trainer.get("devices", 1), int(cfg.trainer.get("num_nodes", 1) or 1)
    gpus = nodes * (int(devices) if str(devices).isdigit() else max(torch.cuda.device_count(), 1))
    limit = _memory_gb(cfg, kind)
    if limit is None:
        return
    need, _ = state_bytes(cfg, gpus)
    if need <= MARGIN * limit * GB:
        return
    name = _trainer_name(cfg)
    model = cfg.model.get("name", "this model")
    suggest = "fsdp with more GPUs"
    for candidate in FITTING:  # the first config whose state fits (each at this run's GPU count)
        alt = cfg.copy()
        with open_dict(alt):
            alt.trainer = OmegaConf.load(config.conf_dir() / "trainer" / f"{candidate}.yaml")
        if lora_settings(cfg) and strategy_kind(alt.trainer) in ("zero2", "zero3"):
            continue  # LoRA is not run under DeepSpeed
        if strategy_kind(alt.trainer) != kind and state_bytes(alt, max(gpus, 2))[0] <= MARGIN * limit * GB:
            suggest = candidate
            break
    raise UserError(f"trainer={name} cannot hold {model}: {need / GB:.1f} GB of weights, gradients and optimizer "
                    f"state per GPU before activations, over {limit:.0f} GB; use trainer={suggest} "
                    f"(python -m dynamictrl.train.plan model={model} trainer=all)")  # fmt: skip


def _memory_gb(cfg: DictConfig, kind: str) -> float | None:
    if cfg.get("gpu_gb"):
        return float(cfg.gpu_gb)
    if kind == "cpu":
        import os

        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GB
    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(0).total_memory / GB
    return None  # a GPU config on a machine without one: Lightning reports that


KIND_LABEL = {"cpu": "cpu", "single": "gpu (one GPU)", "ddp": "ddp", "fsdp": "fsdp", "zero2": "deepspeed ZeRO-2",
              "zero3": "deepspeed ZeRO-3"}  # fmt: skip


def _trainer_name(cfg: DictConfig) -> str:
    """The trainer choice inside the Hydra app; composed from code, a label of its strategy."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        return str(HydraConfig.get().runtime.choices.get("trainer"))
    return KIND_LABEL[strategy_kind(cfg.trainer)]


# 5. The command.
def table(plans: list[Plan], gpu_sizes: tuple[float, ...] = (24, 48, 80, 141)) -> list[str]:
    names = list(dict.fromkeys(k for p in plans for k in p.rows))
    head = "| per GPU, GB | " + " | ".join(f"{p.trainer} ({p.gpus} GPU{'s' if p.gpus > 1 else ''})" for p in plans) + " |"
    lines = [head, "|---" * (len(plans) + 1) + "|"]
    for k in names:
        lines.append(f"| {k} | " + " | ".join(f"{p.rows[k] / GB:.1f}" if k in p.rows else "-" for p in plans) + " |")
    for ck, label in ((True, "activations, checkpointing per block"), (False, "activations, no checkpointing")):
        lines.append(f"| {label} | " + " | ".join(f"{p.activations[ck] / GB:.1f}" if ck in p.activations else "?"
                                               for p in plans) + " |")  # fmt: skip
    lines.append("| **total (as configured)** | " + " | ".join(
        f"**{p.total() / GB:.1f}** ({'ckpt' if p.checkpointing else 'no ckpt'})" for p in plans) + " |")  # fmt: skip
    lines.append("| host memory per rank (offload) | " + " | ".join(
        f"{sum(p.host.values()) / GB:.1f}" for p in plans) + " |")  # fmt: skip
    lines.append("| fits (GPU GB, 90% usable) | " + " | ".join(
        ", ".join(f"{g:g}" for g in gpu_sizes if p.fits(g)) or "none listed" for p in plans) + " |")  # fmt: skip
    return lines


def parse(argv: list[str]) -> tuple[dict[str, Any], list[str]]:
    opts, overrides = dict(PLAN_KEYS), []
    for a in argv:
        key, _, value = a.partition("=")
        if key in PLAN_KEYS:
            if not value:
                raise UserError(f"{a}: give {key}=VALUE")
            try:
                opts[key] = value.lower() in ("1", "true", "yes") if isinstance(PLAN_KEYS[key], bool) else float(value)
            except ValueError as e:
                raise UserError(f"{key}={value}: not a number") from e
        else:
            overrides.append(a)
    return opts, overrides


def main(argv: list[str] | None = None) -> list[Plan]:
    opts, overrides = parse(sys.argv[1:] if argv is None else argv)
    choice = next((o.split("=", 1)[1] for o in overrides if o.startswith("trainer=")), "cpu")
    names = sorted(p.stem for p in (config.conf_dir() / "trainer").glob("*.yaml")) if choice == "all" else [choice]
    rest = [o for o in overrides if not o.startswith("trainer=")]
    gpus, gpu_gb = int(opts["gpus"]), float(opts["gpu_gb"])
    plans: list[Plan] = []
    counts = activations = None
    skipped = []
    for name in names:
        cfg = config.load("train", [f"trainer={name}", "data.train_shards=x", *rest])
        if choice == "all" and lora_settings(cfg) and strategy_kind(cfg.trainer) in ("zero2", "zero3"):
            skipped.append(name)  # LoRA is refused under DeepSpeed
            continue
        clip = tuple(int(opts[k] or cfg.model.get(k2) or d) for k, k2, d in
                     (("frames", "num_frames", 9), ("height", "height", 96), ("width", "width", 64)))  # fmt: skip
        counts = counts or count(cfg)
        plan = make_plan(cfg, name, gpus, clip, int(opts["batch_size"]), bool(opts["precomputed"]),
                         bool(opts["measure"]), counts, activations)  # fmt: skip
        activations = plan.activations if opts["measure"] else None  # one measurement serves every config
        plans.append(plan)
    model = cfg.model.get("name", "model")
    print(f"Memory plan: {model}, {counts.total / 1e9:.2f} B parameters ({counts.trainable / 1e9:.2f} B trainable), "
          f"clip {clip[0]} x {clip[1]} x {clip[2]}, batch {int(opts['batch_size'])} per GPU, "
          f"{'precomputed shards (no T5)' if opts['precomputed'] else 'raw shards (T5 loaded)'}")  # fmt: skip
    lora = lora_settings(cfg)
    if lora:
        print(f"LoRA rank {lora['rank']}: adapters and the pose branch trained in full, the base frozen in "
              f"{counts.frozen_dtype}" + (f" (not run under DeepSpeed: {', '.join(skipped)} left out)" if skipped else ""))
    print("\n".join(table(plans, (24, 48, 80, 141))))
    print(f"\n{plans[0].source}; weights, gradients, optimizer state and encoders counted from the parameters "
          "(formula per strategy). 'fits' keeps 10% of the GPU for the CUDA context, fragmentation and NCCL.")  # fmt: skip
    for p in plans:
        verdict = "fits" if p.fits(gpu_gb) else "does NOT fit"
        print(f"trainer={p.trainer}: {p.total() / GB:.1f} GB per GPU -> {verdict} {gpu_gb:g} GB")
    return plans


if __name__ == "__main__":
    try:
        main()
    except UserError as e:
        sys.exit(f"plan: {e}")

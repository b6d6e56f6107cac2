"""LightningModule: the DynamiCtrl training recipe (DESIGN.md §4).

v-prediction as in CogVideoX fine-tuning: the model's output v gives x0 through the scheduler's
`get_velocity(v, noisy, t)`, and the loss is (x0 - latents)^2 weighted by 1 / (1 - alpha_bar_t).
The reference frame is noised in pixel space with sigma = exp(N(mean, std)) and dropped with a small
probability; captions can be dropped for classifier-free guidance; in mask mode only the
reference is masked to the person, so the background has to come from the text.

The VAE and T5 are frozen and kept out of the module's state, so checkpoints hold the transformer
(and optimizer, and the EMA weights when enabled) only.

Every random draw of a step comes from a generator seeded by (seed, step, rank), so a resumed run
draws what an uninterrupted one would. Precomputed batches (`dynamictrl.train.precompute`) bring
the target/pose latents and the T5 embedding; the clean reference frame is still noised in pixel
space and encoded every step (one frame through the VAE), so the maths is the raw path's.
"""

from __future__ import annotations

import hashlib
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import nn
from torch.nn import functional as F

from dynamictrl.errors import UserError
from dynamictrl.models import latents as Z
from dynamictrl.models.lora import add_lora, check_rank
from dynamictrl.models.pipeline import DynamiCtrlPipeline, folder_settings
from dynamictrl.models.transformer import DynamiCtrlTransformer3DModel
from dynamictrl.train import build


class EMAWeights(nn.Module):
    """An fp32 moving average of the trainable weights, held as buffers so that every strategy's
    checkpoint carries it the way it carries the weights: DTensor shards under FSDP2 (each rank averages
    its own shard), full tensors otherwise. `device="cpu"` keeps the average in host memory (it then
    ignores the strategy's moves and casts); the decay ramps up as min(decay, (1 + n) / (10 + n)).
    """

    def __init__(self, named: list[tuple[str, torch.Tensor]], decay: float, device: str = "same"):
        super().__init__()
        if device not in ("same", "cpu"):
            raise UserError(f"module.ema_device={device}: use same (beside the weights, sharded like them) or cpu")
        self.decay, self.offload, self.names = decay, device == "cpu", [n for n, _ in named]
        for n, p in named:
            t = p.detach().float().clone()
            self.register_buffer(n.replace(".", "-"), t.to("cpu") if self.offload else t)
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))

    def _apply(self, fn: Any, recurse: bool = True) -> EMAWeights:
        if self.offload:  # Lightning / DeepSpeed moving or casting the model leave the CPU average alone
            return self
        super()._apply(fn, recurse)
        for k, b in self._buffers.items():  # stays fp32 whatever dtype the strategy gives the model
            if b is not None and b.is_floating_point() and b.dtype != torch.float32:
                self._buffers[k] = b.float()
        return self

    def tensors(self) -> list[torch.Tensor]:
        return [self._buffers[n.replace(".", "-")] for n in self.names]

    @torch.no_grad()
    def update(self, params: list[torch.Tensor]) -> None:
        n = int(self.updates) + 1
        self.updates.fill_(n)
        decay = min(self.decay, (1 + n) / (10 + n))
        ema = [_local(t) for t in self.tensors()]
        torch._foreach_lerp_(ema, [_local(p.detach()).to(e.device, torch.float32) for e, p in zip(ema, params, strict=True)],
                             1 - decay)  # fmt: skip

    def named_tensors(self) -> list[tuple[str, torch.Tensor]]:
        """(weight name, its average) as held: shards under FSDP2, which `train.export.gathered` makes whole
        one at a time on rank 0 only (the whole fp32 average is 23 GB at 5B)."""
        return list(zip(self.names, self.tensors(), strict=True))


TIMESTEP_SAMPLINGS = ("uniform", "logit_normal")


def draw_timesteps(n: int, num_train_timesteps: int, sampling: str, mean: float, std: float,
                   generator: torch.Generator | None) -> torch.Tensor:  # fmt: skip
    """n training timesteps in [0, num_train_timesteps): uniform, or logit-normal in t / T."""
    if sampling == "uniform":
        return torch.randint(0, num_train_timesteps, (n,), generator=generator)
    u = torch.sigmoid(mean + std * torch.randn(n, generator=generator))
    return (u * num_train_timesteps).long().clamp(0, num_train_timesteps - 1)


def latent_mask(mask: torch.Tensor, size: tuple[int, int, int]) -> torch.Tensor:
    """Person masks (B, T, H, W) -> (B, F, h, w) floats at the latent grid `size` = (F, h, w): 1 where the
    person covers any pixel of a latent position. Latent frame 0 is frame 0 alone, latent frame k
    the next (T - 1) / (F - 1) frames, as the CogVideoX VAE's causal time compression groups them."""
    b, t, hh, ww = mask.shape
    f, h, w = size
    if f < 1 or (t - 1) % max(f - 1, 1) or hh % h or ww % w or (f == 1) != (t == 1):
        raise ValueError(f"masks of {t} frames at {hh}x{ww} do not map onto a latent grid of {f} frames at {h}x{w}")
    m = mask.float()
    frames = [m[:, :1]] + ([m[:, 1:].reshape(b, f - 1, (t - 1) // (f - 1), hh, ww).amax(2)] if f > 1 else [])
    return F.max_pool2d(torch.cat(frames, 1), (hh // h, ww // w))


def check_resume_keys(expected: list[str], saved: Any) -> None:
    """Strict loading is off under LoRA (its checkpoints lack the frozen base): check that what trains is there."""
    missing = [k for k in expected if k not in saved]
    if missing:
        raise UserError(f"resume: the checkpoint lacks {len(missing)} trainable weights (e.g. {missing[0]}); "
                        f"was it trained with the same module.lora settings?")  # fmt: skip


def _is_dtensor(t: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if _is_dtensor(t) else t


def grad_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """The L2 norm of the whole gradient, the same on every rank. A sharded DTensor gradient (FSDP2) is
    part of the tensor on each rank: the squares of the local shards are summed over its mesh (on the
    mesh's device, so a CPU-offloaded one too). A plain one (one process; DDP, after its all-reduce) is
    whole on every rank and is not reduced, which would count it once per rank."""
    import torch.distributed as dist

    shards: list[torch.Tensor] = []
    whole: list[torch.Tensor] = []
    for g in grads:
        (shards if _is_dtensor(g) and any(p.is_shard() for p in g.placements) else whole).append(g)
    whole = [_local(g) for g in whole]  # (a replicated DTensor's local tensor is the whole of it)
    device = _local(grads[0]).device
    square = torch.zeros((), device=device)
    if whole:
        square = square + torch.nn.utils.get_total_norm(whole).float().square().to(device)
    if shards:
        mesh = shards[0].device_mesh
        local = torch.nn.utils.get_total_norm([g.to_local() for g in shards]).float().square()
        local = local.to(mesh.device_type)
        dist.all_reduce(local, group=mesh.get_group())
        square = square + local.to(device)
    return square.sqrt()


def _deepspeed_engine(module: L.LightningModule) -> Any:
    """The DeepSpeed engine training `module`, if any (it keeps the gradients and their norm)."""
    trainer = module._trainer
    return getattr(trainer.strategy, "deepspeed_engine", None) if trainer is not None else None


class DynamiCtrlModule(L.LightningModule):
    """Args:
        model_path: diffusers pipeline folder: DynamiCtrl, a CogVideoX(1.5)-I2V base, or the embedded model.
        control, pose_init: the pose branch (padaln | uvt | cross_attn) and its init for weights the
            checkpoint lacks; None keeps the checkpoint's.
        optimizer, lr_scheduler: partials from Hydra (`_partial_: true`).
        ref_noise_mean, ref_noise_std: log-sigma of the reference's pixel noise.
        ref_drop: probability of zeroing the reference latent.
        text_drop: probability of replacing the caption by "" (the pipeline's negative prompt).
        mask_reference: mask the reference to the person (background control).
        ofs: CogVideoX 1.5's ofs value.
        gradient_checkpointing: recompute each block's activations in the backward pass; "auto" turns
            it on for models over 1B parameters.
        encoder_dtype: dtype of the frozen VAE and T5: auto (bfloat16 under bf16 precisions, else float32).
        precomputed_dir: the folder of precomputed shards when training reads them: T5 is then not loaded;
            a dropped caption takes `DIR/empty_text.npy` (written by precompute; else encoded once).
        weights: "pretrained" (the folder's safetensors) or "random" (the architecture only: the GPU check).
        cache_latents: keep each clip's target and pose latents in memory after the first encoding
            (exact: the VAE is frozen and encodes with the posterior mode; only the noised reference is
            encoded every step). For small datasets such as the demo's.
        ema_decay: keep an exponential moving average of the trainable weights (None: off, as in the
            official recipe). ema_device: "same" (beside the weights, sharded like them) or "cpu".
        seed: with the global step and the rank, seeds each step's random draws.
        lora: `rank` (null or 0: full fine-tuning), `alpha`, `dropout`, `target_modules`, `base_dtype`:
            train LoRA adapters with the base frozen and the pose branch in full (`models/lora.py`).
            Checkpoints then hold the trainable weights (and their EMA) only; the frozen ones come from
            `model_path`. Not under DeepSpeed (use trainer=gpu, ddp or fsdp).
        reference_scaling: how the reference latent is scaled (`diffusers` | `official` | `scaled`, see
            `models.latents`); None: the loaded checkpoint's convention. The export records it.
        pose: False trains the base I2V model: the transformer runs without its pose branch, which
            keeps its initial weights (the tiny I2V base the demo fine-tunes from, `models/embedded.py`).
        timesteps: how training timesteps are drawn: `uniform` (the official recipe) or `logit_normal`
            (t / T = sigmoid(N(timestep_mean, timestep_std)); a positive mean draws more high-noise
            steps, where the layout, and so the pose, decides the prediction).
        base_lr_scale: learning rate of the weights the base checkpoint has, relative to optimizer.lr;
            the pose branch (`new_modules`) keeps optimizer.lr. 1.0: one group, as the official recipe.
        figure_weight: extra loss weight of the latent positions the person covers (the clip's masks,
            `latent_mask`): each position weighs 1 + figure_weight inside the figure and 1 outside,
            normalised per clip so the loss keeps its scale. 0: every position alike (the official
            recipe). Needs the masks: raw shards, not precomputed ones.

    Nothing is loaded in the constructor: `configure_model` (called by the Trainer under the strategy's
    contexts, or directly outside a Trainer) builds the transformer on the meta device, adds the LoRA
    adapters there, lets the strategy shard it, and fills it on the training device from the checkpoint.
    """

    def __init__(
        self,
        model_path: str,
        optimizer: partial,
        lr_scheduler: partial | None = None,
        control: str | None = None,
        pose_init: str | None = None,
        ref_noise_mean: float = -3.0,
        ref_noise_std: float = 0.5,
        ref_drop: float = 0.05,
        text_drop: float = 0.0,
        mask_reference: bool = False,
        ofs: float = 2.0,
        gradient_checkpointing: bool | str = "auto",
        encoder_dtype: str = "auto",
        precomputed_dir: str | None = None,
        weights: str = "pretrained",
        cache_latents: bool = False,
        ema_decay: float | None = None,
        ema_device: str = "same",
        seed: int = 0,
        lora: dict[str, Any] | None = None,
        reference_scaling: str | None = None,
        pose: bool = True,
        timesteps: str = "uniform",
        timestep_mean: float = 0.0,
        timestep_std: float = 1.0,
        base_lr_scale: float = 1.0,
        figure_weight: float = 0.0,
    ):
        super().__init__()
        if weights not in ("pretrained", "random"):
            raise UserError(f"module.weights={weights}: use pretrained or random")
        if timesteps not in TIMESTEP_SAMPLINGS:
            raise UserError(f"module.timesteps={timesteps}: use one of {', '.join(TIMESTEP_SAMPLINGS)}")
        if not timestep_std > 0:
            raise UserError(f"module.timestep_std={timestep_std}: must be positive")
        if not base_lr_scale >= 0:
            raise UserError(f"module.base_lr_scale={base_lr_scale}: must be 0 or more")
        if not figure_weight >= 0:
            raise UserError(f"module.figure_weight={figure_weight}: must be 0 or more")
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        self.optimizer_factory, self.scheduler_factory = optimizer, lr_scheduler
        if reference_scaling not in (None, *Z.REFERENCE_SCALINGS):
            raise UserError(f"module.reference_scaling={reference_scaling}: use one of {', '.join(Z.REFERENCE_SCALINGS)} "
                            "or null (the checkpoint's own)")  # fmt: skip
        self.lora = dict(lora) if lora and lora.get("rank") else None
        if self.lora:
            check_rank(self.lora["rank"])  # the rest is checked against the model in configure_model
            self.strict_loading = False  # checkpoints hold the trainable weights only (on_save_checkpoint)
        self.transformer: DynamiCtrlTransformer3DModel | None = None
        self.ema: EMAWeights | None = None
        object.__setattr__(self, "pipe", None)  # not a submodule: frozen parts stay out of checkpoints
        self.codec: Z.LatentCodec | None = None  # encode/scale/pad as inference does; with the VAE
        self.loading_report: dict[str, list[str]] = {}
        self._latent_cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._empty_text: torch.Tensor | None = None
        self.last_tokens = 0  # tokens (video + text) in the last batch, for throughput logging

    # 1. Building: where each part lives.
    def configure_model(self) -> None:
        if self.transformer is not None:
            return
        hp = self.hparams
        strategy = self._trainer.strategy if self._trainer is not None else None
        device = getattr(strategy, "fill_device", None) or (strategy.root_device if strategy is not None else torch.device("cpu"))
        precision = str(self._trainer.precision) if self._trainer is not None else "32-true"
        choice = {k: v for k, v in (("control", hp.control), ("pose_init", hp.pose_init)) if v}
        config = build.transformer_config(hp.model_path, **choice)
        folder = Path(hp.model_path) / "transformer"
        if self.lora:
            self._check_lora_strategy(strategy, precision)
        if getattr(strategy, "zero_stage_3", False):  # created partitioned inside Lightning's zero.Init
            if hp.ema_decay:
                raise UserError("module.ema_decay: no EMA under DeepSpeed ZeRO-3 (partitioned weights); use trainer=fsdp")
            model = DynamiCtrlTransformer3DModel.from_config(config)
            if hp.weights == "pretrained":
                self.loading_report = build.load_weights_zero3(model, folder, self.global_rank)
            else:  # zero.Init initialised every module as it was created, but the pose branch's own init
                build.init_pose_branch_zero3(model, self.global_rank)
        else:
            from lightning.pytorch.strategies import DeepSpeedStrategy

            # DeepSpeed keeps bf16 weights on the GPU (fp32 master copies in its optimizer): load them so.
            bf16 = isinstance(strategy, DeepSpeedStrategy) and "bf16" in precision
            model = build.empty_transformer(config, torch.bfloat16 if bf16 else torch.float32)
            if self.lora:  # on the meta device, before sharding: the adapters are sharded like the rest
                add_lora(model, **self.lora)
            if hasattr(strategy, "shard"):
                strategy.shard(model)
            if hp.weights == "pretrained":
                self.loading_report = build.load_weights(model, folder, device)
            else:
                build.random_weights(model, device, seed=hp.seed)
            if self.lora:  # peft's default init (A random, B zero: step 0 computes the base), from the seed
                build.init_adapters(model, seed=hp.seed)
        if self.checkpointing(model):
            model.enable_gradient_checkpointing()
        model.train()
        self.transformer = model
        with build.outside_zero_init():  # frozen encoders whole, never partitioned by ZeRO-3
            self._build_frozen(build.frozen_dtype(hp.encoder_dtype, precision))
        if hp.ema_decay:
            self.ema = EMAWeights(self.trainable(), hp.ema_decay, hp.ema_device)

    def _check_lora_strategy(self, strategy: Any, precision: str) -> None:
        from lightning.pytorch.strategies import DeepSpeedStrategy

        if isinstance(strategy, DeepSpeedStrategy):
            raise UserError("module.lora: LoRA trains under trainer=gpu, ddp or fsdp, not DeepSpeed (its bf16 "
                            "engine casts the float32 adapters; sharding a few adapters gains nothing)")  # fmt: skip
        base_dtype = self.lora.get("base_dtype")
        if base_dtype and self._trainer is not None and "mixed" not in precision:
            raise UserError(f"module.lora.base_dtype={base_dtype} needs autocast: "
                            f"trainer.precision=bf16-mixed (got {precision})")  # fmt: skip

    def checkpointing(self, model: torch.nn.Module) -> bool:
        setting = self.hparams.gradient_checkpointing
        if setting == "auto":
            return sum(p.numel() for p in model.parameters()) > 1e9
        return bool(setting)

    def _build_frozen(self, dtype: torch.dtype) -> None:
        hp = self.hparams
        if hp.weights == "random" and not hp.precomputed_dir:
            raise UserError("module.weights=random has no T5 weights: train on precomputed shards")
        with torch.device("cpu"):  # on the CPU until on_fit_start moves what the run needs
            if hp.weights == "random":
                parts = build.load_frozen_configs(hp.model_path, dtype)
            else:
                parts = build.load_frozen(hp.model_path, dtype, text_encoder=not hp.precomputed_dir)
        pipe = DynamiCtrlPipeline(transformer=self.transformer, **parts)
        pipe.apply_settings(folder_settings(hp.model_path))  # a released folder's conventions, dynamictrl.json
        object.__setattr__(self, "pipe", pipe)
        self.codec = pipe.latent_codec(hp.reference_scaling)
        if hp.precomputed_dir:
            text_len = self.transformer.config.max_text_seq_length
            self._empty_text = build.empty_text_embedding(hp.precomputed_dir, hp.model_path, text_len, dtype)

    def on_fit_start(self) -> None:
        self.pipe.vae.to(self.device)
        if self.pipe.text_encoder is not None:  # raw shards only: precomputed ones carry the T5 output
            self.pipe.text_encoder.to(self.device)

    def trainable(self) -> list[tuple[str, torch.nn.Parameter]]:
        return [(n, p) for n, p in self.transformer.named_parameters() if p.requires_grad]

    def step_generator(self, step: int) -> torch.Generator:
        """The generator of one optimisation step: a function of (seed, step, rank) only."""
        digest = hashlib.sha256(f"{self.hparams.seed}-{step}-{self.global_rank}".encode()).digest()
        return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))

    def encode_text(self, captions: list[str]) -> torch.Tensor:
        embeds, _ = self.pipe.encode_prompt(
            captions, do_classifier_free_guidance=False, device=self.device,
            max_sequence_length=self.transformer.config.max_text_seq_length,
        )  # fmt: skip
        return embeds

    def text_embeddings(self, batch: dict[str, Any], captions: list[str]) -> torch.Tensor:
        """(B, L, D): precomputed embeddings (the empty prompt's where dropped), else T5 on the captions."""
        if "text_embeds" not in batch:
            return self.encode_text(captions)
        if self._empty_text is None:  # a module built for raw shards fed precomputed batches
            self._empty_text = self.encode_text([""])[0]
        embeds = batch["text_embeds"]
        empty = self._empty_text.to(embeds)
        dropped = torch.tensor([c == "" for c in captions], device=embeds.device)
        return torch.where(dropped[:, None, None], empty[None], embeds)

    @torch.no_grad()
    def encode_clips(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """Target and pose latents, (B, F, C, h, w) each: precomputed, cached, or encoded now."""
        if "latents" in batch:
            return batch["latents"].float(), batch["pose_latents"].float()
        codec, keys = self.codec, batch.get("key")
        if not self.hparams.cache_latents or keys is None:
            return codec.encode_video(batch["video"]).float(), codec.encode_video(batch["pose"]).float()
        todo = [i for i, k in enumerate(keys) if k not in self._latent_cache]
        if todo:
            target = codec.encode_video(batch["video"][todo])
            pose = codec.encode_video(batch["pose"][todo])
            for j, i in enumerate(todo):
                self._latent_cache[keys[i]] = (target[j].float().cpu(), pose[j].float().cpu())
        pairs = [self._latent_cache[k] for k in keys]
        device = batch["video"].device
        return torch.stack([t for t, _ in pairs]).to(device), torch.stack([p for _, p in pairs]).to(device)

    def loss(self, batch: dict[str, Any], generator: torch.Generator | None = None) -> torch.Tensor:
        """The training loss for one batch: raw (video/pose (B, 3, T, H, W) in [-1, 1], mask (B, T, H, W),
        caption) or precomputed (latents, pose_latents, text_embeds, ref (B, 3, H, W), ref_mask, caption)."""
        hp, sched = self.hparams, self.pipe.scheduler
        ref = batch["ref"] if "ref" in batch else batch["video"][:, :, 0]  # (B, 3, H, W)
        b, device = ref.shape[0], ref.device

        def rand(*shape):
            return torch.rand(*shape, generator=generator, device="cpu").to(device)

        # 1. Conditions through the frozen encoders.
        if hp.mask_reference:
            person = batch["ref_mask"] if "ref_mask" in batch else batch["mask"][:, 0]  # (B, H, W)
            ref = torch.where(person[:, None].to(device), ref, torch.full_like(ref, -1.0))
        sigma = torch.exp(hp.ref_noise_mean + hp.ref_noise_std * torch.randn(b, generator=generator).to(device))
        ref = ref + sigma[:, None, None, None] * torch.randn(ref.shape, generator=generator).to(device)
        captions = ["" if float(rand(1)) < hp.text_drop else c for c in batch["caption"]]
        with torch.no_grad():
            target, pose_lat = self.encode_clips(batch)  # (B, F, C, h, w) each
            n_lat = target.shape[1]
            image_lat = self.codec.encode_reference(ref, n_lat).float()
            keep = (rand(b) >= hp.ref_drop).to(image_lat.dtype)
            image_lat = image_lat * keep[:, None, None, None, None]
            text = self.text_embeddings(batch, captions)

        # 2. Noise the target at the drawn timesteps.
        p_t = self.transformer.config.patch_size_t
        target_p, pose_p, image_p = (self.codec.pad(x) for x in (target, pose_lat, image_lat))
        noise = torch.randn(target_p.shape, generator=generator).to(device)
        t = draw_timesteps(b, sched.config.num_train_timesteps, hp.timesteps, hp.timestep_mean, hp.timestep_std,
                           generator).to(device)  # fmt: skip
        noisy = sched.add_noise(target_p, noise, t)

        # 3. Predict v; recover x0 and weight as in CogVideoX fine-tuning.
        h, w = ref.shape[-2:]
        p = self.transformer.config.patch_size
        self.last_tokens = b * (noisy.shape[1] // (p_t or 1) * (noisy.shape[3] // p) * (noisy.shape[4] // p) + text.shape[1])
        rotary = (self.pipe._prepare_rotary_positional_embeddings(h, w, noisy.shape[1], device)
                  if self.transformer.config.use_rotary_positional_embeddings else None)  # fmt: skip
        ofs = noisy.new_full((1,), hp.ofs) if self.transformer.config.ofs_embed_dim else None
        v = self.transformer(
            hidden_states=torch.cat([noisy, image_p], dim=2), encoder_hidden_states=text, timestep=t, ofs=ofs,
            image_rotary_emb=rotary, control_hidden_states=pose_p if hp.pose else None, return_dict=False,
        )[0].float()  # fmt: skip
        # (v is bf16 under autocast; x0, the targets and the loss stay fp32)
        x0 = sched.get_velocity(v, noisy, t)
        alpha_bar = sched.alphas_cumprod.to(device, torch.float32)[t]  # float64 in the scheduler
        weight = (1 / (1 - alpha_bar)).view(b, 1, 1, 1, 1)
        se = weight * (self.codec.unpad(x0, n_lat) - target) ** 2  # (B, F, C, h, w)
        if hp.figure_weight:
            if "mask" not in batch:
                raise UserError(f"module.figure_weight={hp.figure_weight} needs the clips' person masks, which "
                                "precomputed shards do not carry: train from the raw shards or set it to 0")  # fmt: skip
            w = 1 + hp.figure_weight * latent_mask(batch["mask"], target.shape[1:2] + target.shape[3:])  # (B, F, h, w)
            return ((se.mean(2) * w).mean(dim=(1, 2, 3)) / w.mean(dim=(1, 2, 3))).mean()
        return se.mean(dim=(1, 2, 3, 4)).mean()

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        accumulate = self.trainer.accumulate_grad_batches
        micro_step = self.global_step * accumulate + batch_idx % accumulate
        loss = self.loss(batch, generator=self.step_generator(micro_step))
        self.log("train/loss", loss, prog_bar=True, on_step=True, batch_size=len(batch["caption"]))
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], on_step=True)
        return loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if _deepspeed_engine(self) is not None:  # its gradients are partitioned inside it: see optimizer_step
            return
        grads = [p.grad for _, p in self.trainable() if p.grad is not None]
        if grads:  # before clipping
            self.log("train/grad_norm", grad_norm(grads), on_step=True)

    # EMA: updated after each optimizer step; its buffers ride in the checkpoint with the weights.
    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        engine = _deepspeed_engine(self)
        if engine is not None and engine.get_global_grad_norm() is not None:  # its step computed it (unclipped)
            self.log("train/grad_norm", float(engine.get_global_grad_norm()), on_step=True)
        if self.ema is not None:
            self.ema.update([p for _, p in self.trainable()])

    # LoRA: checkpoints hold what trains (and its EMA); the frozen base is model_path's, and saving it
    # at every checkpoint would cost GBs at 5B. Under FSDP2 the strategy loads such a checkpoint partially.
    def checkpoint_keys(self) -> list[str]:
        """The state-dict keys a LoRA checkpoint holds: the trainable weights and the EMA buffers."""
        keys = [f"transformer.{n}" for n, _ in self.trainable()]
        return keys + ([f"ema.{k}" for k in self.ema.state_dict()] if self.ema is not None else [])

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.lora:
            keep = set(self.checkpoint_keys())
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.lora and "state_dict" in checkpoint:  # (FSDP2: the strategy checked the shards' keys)
            check_resume_keys(self.checkpoint_keys(), checkpoint["state_dict"])

    def configure_optimizers(self) -> Any:
        params = [p for p in self.transformer.parameters() if p.requires_grad]
        scale = self.hparams.base_lr_scale
        if scale != 1.0:  # two groups: the pose branch at optimizer.lr, the base's weights scaled
            branch = tuple(f"{name}." for name in self.transformer.new_modules())
            named = self.trainable()
            pose = [p for n, p in named if n.startswith(branch)]
            rest = [p for n, p in named if not n.startswith(branch)]
            lr = self.optimizer_factory.keywords["lr"]
            params = [{"params": pose}, {"params": rest, "lr": lr * scale}]
        opt = self.optimizer_factory(params)
        if self.scheduler_factory is None:
            return opt
        sched = self.scheduler_factory(opt, num_training_steps=self.trainer.max_steps)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

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
from typing import Any

import lightning as L
import torch

from dynamictrl.errors import UserError
from dynamictrl.models.lora import add_lora
from dynamictrl.models.pipeline import DynamiCtrlPipeline
from dynamictrl.models.transformer import DynamiCtrlTransformer3DModel


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
        cache_latents: keep each clip's target and pose latents in memory after the first encoding
            (exact: the VAE is frozen and encodes with the posterior mode; only the noised reference is
            encoded every step). For small datasets such as the demo's.
        ema_decay: keep an exponential moving average of the trainable weights (None: off, as in the
            official recipe); the decay ramps up as min(ema_decay, (1 + n) / (10 + n)) over updates n.
        seed: with the global step and the rank, seeds each step's random draws.
        lora: `rank` (null or 0: full fine-tuning), `alpha`, `dropout`, `target_modules`, `base_dtype`:
            train LoRA adapters with the base frozen and the pose branch in full (`models/lora.py`).
            Checkpoints then hold the trainable weights only; the frozen ones come from `model_path`.
        reference_scaling: how the reference latent is scaled (`diffusers` | `official` | `scaled`, see
            `models.latents`); None: the loaded checkpoint's convention. The export records it.
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
        gradient_checkpointing: bool = False,
        cache_latents: bool = False,
        ema_decay: float | None = None,
        seed: int = 0,
        lora: dict[str, Any] | None = None,
        reference_scaling: str | None = None,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        self.optimizer_factory, self.scheduler_factory = optimizer, lr_scheduler
        choice = {k: v for k, v in (("control", control), ("pose_init", pose_init)) if v}
        self.transformer = DynamiCtrlTransformer3DModel.from_pretrained(model_path, subfolder="transformer", **choice)
        self.lora = dict(lora) if lora and lora.get("rank") else None
        if self.lora:
            add_lora(self.transformer, **self.lora)
            self.strict_loading = False  # checkpoints hold the trainable weights only (on_save_checkpoint)
        if gradient_checkpointing:
            self.transformer.enable_gradient_checkpointing()
        pipe = DynamiCtrlPipeline.from_pretrained(model_path, transformer=self.transformer)
        pipe.vae.requires_grad_(False).eval()
        pipe.text_encoder.requires_grad_(False).eval()
        object.__setattr__(self, "pipe", pipe)  # not a submodule: frozen parts stay out of checkpoints
        self.codec = pipe.latent_codec(reference_scaling)  # encode/scale/pad as inference does
        self.transformer.train()
        self._latent_cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._empty_text: torch.Tensor | None = None
        self.ema: dict[str, torch.Tensor] | None = None
        self._ema_updates = 0
        self.last_tokens = 0  # tokens (video + text) in the last batch, for throughput logging

    def on_fit_start(self) -> None:
        if self.lora and self.lora.get("base_dtype") and "mixed" not in str(self.trainer.precision):
            raise UserError(f"module.lora.base_dtype={self.lora['base_dtype']} needs autocast: "
                            f"trainer.precision=bf16-mixed (got {self.trainer.precision})")  # fmt: skip
        self.pipe.vae.to(self.device)
        self.pipe.text_encoder.to(self.device)
        if self.hparams.ema_decay and self.ema is None:
            self.ema = {n: p.detach().clone().float() for n, p in self.trainable()}
        elif self.ema is not None:
            self.ema = {n: t.to(self.device) for n, t in self.ema.items()}

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
        if self._empty_text is None:
            self._empty_text = self.encode_text([""])[0]
        dropped = torch.tensor([c == "" for c in captions], device=self.device)
        embeds = batch["text_embeds"].to(self._empty_text)
        return torch.where(dropped[:, None, None], self._empty_text[None], embeds)

    @torch.no_grad()
    def encode_clips(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """Target and pose latents, (B, F, C, h, w) each: precomputed, cached, or encoded now."""
        if "latents" in batch:
            dtype = self.pipe.vae.dtype
            return batch["latents"].to(dtype), batch["pose_latents"].to(dtype)
        codec, keys = self.codec, batch.get("key")
        if not self.hparams.cache_latents or keys is None:
            return codec.encode_video(batch["video"]), codec.encode_video(batch["pose"])
        todo = [i for i, k in enumerate(keys) if k not in self._latent_cache]
        if todo:
            target = codec.encode_video(batch["video"][todo])
            pose = codec.encode_video(batch["pose"][todo])
            for j, i in enumerate(todo):
                self._latent_cache[keys[i]] = (target[j].cpu(), pose[j].cpu())
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
            image_lat = self.codec.encode_reference(ref, n_lat)
            keep = (rand(b) >= hp.ref_drop).to(image_lat.dtype)
            image_lat = image_lat * keep[:, None, None, None, None]
            text = self.text_embeddings(batch, captions)

        # 2. Noise the target at uniform timesteps.
        p_t = self.transformer.config.patch_size_t
        target_p, pose_p, image_p = (self.codec.pad(x) for x in (target, pose_lat, image_lat))
        noise = torch.randn(target_p.shape, generator=generator).to(device)
        t = torch.randint(0, sched.config.num_train_timesteps, (b,), generator=generator).to(device)
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
            image_rotary_emb=rotary, control_hidden_states=pose_p, return_dict=False,
        )[0]  # fmt: skip
        x0 = sched.get_velocity(v, noisy, t)
        alpha_bar = sched.alphas_cumprod.to(device)[t]
        weight = (1 / (1 - alpha_bar)).view(b, 1, 1, 1, 1)
        err = (weight * (self.codec.unpad(x0, n_lat) - target) ** 2).mean(dim=(1, 2, 3, 4))
        return err.mean()

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        accumulate = self.trainer.accumulate_grad_batches
        micro_step = self.global_step * accumulate + batch_idx % accumulate
        loss = self.loss(batch, generator=self.step_generator(micro_step))
        self.log("train/loss", loss, prog_bar=True, on_step=True, batch_size=len(batch["caption"]))
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], on_step=True)
        return loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        grads = [p.grad for _, p in self.trainable() if p.grad is not None]
        if grads:  # before clipping; rank-local under sharded strategies
            self.log("train/grad_norm", torch.nn.utils.get_total_norm(grads), on_step=True)

    # EMA: updated after each optimizer step, saved in the checkpoint, exported by the train app.
    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        if self.ema is not None:
            n = self._ema_updates = self._ema_updates + 1
            decay = min(self.hparams.ema_decay, (1 + n) / (10 + n))
            names, params = zip(*self.trainable(), strict=True)
            torch._foreach_lerp_([self.ema[k] for k in names], [p.detach().float() for p in params], 1 - decay)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.lora:  # the frozen base is model_path's: saving it at every checkpoint would cost GBs at 5B
            keep = {f"transformer.{n}" for n, _ in self.trainable()}
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        if self.ema is not None:
            checkpoint["ema"] = {"updates": self._ema_updates, "state": {k: v.cpu() for k, v in self.ema.items()}}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        missing = [n for n, _ in self.trainable() if f"transformer.{n}" not in checkpoint["state_dict"]]
        if self.lora and missing:  # strict loading is off under LoRA: check the trainable part ourselves
            raise UserError(f"resume: the checkpoint lacks {len(missing)} trainable weights (e.g. {missing[0]}); "
                            f"was it trained with the same module.lora settings?")  # fmt: skip
        if "ema" in checkpoint and self.hparams.ema_decay:
            self._ema_updates, self.ema = checkpoint["ema"]["updates"], dict(checkpoint["ema"]["state"])

    def configure_optimizers(self) -> Any:
        params = [p for p in self.transformer.parameters() if p.requires_grad]
        opt = self.optimizer_factory(params)
        if self.scheduler_factory is None:
            return opt
        sched = self.scheduler_factory(opt, num_training_steps=self.trainer.max_steps)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

"""DynamiCtrlPipeline: reference image + pose video + prompt -> video.

A diffusers `DiffusionPipeline` (subclass of `CogVideoXImageToVideoPipeline`, whose prompt
encoding and rotary embeddings it reuses), loadable with `DynamiCtrlPipeline.from_pretrained(folder)`.
The pose video goes through the same VAE as the reference; guidance is text-only CFG. Latents are
encoded, scaled, padded and decoded by `models.latents.LatentCodec`, as in training.

`from_pretrained` also takes a released DynamiCtrl folder (its transformer's config names the class
`DynamiCtrlTransformerModel`): the parts are loaded one by one, whatever its `model_index.json` names,
the transformer strictly. Each loaded pipeline carries `settings`, what animate defaults to: the
released inference's for a released folder, else the folder's `dynamictrl.json`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKLCogVideoX, CogVideoXDPMScheduler
from diffusers.pipelines.cogvideo.pipeline_cogvideox_image2video import CogVideoXImageToVideoPipeline
from diffusers.pipelines.cogvideo.pipeline_output import CogVideoXPipelineOutput
from diffusers.utils.torch_utils import randn_tensor

from dynamictrl.models import latents as Z
from dynamictrl.models.transformer import DynamiCtrlTransformer3DModel

RELEASED_CLASS = "DynamiCtrlTransformerModel"  # `_class_name` in the released transformer's config.json
# The released checkpoints' native settings (the official inference: 37 frames, 16 fps, 768x1360 both
# ways, the reference latent unscaled).
RELEASED_SETTINGS = {"num_frames": 37, "fps": 16, "buckets": [[768, 1360], [1360, 768]],
                     "reference_scaling": "official", "layout": "released"}  # fmt: skip
SETTINGS_FILE = "dynamictrl.json"


def is_released_layout(folder: str | Path) -> bool:
    """Whether a pipeline folder holds a released DynamiCtrl transformer (by its config's class name)."""
    config = Path(folder) / "transformer" / "config.json"
    return config.is_file() and json.loads(config.read_text()).get("_class_name") == RELEASED_CLASS


def read_settings(folder: str | Path) -> dict[str, Any]:
    """A model folder's `dynamictrl.json` (what animate should default to), or {}."""
    path = Path(folder) / SETTINGS_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def folder_settings(folder: str | Path) -> dict[str, Any]:
    """A model folder's defaults for animate and training: a released folder's native settings, then its
    `dynamictrl.json` over them."""
    return (dict(RELEASED_SETTINGS) if is_released_layout(folder) else {}) | read_settings(folder)


def load_released_transformer(folder: str | Path, **kwargs: Any) -> DynamiCtrlTransformer3DModel:
    """A released transformer folder, strictly: every checkpoint key used, every model weight loaded."""
    model, info = DynamiCtrlTransformer3DModel.from_pretrained(folder, output_loading_info=True, **kwargs)
    bad = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if bad:
        listed = "; ".join(f"{k}: {', '.join(map(str, v[:3]))}{' ...' if len(v) > 3 else ''}" for k, v in bad.items())
        raise ValueError(f"{folder}: not the released DynamiCtrl layout ({listed})")
    return model


class DynamiCtrlPipeline(CogVideoXImageToVideoPipeline):
    """Components: tokenizer, text_encoder (T5), vae (CogVideoX), transformer (DynamiCtrl), scheduler.

    Attributes:
        settings: the model's defaults for animate (`num_frames`, `buckets`, `fps`, `reference_scaling`, ...).
    """

    _callback_tensor_inputs = ["latents", "prompt_embeds", "negative_prompt_embeds"]
    settings: dict[str, Any] = {}  # replaced per instance by `from_pretrained` / `apply_settings`

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, **kwargs: Any) -> DynamiCtrlPipeline:
        """A diffusers pipeline folder of ours or a CogVideoX-I2V base, or a released DynamiCtrl folder."""
        folder = Path(pretrained_model_name_or_path)
        if is_released_layout(folder):
            pipe = cls._from_released(folder, **kwargs)
        else:
            pipe = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        pipe.apply_settings(folder_settings(folder))
        return pipe

    @classmethod
    def _from_released(cls, folder: Path, **kwargs: Any) -> DynamiCtrlPipeline:
        from transformers import AutoTokenizer, T5EncoderModel

        dtype = kwargs.pop("torch_dtype", None)
        typed = {"torch_dtype": dtype} if dtype is not None else {}
        loaders = {
            "transformer": lambda: load_released_transformer(folder / "transformer", **typed),
            "vae": lambda: AutoencoderKLCogVideoX.from_pretrained(folder / "vae", **typed),
            "text_encoder": lambda: T5EncoderModel.from_pretrained(folder / "text_encoder", **({"dtype": dtype} if dtype else {})),
            "tokenizer": lambda: AutoTokenizer.from_pretrained(folder / "tokenizer"),
            "scheduler": lambda: CogVideoXDPMScheduler.from_pretrained(folder / "scheduler"),
        }  # fmt: skip
        unknown = set(kwargs) - set(loaders)
        if unknown:
            raise ValueError(f"{folder}: a released folder takes only components as arguments, not {sorted(unknown)}")
        parts = {name: kwargs[name] if name in kwargs else load() for name, load in loaders.items()}
        pipe = cls(**parts)
        pipe.register_to_config(_name_or_path=str(folder))
        return pipe

    def apply_settings(self, settings: dict[str, Any]) -> None:
        """Set the model's defaults (merged over the current ones); checks `reference_scaling`."""
        merged = {**self.settings, **settings}
        Z.LatentCodec(self.vae, reference_scaling=merged.get("reference_scaling", "diffusers"))  # validates
        self.settings = merged

    @property
    def reference_scaling(self) -> str:
        """The reference-latent convention this model expects (see `models.latents`)."""
        return self.settings.get("reference_scaling", "diffusers")

    def latent_codec(self, reference_scaling: str | None = None, frame_trim: str | None = None) -> Z.LatentCodec:
        """The latent codec of this VAE and transformer; `reference_scaling` None: the model's own;
        `frame_trim` None: `aligned`."""
        p_t = self.transformer.config.patch_size_t if self.transformer is not None else None
        return Z.LatentCodec(self.vae, p_t, reference_scaling or self.reference_scaling, frame_trim or "aligned")

    def check_positional_range(self, height: int, width: int) -> None:
        """CogVideoX 1.5's RoPE covers at most sample_height x sample_width latents; say so clearly."""
        tc = self.transformer.config
        if tc.patch_size_t is None or not tc.use_rotary_positional_embeddings:
            return
        max_h, max_w = tc.sample_height * self.vae_scale_factor_spatial, tc.sample_width * self.vae_scale_factor_spatial
        if height > max_h or width > max_w:
            raise ValueError(f"resolution {height}x{width} exceeds this model's positional range {max_h}x{max_w}")

    @torch.no_grad()
    def __call__(
        self,
        image: np.ndarray | torch.Tensor,
        pose_video: np.ndarray | torch.Tensor,
        prompt: str | None = None,
        negative_prompt: str = "",
        num_inference_steps: int = 25,
        guidance_scale: float = 3.0,
        reference_mask: np.ndarray | None = None,
        generator: torch.Generator | None = None,
        latents: torch.Tensor | None = None,
        ofs: float = 2.0,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        output_type: str = "np",
        return_dict: bool = True,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ("latents",),
        max_sequence_length: int | None = None,
        cfg_separate_passes: bool = False,
        reference_scaling: str | None = None,
        frame_trim: str | None = None,
        sample_posterior: bool = False,
    ) -> CogVideoXPipelineOutput | tuple:
        """Animate one reference image.

        Args:
            image: (H, W, 3) uint8 reference, resized to the pose video's size if needed.
            pose_video: (T, H, W, 3) uint8 rendered pose; T must be valid for the model version
                (`LatentCodec.check_frames`: 8k+1 on CogVideoX 1.0, 4k+1 on 1.5) and H, W divisible by
                the VAE stride times the patch size. Its first pose should be the reference's own.
            prompt: the caption; `negative_prompt` is the unconditional text for CFG.
            guidance_scale: text-only CFG scale; 1 disables CFG.
            reference_mask: optional (H, W) bool person mask; the reference is blacked out around the
                person so that the text decides the background.
            latents: optional (1, F, C, h, w) starting noise.
            ofs: CogVideoX 1.5's ofs value (ignored by 1.0 models).
            output_type: "np" for (T, H, W, 3) uint8 frames, "latent" for the final latents.
            cfg_separate_passes: run the unconditional and the text pass one after the other instead of
                as one batch of two (same result, about half the activation memory).
            reference_scaling: `diffusers` | `official` | `scaled` (see `models.latents`); None: the
                loaded model's (`settings`).
            frame_trim: `aligned` (default: decoded frame i follows pose i) | `official` (the official
                script's first T of T+3 decoded frames, 3 frames behind; only for reproducing its outputs).
            sample_posterior: encode with VAE posterior samples drawn from `generator` (the reference,
                then the pose video, both before the starting noise: the official inference's order)
                instead of the posterior modes (default: deterministic conditioning).

        Returns:
            `CogVideoXPipelineOutput` whose `frames` is a list with one (T, H, W, 3) uint8 array of exactly
            T frames (the pose video's), or with output_type="latent" the (1, F, C, h, w) latents.
        """
        device = self._execution_device
        codec = self.latent_codec(reference_scaling, frame_trim)
        pose = np.asarray(pose_video)
        if pose.ndim != 4 or pose.shape[-1] != 3:
            raise ValueError(f"pose_video must be (T, H, W, 3); got shape {pose.shape}")
        num_frames, height, width = pose.shape[:3]
        codec.check_frames(num_frames)
        codec.check_resolution(height, width, self.transformer.config.patch_size)
        self.check_positional_range(height, width)
        max_sequence_length = max_sequence_length or self.transformer.config.max_text_seq_length
        if prompt is None and prompt_embeds is None:
            raise ValueError("a prompt (or prompt_embeds) is required")

        # 1. Text: prompt and, for CFG, the negative prompt.
        do_cfg = guidance_scale > 1.0
        prompt_embeds, negative_prompt_embeds = self.encode_prompt(
            prompt=prompt, negative_prompt=negative_prompt, do_classifier_free_guidance=do_cfg,
            prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
            max_sequence_length=max_sequence_length, device=device,
        )  # fmt: skip
        dtype = prompt_embeds.dtype
        text = torch.cat([negative_prompt_embeds, prompt_embeds]) if do_cfg else prompt_embeds

        # 2. Reference, then pose, through the shared VAE (with `sample_posterior` the order is the
        # generator's draw order, and both draws come before the noise's).
        ref = np.asarray(image)
        if reference_mask is not None:
            ref = ref * np.asarray(reference_mask, dtype=bool)[..., None]
        ref_t = Z.frames_to_tensor(ref[None], device).squeeze(1)[None]  # (1, 3, H, W)
        if ref_t.shape[-2:] != (height, width):
            ref_t = F.interpolate(ref_t, size=(height, width), mode="bilinear", align_corners=False)
        n_lat = codec.latent_frames(num_frames)
        posterior = {"sample": sample_posterior, "generator": generator}
        image_lat = codec.encode_reference(ref_t, n_lat, **posterior).to(dtype)  # (1, F, C, h, w)
        pose_lat = codec.encode_video(Z.frames_to_tensor(pose, device)[None], **posterior).to(dtype)  # (1, F, C, h, w)
        pose_lat, image_lat = codec.pad(pose_lat), codec.pad(image_lat)  # (1, F', C, h, w), F' % patch_size_t == 0

        # 3. Noise and timesteps (trailing spacing is in the scheduler config).
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.scheduler.timesteps
        if latents is None:
            latents = randn_tensor(pose_lat.shape, generator=generator, device=device, dtype=dtype)
        elif latents.shape != pose_lat.shape:
            raise ValueError(f"latents has shape {tuple(latents.shape)}; expected {tuple(pose_lat.shape)}")
        latents = latents.to(device, dtype) * self.scheduler.init_noise_sigma
        rotary = (
            self._prepare_rotary_positional_embeddings(height, width, latents.size(1), device)
            if self.transformer.config.use_rotary_positional_embeddings
            else None
        )
        ofs_t = latents.new_full((1,), ofs) if self.transformer.config.ofs_embed_dim else None
        extra = self.prepare_extra_step_kwargs(generator, 0.0)
        self._guidance_scale, self._interrupt, self._num_timesteps = guidance_scale, False, len(timesteps)
        reps = 2 if do_cfg else 1
        cond_image, cond_pose = image_lat.repeat(reps, 1, 1, 1, 1), pose_lat.repeat(reps, 1, 1, 1, 1)

        # 4. Denoising loop.
        old_x0 = None
        with self.progress_bar(total=len(timesteps)) as bar:
            for i, t in enumerate(timesteps):
                model_in = self.scheduler.scale_model_input(latents.repeat(reps, 1, 1, 1, 1), t)
                model_in = torch.cat([model_in, cond_image], dim=2)  # (B, F, 2C, h, w)
                passes = [slice(0, 1), slice(1, 2)] if do_cfg and cfg_separate_passes else [slice(0, reps)]
                v = torch.cat([
                    self.transformer(
                        hidden_states=model_in[p], encoder_hidden_states=text[p], timestep=t.expand(p.stop - p.start),
                        ofs=ofs_t, image_rotary_emb=rotary, control_hidden_states=cond_pose[p], return_dict=False,
                    )[0].float()
                    for p in passes
                ])  # fmt: skip
                if do_cfg:
                    v_uncond, v_text = v.chunk(2)
                    v = v_uncond + guidance_scale * (v_text - v_uncond)
                if isinstance(self.scheduler, CogVideoXDPMScheduler):
                    prev_t = timesteps[i - 1] if i > 0 else None
                    latents, old_x0 = self.scheduler.step(v, old_x0, t, prev_t, latents, **extra, return_dict=False)
                else:
                    latents = self.scheduler.step(v, t, latents, **extra, return_dict=False)[0]
                latents = latents.to(dtype)
                if callback_on_step_end is not None:
                    scope = {"latents": latents, "prompt_embeds": prompt_embeds,
                             "negative_prompt_embeds": negative_prompt_embeds}  # fmt: skip
                    out = callback_on_step_end(self, i, t, {k: scope[k] for k in callback_on_step_end_tensor_inputs})
                    latents = out.pop("latents", latents)
                bar.update()

        # 5. Decode.
        latents = codec.unpad(latents, n_lat)
        if output_type == "latent":
            video = latents
        else:
            video = [Z.tensor_to_frames(codec.decode(latents, num_frames)[0])]
        self.maybe_free_model_hooks()
        if not return_dict:
            return (video,)
        return CogVideoXPipelineOutput(frames=video)

"""The DynamiCtrl transformer: CogVideoX's MM-DiT with Pose-adaptive LayerNorm (PadaLN).

The pose video is encoded by the same VAE as the target video; its 16-channel latent is doubled to
32 channels and goes through the model's own `patch_embed`, so each pose token lines up with one
video token. In every block, `control_norm1` modulates the pose tokens with shift/scale from the
timestep embedding and adds them to the video part of `norm1`'s output before the joint
text-video attention. The modulated pose stream, gated (`y + gate * y`), is handed to the next
block; attention and the feed-forward never update it.

Weight names follow the released checkpoints: `transformer_blocks.N.control_norm1.{linear,norm}.*`.

The paper's ablation variants (Table 3) are chosen with `control`:
- `uvt`: the pose latent is concatenated on channels (48 = 16 noisy + 16 image + 16 pose); the
  patch embedding is widened and its pretrained part loaded (the pose columns start at zero);
- `cross_attn`: one extra attention layer per block, queries from the video tokens, keys and values
  from the pose tokens, with its own timestep modulation (`norm_cross`) and a gated residual.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.configuration_utils import register_to_config
from diffusers.models.attention import Attention
from diffusers.models.attention_processor import AttnProcessor2_0
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.modeling_utils import ModelMixin  # noqa: F401  (diffusers' pipeline loader looks it up here)
from diffusers.models.normalization import CogVideoXLayerNormZero
from diffusers.models.transformers.cogvideox_transformer_3d import CogVideoXBlock, CogVideoXTransformer3DModel
from diffusers.utils import logging
from torch import nn

logger = logging.get_logger(__name__)
CONTROL_MODES = ("padaln", "uvt", "cross_attn")
POSE_INITS = ("official", "zero")


class PoseAdaptiveLayerNorm(nn.Module):
    """LN(pose) * (1 + scale) + shift, with (shift, scale, gate) = Linear(SiLU(temb)).

    Args:
        conditioning_dim: width of the timestep embedding.
        embedding_dim: token width.
    """

    def __init__(self, conditioning_dim: int, embedding_dim: int, elementwise_affine: bool = True,
                 eps: float = 1e-5, bias: bool = True):  # fmt: skip
        super().__init__()
        self.silu = nn.SiLU()
        self.linear = nn.Linear(conditioning_dim, 3 * embedding_dim, bias=bias)
        self.norm = nn.LayerNorm(embedding_dim, eps=eps, elementwise_affine=elementwise_affine)

    def forward(self, control: torch.Tensor, temb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """control: (B, N, D) pose tokens; temb: (B, T). Returns the modulated tokens and the gate (B, 1, D)."""
        shift, scale, gate = self.linear(self.silu(temb)).chunk(3, dim=1)
        return self.norm(control) * (1 + scale[:, None]) + shift[:, None], gate[:, None]


class DynamiCtrlBlock(CogVideoXBlock):
    """A CogVideoX block with a pose branch: PadaLN (`control_norm1`, added before the joint attention),
    a pose cross-attention (`attn2`), or none (UVT carries the pose in the video tokens)."""

    def __init__(self, dim: int, num_attention_heads: int, attention_head_dim: int, time_embed_dim: int,
                 control: str = "padaln", **kwargs):  # fmt: skip
        super().__init__(dim, num_attention_heads, attention_head_dim, time_embed_dim, **kwargs)
        affine, eps = kwargs.get("norm_elementwise_affine", True), kwargs.get("norm_eps", 1e-5)
        self.control = control
        if control == "padaln":
            self.control_norm1 = PoseAdaptiveLayerNorm(time_embed_dim, dim, affine, eps)
        elif control == "cross_attn":
            self.norm_cross = CogVideoXLayerNormZero(time_embed_dim, dim, affine, eps, bias=True)
            self.attn2 = Attention(query_dim=dim, cross_attention_dim=dim, dim_head=attention_head_dim,
                                   heads=num_attention_heads, qk_norm="layer_norm", eps=1e-6, bias=True,
                                   out_bias=True, processor=AttnProcessor2_0())  # fmt: skip

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        temb: torch.Tensor,
        control_hidden_states: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
        attention_kwargs: dict[str, Any] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """hidden_states (B, N, D), encoder_hidden_states (B, L, D), control_hidden_states (B, N, D) or None.

        Returns the updated video and text tokens and the pose stream for the next block.
        """
        text_len = encoder_hidden_states.size(1)
        attention_kwargs = attention_kwargs or {}
        use_pose = control_hidden_states is not None

        # 1. Norm and modulate; PadaLN adds the pose here.
        norm_hs, norm_enc, gate_msa, enc_gate_msa = self.norm1(hidden_states, encoder_hidden_states, temb)
        if use_pose and self.control == "padaln":
            control, control_gate = self.control_norm1(control_hidden_states, temb)
            norm_hs = norm_hs + control
            # The stream keeps the dtype it came in (the patch embedding's: bf16 under autocast or FSDP2's
            # bf16 params); autocast's LayerNorm returns fp32, which would double its memory in every block.
            control_hidden_states = (control + control_gate * control).to(control_hidden_states.dtype)

        # 2. Joint text-video attention.
        attn_hs, attn_enc = self.attn1(
            hidden_states=norm_hs, encoder_hidden_states=norm_enc, image_rotary_emb=image_rotary_emb,
            **attention_kwargs,
        )  # fmt: skip
        hidden_states = hidden_states + gate_msa * attn_hs
        encoder_hidden_states = encoder_hidden_states + enc_gate_msa * attn_enc

        # 3. Cross-attention variant: video tokens attend to the pose tokens.
        if use_pose and self.control == "cross_attn":
            norm_hs, _, gate_ca, _ = self.norm_cross(hidden_states, encoder_hidden_states, temb)
            hidden_states = hidden_states + gate_ca * self.attn2(norm_hs, encoder_hidden_states=control_hidden_states)

        # 4. Feed-forward over text and video tokens together.
        norm_hs, norm_enc, gate_ff, enc_gate_ff = self.norm2(hidden_states, encoder_hidden_states, temb)
        ff_out = self.ff(torch.cat([norm_enc, norm_hs], dim=1))
        hidden_states = hidden_states + gate_ff * ff_out[:, text_len:]
        encoder_hidden_states = encoder_hidden_states + enc_gate_ff * ff_out[:, :text_len]
        return hidden_states, encoder_hidden_states, control_hidden_states


class DynamiCtrlTransformer3DModel(CogVideoXTransformer3DModel):
    """CogVideoX-I2V transformer with pose control.

    The constructor takes every `CogVideoXTransformer3DModel` argument plus:

    Args:
        control: how the pose enters the model: `"padaln"` (the paper's method), `"uvt"` or
            `"cross_attn"` (the ablation variants).
        pose_init: `"official"` (PyTorch default init, the pose at full strength from step 0) or
            `"zero"` (the pose branch's output starts at exactly zero, so the model first computes what
            the base CogVideoX-I2V model computes).
    """

    _no_split_modules = ["DynamiCtrlBlock", "CogVideoXBlock", "CogVideoXPatchEmbed"]

    @register_to_config
    def __init__(
        self,
        num_attention_heads: int = 30,
        attention_head_dim: int = 64,
        in_channels: int = 16,
        out_channels: int | None = 16,
        flip_sin_to_cos: bool = True,
        freq_shift: int = 0,
        time_embed_dim: int = 512,
        ofs_embed_dim: int | None = None,
        text_embed_dim: int = 4096,
        num_layers: int = 30,
        dropout: float = 0.0,
        attention_bias: bool = True,
        sample_width: int = 90,
        sample_height: int = 60,
        sample_frames: int = 49,
        patch_size: int = 2,
        patch_size_t: int | None = None,
        temporal_compression_ratio: int = 4,
        max_text_seq_length: int = 226,
        activation_fn: str = "gelu-approximate",
        timestep_activation_fn: str = "silu",
        norm_elementwise_affine: bool = True,
        norm_eps: float = 1e-5,
        spatial_interpolation_scale: float = 1.875,
        temporal_interpolation_scale: float = 1.0,
        use_rotary_positional_embeddings: bool = False,
        use_learned_positional_embeddings: bool = False,
        patch_bias: bool = True,
        control: str = "padaln",
        pose_init: str = "official",
    ):
        if control not in CONTROL_MODES:
            raise ValueError(f"control={control!r} is not available; choose one of {CONTROL_MODES}")
        if pose_init not in POSE_INITS:
            raise ValueError(f"pose_init={pose_init!r} is not valid; choose one of {POSE_INITS}")
        super().__init__(
            num_attention_heads=num_attention_heads, attention_head_dim=attention_head_dim,
            in_channels=in_channels, out_channels=out_channels, flip_sin_to_cos=flip_sin_to_cos,
            freq_shift=freq_shift, time_embed_dim=time_embed_dim, ofs_embed_dim=ofs_embed_dim,
            text_embed_dim=text_embed_dim, num_layers=num_layers, dropout=dropout, attention_bias=attention_bias,
            sample_width=sample_width, sample_height=sample_height, sample_frames=sample_frames,
            patch_size=patch_size, patch_size_t=patch_size_t, temporal_compression_ratio=temporal_compression_ratio,
            max_text_seq_length=max_text_seq_length, activation_fn=activation_fn,
            timestep_activation_fn=timestep_activation_fn, norm_elementwise_affine=norm_elementwise_affine,
            norm_eps=norm_eps, spatial_interpolation_scale=spatial_interpolation_scale,
            temporal_interpolation_scale=temporal_interpolation_scale,
            use_rotary_positional_embeddings=use_rotary_positional_embeddings,
            use_learned_positional_embeddings=use_learned_positional_embeddings, patch_bias=patch_bias,
        )  # fmt: skip
        inner_dim = num_attention_heads * attention_head_dim
        self.transformer_blocks = nn.ModuleList(
            DynamiCtrlBlock(
                inner_dim, num_attention_heads, attention_head_dim, time_embed_dim, control=control, dropout=dropout,
                activation_fn=activation_fn, attention_bias=attention_bias,
                norm_elementwise_affine=norm_elementwise_affine, norm_eps=norm_eps,
            )  # fmt: skip
            for _ in range(num_layers)
        )
        if control == "uvt":
            self.patch_embed.proj = self._widened_proj(self.patch_embed.proj, in_channels // 2)
        self.init_pose_branch()
        self.loading_report: dict[str, list[str]] = {}

    def _widened_proj(self, proj: nn.Module, extra_channels: int) -> nn.Module:
        """The patch projection with `extra_channels` more input channels (the pose latent for UVT).
        1.0 uses a Conv2d over channels; 1.5 a Linear over (channel, t, y, x) patches, channel-major."""
        if isinstance(proj, nn.Conv2d):
            return nn.Conv2d(proj.in_channels + extra_channels, proj.out_channels, proj.kernel_size,
                             proj.stride, bias=proj.bias is not None)  # fmt: skip
        per_channel = proj.in_features // self.config.in_channels
        return nn.Linear(proj.in_features + extra_channels * per_channel, proj.out_features, bias=proj.bias is not None)

    def new_modules(self) -> dict[str, nn.Module]:
        """The pose branch, by name: modules (or widened parts) that a base CogVideoX checkpoint lacks."""
        out = {}
        for i, block in enumerate(self.transformer_blocks):
            for name in ("control_norm1", "attn2", "norm_cross"):
                if hasattr(block, name):
                    out[f"transformer_blocks.{i}.{name}"] = getattr(block, name)
        return out

    @torch.no_grad()
    def init_pose_branch(self) -> None:
        """Initialise the pose branch as `pose_init` says: PyTorch defaults, or an exactly-zero output.
        Not while DeepSpeed ZeRO-3 holds the parameters partitioned (created inside `zero.Init`: each rank
        has an empty piece); its loader calls this again with them gathered."""
        if any(hasattr(p, "ds_id") and p.numel() == 0 for p in self.parameters()):
            return
        for module in self.new_modules().values():
            for m in module.modules():
                if hasattr(m, "reset_parameters"):
                    m.reset_parameters()
        if self.config.control == "uvt":
            proj = self.patch_embed.proj
            base = self._base_proj_width()
            nn.init.zeros_(proj.weight[:, base:])
        if self.config.pose_init == "zero":
            self.zero_pose_branch()

    def _base_proj_width(self) -> int:
        proj = self.patch_embed.proj
        if isinstance(proj, nn.Conv2d):
            return self.config.in_channels
        return proj.in_features * self.config.in_channels // (self.config.in_channels + self.latent_channels)

    @property
    def latent_channels(self) -> int:
        """Channels of one VAE latent (the I2V input is the noisy latent and the image latent concatenated)."""
        return self.config.in_channels // 2

    @torch.no_grad()
    def zero_pose_branch(self) -> None:
        """Make the pose branch's output exactly zero, so the pose changes nothing until training moves it.

        PadaLN: its linear and LayerNorm affine are zero, so LN(c)(1+scale)+shift = 0. Cross-attention:
        its output projection is zero. UVT: the pose columns of the patch embedding are zero.
        """
        for block in self.transformer_blocks:
            if hasattr(block, "control_norm1"):
                nn.init.zeros_(block.control_norm1.linear.weight)
                nn.init.zeros_(block.control_norm1.linear.bias)
                if block.control_norm1.norm.weight is not None:
                    nn.init.zeros_(block.control_norm1.norm.weight)
                    nn.init.zeros_(block.control_norm1.norm.bias)
            if hasattr(block, "attn2"):
                nn.init.zeros_(block.attn2.to_out[0].weight)
                nn.init.zeros_(block.attn2.to_out[0].bias)
        if self.config.control == "uvt":
            nn.init.zeros_(self.patch_embed.proj.weight[:, self._base_proj_width() :])

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs) -> DynamiCtrlTransformer3DModel:
        """Load DynamiCtrl weights, or a CogVideoX(1.5)-I2V transformer as a base.

        With a base, the pose branch is missing from the checkpoint: it is initialised as `pose_init`
        says, and `model.loading_report` lists the missing and unexpected keys. For `control="uvt"`
        the checkpoint's patch embedding fills the first input channels of the widened one.
        """
        want_info = kwargs.pop("output_loading_info", False)
        uvt = kwargs.get("control") == "uvt"
        if uvt:
            kwargs["ignore_mismatched_sizes"] = True
            kwargs["low_cpu_mem_usage"] = False
        model, info = super().from_pretrained(pretrained_model_name_or_path, output_loading_info=True, **kwargs)
        new = tuple(model.new_modules())
        missing = [k for k in info["missing_keys"] if k.startswith(new)]
        if missing:  # a base checkpoint: materialise and initialise the whole pose branch
            ref = model.patch_embed.proj.weight
            for module in model.new_modules().values():
                if any(p.is_meta for p in module.parameters()):
                    module.to_empty(device=ref.device)
                module.to(ref.dtype)
            model.init_pose_branch()
        if uvt and any(k[0] == "patch_embed.proj.weight" for k in info.get("mismatched_keys", [])):
            model._load_base_patch_embed(pretrained_model_name_or_path, kwargs.get("subfolder"))
            info["mismatched_keys"] = [k for k in info["mismatched_keys"] if k[0] != "patch_embed.proj.weight"]
            info["missing_keys"] = sorted(set(info["missing_keys"]) | {"patch_embed.proj.weight[pose channels]"})
        model.loading_report = {k: list(v) for k, v in info.items()}
        return (model, info) if want_info else model

    @torch.no_grad()
    def _load_base_patch_embed(self, folder, subfolder: str | None) -> None:
        from pathlib import Path

        from safetensors import safe_open

        root = Path(folder) / (subfolder or "")
        for f in sorted(root.glob("*.safetensors")):
            with safe_open(str(f), framework="pt") as st:
                if "patch_embed.proj.weight" in st.keys():
                    w = st.get_tensor("patch_embed.proj.weight").to(self.patch_embed.proj.weight.dtype)
                    self.patch_embed.proj.weight[:, : w.shape[1]] = w
                    return
        raise ValueError(f"{root}: no patch_embed.proj.weight to widen for UVT")

    def check_latent_shape(self, shape: torch.Size | tuple[int, ...], name: str = "hidden_states") -> None:
        """Raise a ValueError naming the problem if a (B, F, C, H, W) latent cannot be patchified."""
        if len(shape) != 5:
            raise ValueError(f"{name} must be (B, F, C, H, W); got shape {tuple(shape)}")
        _, f, _, h, w = shape
        p, p_t = self.config.patch_size, self.config.patch_size_t
        if h % p or w % p:
            raise ValueError(f"{name}: latent size {h}x{w} is not divisible by the patch size {p}")
        if p_t is not None and f % p_t:
            raise ValueError(f"{name}: {f} latent frames is not divisible by the temporal patch size {p_t}")

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        timestep: int | float | torch.Tensor,
        ofs: int | float | torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
        control_hidden_states: torch.Tensor | None = None,
        return_dict: bool = True,
        timestep_cond: torch.Tensor | None = None,
        attention_kwargs: dict[str, Any] | None = None,
    ) -> tuple[torch.Tensor] | Transformer2DModelOutput:
        """Predict v for the noisy video.

        Args:
            hidden_states: (B, F, 2C, H, W): the noisy latent and the reference-image latent on channels.
            encoder_hidden_states: (B, L, text_embed_dim) T5 embeddings.
            timestep: (B,) diffusion timesteps.
            ofs: (B,) or (1,) the CogVideoX 1.5 "ofs" value (2.0 in the official inference); None for 1.0.
            image_rotary_emb: (cos, sin), each (N, head_dim), from the pipeline.
            control_hidden_states: (B, F, C, H, W) pose latents; None runs the base model.

        Returns:
            (B, F, C, H, W) model output (v-prediction).
        """
        self.check_latent_shape(hidden_states.shape)
        batch, frames, channels, height, width = hidden_states.shape
        if channels != self.config.in_channels:
            raise ValueError(f"hidden_states has {channels} channels; this model takes {self.config.in_channels} "
                             "(the noisy latent and the reference latent)")
        if control_hidden_states is not None and (
            control_hidden_states.shape[:2] != hidden_states.shape[:2]
            or control_hidden_states.shape[2] != self.latent_channels
            or control_hidden_states.shape[3:] != hidden_states.shape[3:]
        ):
            raise ValueError(
                f"control_hidden_states has shape {tuple(control_hidden_states.shape)}; expected "
                f"{(batch, frames, self.latent_channels, height, width)}"
            )

        # 0. Inputs in the weights' dtype where no autocast casts them. (FSDP2 is told not to cast inputs,
        #    so that the RoPE cos/sin stay fp32 as in inference: apply_rotary_emb computes in fp32.)
        dtype = self.patch_embed.proj.weight.dtype
        if hidden_states.dtype != dtype and not torch.is_autocast_enabled(hidden_states.device.type):
            hidden_states, encoder_hidden_states = hidden_states.to(dtype), encoder_hidden_states.to(dtype)
            if control_hidden_states is not None:
                control_hidden_states = control_hidden_states.to(dtype)

        # 1. Timestep (and ofs) embedding.
        t_emb = self.time_proj(timestep).to(dtype=hidden_states.dtype)
        emb = self.time_embedding(t_emb, timestep_cond)
        if self.ofs_embedding is not None:
            if ofs is None:
                raise ValueError("this model has an ofs embedding (CogVideoX 1.5): pass ofs (2.0 for inference)")
            emb = emb + self.ofs_embedding(self.ofs_proj(ofs).to(dtype=hidden_states.dtype))

        # 2. Patch embedding: video and pose tokens through the same projection (UVT: one token stream).
        text_len = encoder_hidden_states.shape[1]
        control = self.config.control
        if control == "uvt":
            pose = control_hidden_states if control_hidden_states is not None else torch.zeros_like(hidden_states[:, :, : self.latent_channels])
            hidden_states = torch.cat([hidden_states, pose], dim=2)  # (B, F, 3C, H, W)
        tokens = self.embedding_dropout(self.patch_embed(encoder_hidden_states, hidden_states))
        encoder_tokens, video_tokens = tokens[:, :text_len], tokens[:, text_len:]
        pose_tokens = None
        if control_hidden_states is not None and control != "uvt":
            doubled = torch.cat([control_hidden_states, control_hidden_states], dim=2)  # (B, F, 2C, H, W)
            pose_tokens = self.embedding_dropout(self.patch_embed(encoder_hidden_states, doubled))[:, text_len:]

        # 3. Transformer blocks.
        for block in self.transformer_blocks:
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                video_tokens, encoder_tokens, pose_tokens = self._gradient_checkpointing_func(
                    block, video_tokens, encoder_tokens, emb, pose_tokens, image_rotary_emb, attention_kwargs
                )
            else:
                video_tokens, encoder_tokens, pose_tokens = block(
                    video_tokens, encoder_tokens, emb, pose_tokens, image_rotary_emb, attention_kwargs
                )

        # 4. Output head.
        out = self.proj_out(self.norm_out(self.norm_final(video_tokens), temb=emb))

        # 5. Unpatchify to (B, F, C, H, W).
        p, p_t = self.config.patch_size, self.config.patch_size_t
        if p_t is None:
            out = out.reshape(batch, frames, height // p, width // p, -1, p, p)
            out = out.permute(0, 1, 4, 2, 5, 3, 6).flatten(5, 6).flatten(3, 4)
        else:
            out = out.reshape(batch, frames // p_t, height // p, width // p, -1, p_t, p, p)
            out = out.permute(0, 1, 5, 4, 2, 6, 3, 7).flatten(6, 7).flatten(4, 5).flatten(1, 2)
        if not return_dict:
            return (out,)
        return Transformer2DModelOutput(sample=out)

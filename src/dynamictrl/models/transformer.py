"""The DynamiCtrl transformer: CogVideoX's MM-DiT with Pose-adaptive LayerNorm (PadaLN).

The pose video is encoded by the same VAE as the target video; its 16-channel latent is doubled to
32 channels and goes through the model's own `patch_embed`, so each pose token lines up with one
video token. In every block, `control_norm1` modulates the pose tokens with shift/scale from the
timestep embedding and adds them to the video part of `norm1`'s output before the joint
text-video attention. The modulated pose stream, gated (`y + gate * y`), is handed to the next
block; attention and the feed-forward never update it.

Weight names follow the released checkpoints: `transformer_blocks.N.control_norm1.{linear,norm}.*`.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.configuration_utils import register_to_config
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.modeling_utils import ModelMixin  # noqa: F401  (diffusers' pipeline loader looks it up here)
from diffusers.models.transformers.cogvideox_transformer_3d import CogVideoXBlock, CogVideoXTransformer3DModel
from torch import nn

CONTROL_MODES = ("padaln",)
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
    """A CogVideoX block with a PadaLN branch that adds the pose tokens before the joint attention."""

    def __init__(self, dim: int, num_attention_heads: int, attention_head_dim: int, time_embed_dim: int, **kwargs):
        super().__init__(dim, num_attention_heads, attention_head_dim, time_embed_dim, **kwargs)
        self.control_norm1 = PoseAdaptiveLayerNorm(
            time_embed_dim, dim, kwargs.get("norm_elementwise_affine", True), kwargs.get("norm_eps", 1e-5)
        )

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

        # 1. Norm and modulate; the pose enters here.
        norm_hs, norm_enc, gate_msa, enc_gate_msa = self.norm1(hidden_states, encoder_hidden_states, temb)
        if control_hidden_states is not None:
            control, control_gate = self.control_norm1(control_hidden_states, temb)
            norm_hs = norm_hs + control
            control_hidden_states = control + control_gate * control

        # 2. Joint text-video attention.
        attn_hs, attn_enc = self.attn1(
            hidden_states=norm_hs, encoder_hidden_states=norm_enc, image_rotary_emb=image_rotary_emb,
            **attention_kwargs,
        )  # fmt: skip
        hidden_states = hidden_states + gate_msa * attn_hs
        encoder_hidden_states = encoder_hidden_states + enc_gate_msa * attn_enc

        # 3. Feed-forward over text and video tokens together.
        norm_hs, norm_enc, gate_ff, enc_gate_ff = self.norm2(hidden_states, encoder_hidden_states, temb)
        ff_out = self.ff(torch.cat([norm_enc, norm_hs], dim=1))
        hidden_states = hidden_states + gate_ff * ff_out[:, text_len:]
        encoder_hidden_states = encoder_hidden_states + enc_gate_ff * ff_out[:, :text_len]
        return hidden_states, encoder_hidden_states, control_hidden_states


class DynamiCtrlTransformer3DModel(CogVideoXTransformer3DModel):
    """CogVideoX-I2V transformer with pose control.

    The constructor takes every `CogVideoXTransformer3DModel` argument plus:

    Args:
        control: how the pose enters the model; `"padaln"` (the paper's method).
        pose_init: `"official"` (PyTorch default init, the pose at full strength from step 0) or
            `"zero"` (PadaLN's output starts at exactly zero, so the model first computes what the base
            CogVideoX-I2V model computes).
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
                inner_dim, num_attention_heads, attention_head_dim, time_embed_dim, dropout=dropout,
                activation_fn=activation_fn, attention_bias=attention_bias,
                norm_elementwise_affine=norm_elementwise_affine, norm_eps=norm_eps,
            )  # fmt: skip
            for _ in range(num_layers)
        )
        if pose_init == "zero":
            self.zero_pose_branch()

    @property
    def latent_channels(self) -> int:
        """Channels of one VAE latent (the I2V input is the noisy latent and the image latent concatenated)."""
        return self.config.in_channels // 2

    @torch.no_grad()
    def zero_pose_branch(self) -> None:
        """Make every PadaLN output exactly zero, so the pose changes nothing until training moves it."""
        for block in self.transformer_blocks:
            nn.init.zeros_(block.control_norm1.linear.weight)
            nn.init.zeros_(block.control_norm1.linear.bias)
            if block.control_norm1.norm.weight is not None:
                nn.init.zeros_(block.control_norm1.norm.weight)
                nn.init.zeros_(block.control_norm1.norm.bias)

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
        batch, frames, _, height, width = hidden_states.shape
        if control_hidden_states is not None and (
            control_hidden_states.shape[:2] != hidden_states.shape[:2]
            or control_hidden_states.shape[2] != self.latent_channels
            or control_hidden_states.shape[3:] != hidden_states.shape[3:]
        ):
            raise ValueError(
                f"control_hidden_states has shape {tuple(control_hidden_states.shape)}; expected "
                f"{(batch, frames, self.latent_channels, height, width)}"
            )

        # 1. Timestep (and ofs) embedding.
        t_emb = self.time_proj(timestep).to(dtype=hidden_states.dtype)
        emb = self.time_embedding(t_emb, timestep_cond)
        if self.ofs_embedding is not None:
            if ofs is None:
                raise ValueError("this model has an ofs embedding (CogVideoX 1.5): pass ofs (2.0 for inference)")
            emb = emb + self.ofs_embedding(self.ofs_proj(ofs).to(dtype=hidden_states.dtype))

        # 2. Patch embedding: video and pose tokens through the same projection.
        text_len = encoder_hidden_states.shape[1]
        tokens = self.embedding_dropout(self.patch_embed(encoder_hidden_states, hidden_states))
        encoder_tokens, video_tokens = tokens[:, :text_len], tokens[:, text_len:]
        pose_tokens = None
        if control_hidden_states is not None:
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

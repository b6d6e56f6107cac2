"""The latent codec: one object that owns how pixels become latents and back, for training, precompute
and inference alike (encode, scaling, temporal padding, decode and the frame policy).

Frame arithmetic of the CogVideoX VAE (diffusers 0.42, `AutoencoderKLCogVideoX`): time is compressed
by r = 4 and T = 4k+1 frames encode to n = k+1 latent frames (frame 0 alone, then groups of 4). The
decoder works on pairs of latent frames; an odd n decodes to 4n-3 = T frames, an even n to 4n = T+3
frames, the first latent frame being spread over 4 decoded frames instead of 1.

Frame policy per model version:
- CogVideoX 1.0 (no temporal patch, `patch_size_t=None`): T = 8k+1 (odd n), decoded exactly.
- CogVideoX 1.5 (`patch_size_t=2`): T = 4k+1.
  - 8k+1 (odd n, e.g. 41 -> 11): the first latent frame is repeated in front to make n even for the
    temporal patch, as diffusers' 1.5 I2V pipeline does, and dropped again before decoding.
  - 8k+5 (even n, e.g. 37 -> 10, the released DynamiCtrl's length): no padding; all n latent frames
    are decoded together, as the official pipeline decodes them, to T+3 frames; the 3 leading ones
    (the extra copies of frame 0) are dropped, so decoded frame i lines up with input (pose) frame i.
    The official script keeps the first T decoded frames instead, which lags the poses by 3 frames;
    `frame_trim="official"` does the same (part of animate's `preset=official`, which reproduces it).

Reference scaling (`reference_scaling`): how the reference image's latent is scaled before it is
concatenated with the noisy latent. Target and pose latents are always multiplied by the VAE's
scaling factor; for the reference the conventions differ on CogVideoX 1.5 VAEs
(`invert_scale_latents=True`); on 1.0 VAEs all three multiply.
- `diffusers`: divided by the scaling factor (diffusers' CogVideoX 1.5 I2V pipeline);
- `official`: left unscaled (the released DynamiCtrl inference);
- `scaled`: multiplied (the official DynamiCtrl training, and every CogVideoX 1.0 pipeline).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import AutoencoderKLCogVideoX

REFERENCE_SCALINGS = ("diffusers", "official", "scaled")
FRAME_TRIMS = ("aligned", "official")  # which T of the T+3 decoded frames an even latent count keeps


@dataclass
class LatentCodec:
    """Encode, scale, pad/unpad, decode and the frame policy for one VAE and one transformer layout.

    Args:
        vae: the (frozen) CogVideoX VAE.
        patch_size_t: the transformer's temporal patch size (2 on CogVideoX 1.5, None on 1.0).
        reference_scaling: `diffusers` | `official` | `scaled` (see the module docstring).
        frame_trim: `aligned` (the last T decoded frames: frame i is pose i) | `official` (the first T,
            as the official inference script keeps them: 3 frames behind the poses).
    """

    vae: AutoencoderKLCogVideoX
    patch_size_t: int | None = None
    reference_scaling: str = "diffusers"
    frame_trim: str = "aligned"

    def __post_init__(self) -> None:
        if self.reference_scaling not in REFERENCE_SCALINGS:
            raise ValueError(f"reference_scaling={self.reference_scaling!r} is not valid; choose one of {REFERENCE_SCALINGS}")
        if self.frame_trim not in FRAME_TRIMS:
            raise ValueError(f"frame_trim={self.frame_trim!r} is not valid; choose one of {FRAME_TRIMS}")

    # 1. Frame policy.
    @property
    def ratio(self) -> int:
        """Temporal compression of the VAE (4 for CogVideoX)."""
        return int(self.vae.config.temporal_compression_ratio)

    @property
    def version(self) -> str:
        return "CogVideoX 1.0" if not self.patch_size_t else "CogVideoX 1.5"

    def latent_frames(self, num_frames: int) -> int:
        """Latent frames the VAE encodes `num_frames` (4k+1) frames to."""
        return (num_frames - 1) // self.ratio + 1

    def is_valid(self, num_frames: int) -> bool:
        """Whether a clip of `num_frames` runs through this model and decodes to exactly that many frames."""
        if num_frames < 1 or (num_frames - 1) % self.ratio:
            return False
        n = self.latent_frames(num_frames)
        return n % 2 == 1 or bool(self.patch_size_t and n % self.patch_size_t == 0)

    def rule(self) -> str:
        """The valid set in words: '4k+1 frames' (1.5) or '8k+1 frames' (1.0)."""
        return f"{self.ratio if self.patch_size_t else 2 * self.ratio}k+1 frames"

    def valid_frame_counts(self, upto: int = 200) -> list[int]:
        """Every valid clip length up to `upto`."""
        return [t for t in range(1, upto + 1) if self.is_valid(t)]

    def check_frames(self, num_frames: int, name: str = "num_frames") -> None:
        """Raise a one-line ValueError naming the nearest valid counts if `num_frames` is not valid."""
        if self.is_valid(num_frames):
            return
        valid = self.valid_frame_counts(max(num_frames, 1) + 4 * self.ratio)
        lower = max((v for v in valid if v < num_frames), default=None)
        upper = min(v for v in valid if v > num_frames)
        near = f"{lower} or {upper}" if lower else f"{upper}"
        raise ValueError(f"{name}={num_frames} is not valid for this {self.version} model (needs {self.rule()}); "
                         f"nearest valid: {near}")  # fmt: skip

    def check_resolution(self, height: int, width: int, patch_size: int) -> None:
        """Raise a one-line ValueError if the frame size is not divisible by VAE stride x patch size."""
        factor = 2 ** (len(self.vae.config.block_out_channels) - 1) * patch_size
        if height % factor or width % factor:
            raise ValueError(
                f"resolution {height}x{width} is not divisible by {factor} (VAE stride x patch size); "
                f"try {height // factor * factor or factor}x{width // factor * factor or factor}"
            )

    # 2. Encode and scale.
    @property
    def scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor)

    def reference_factor(self) -> float:
        """What the reference image's latent is multiplied by, per `reference_scaling`."""
        sf = self.scaling_factor
        if not self.vae.config.invert_scale_latents or self.reference_scaling == "scaled":
            return sf
        return 1.0 if self.reference_scaling == "official" else 1.0 / sf

    def _latent(self, pixels: torch.Tensor, sample: bool, generator: torch.Generator | None) -> torch.Tensor:
        dist = self.vae.encode(pixels.to(self.vae.dtype)).latent_dist
        z = dist.sample(generator) if sample else dist.mode()
        return z.permute(0, 2, 1, 3, 4)  # (B, F, C, h, w)

    @torch.no_grad()
    def encode_video(self, pixels: torch.Tensor, sample: bool = False,
                     generator: torch.Generator | None = None) -> torch.Tensor:  # fmt: skip
        """(B, 3, T, H, W) pixels in [-1, 1] -> (B, F, C, h, w) latents times the scaling factor."""
        return self._latent(pixels, sample, generator) * self.scaling_factor

    @torch.no_grad()
    def encode_reference(self, image: torch.Tensor, num_latent_frames: int, sample: bool = False,
                         generator: torch.Generator | None = None) -> torch.Tensor:  # fmt: skip
        """(B, 3, H, W) reference in [-1, 1] -> (B, F, C, h, w): its scaled latent in frame 0, zeros after."""
        z = self._latent(image[:, :, None], sample, generator) * self.reference_factor()  # (B, 1, C, h, w)
        pad = z.new_zeros(z.shape[0], num_latent_frames - 1, *z.shape[2:])
        return torch.cat([z, pad], dim=1)

    # 3. Temporal padding for the transformer's patches.
    def pad(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, F, C, h, w) -> (B, F', C, h, w): the first latent frame repeated in front until F' is
        divisible by the temporal patch size (diffusers' CogVideoX 1.5 I2V pipeline does the same)."""
        p_t = self.patch_size_t
        if not p_t or latents.shape[1] % p_t == 0:
            return latents
        extra = p_t - latents.shape[1] % p_t
        return torch.cat([latents[:, :1].expand(-1, extra, -1, -1, -1), latents], dim=1)

    @staticmethod
    def unpad(latents: torch.Tensor, num_latent_frames: int) -> torch.Tensor:
        """Drop the front padding added by `pad`."""
        return latents[:, latents.shape[1] - num_latent_frames :]

    # 4. Decode.
    @torch.no_grad()
    def decode(self, latents: torch.Tensor, num_frames: int | None = None) -> torch.Tensor:
        """(B, F, C, h, w) scaled, unpadded latents -> (B, 3, T, H, W) pixels in [-1, 1].

        All F latent frames go through the VAE together (an even F decodes to 4F frames); the surplus
        frames are dropped so that exactly `num_frames` come out (default: the 4(F-1)+1 frames that F
        latent frames encode): the leading ones (`frame_trim="aligned"`) or the trailing ones
        (`"official"`).
        """
        num_frames = num_frames or self.ratio * (latents.shape[1] - 1) + 1
        z = latents.permute(0, 2, 1, 3, 4) / self.scaling_factor  # (B, C, F, h, w)
        video = self.vae.decode(z.to(self.vae.dtype)).sample.clamp(-1, 1)
        if video.shape[2] < num_frames:
            raise ValueError(f"{latents.shape[1]} latent frames decode to {video.shape[2]} frames, fewer than {num_frames}")
        if self.frame_trim == "official":
            return video[:, :, :num_frames]
        return video[:, :, video.shape[2] - num_frames :]


def frames_to_tensor(frames, device=None, dtype=torch.float32) -> torch.Tensor:
    """(T, H, W, 3) uint8 numpy -> (3, T, H, W) in [-1, 1]."""
    t = torch.as_tensor(frames, device=device).permute(3, 0, 1, 2).to(dtype)
    return t / 127.5 - 1.0


def tensor_to_frames(pixels: torch.Tensor):
    """(3, T, H, W) in [-1, 1] -> (T, H, W, 3) uint8 numpy."""
    return ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 3, 0).cpu().numpy()

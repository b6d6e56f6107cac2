"""VAE encoding shared by training and inference, so both scale and pad latents identically.

Frame arithmetic: the CogVideoX VAE compresses time by 4 and round-trips only clips whose latent
frame count is odd, i.e. 8k+1 frames. CogVideoX 1.5 patches time by 2, so an odd latent count is
padded to even by repeating the first latent frame in front (as diffusers' 1.5 I2V pipeline does);
the padding is dropped again before decoding.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKLCogVideoX


def valid_frame_counts(vae: AutoencoderKLCogVideoX, upto: int = 200) -> list[int]:
    """Frame counts this VAE round-trips exactly (8k+1 with the standard 4x temporal compression)."""
    step = 2 * int(vae.config.temporal_compression_ratio)
    return list(range(1, upto + 1, step))


def check_frame_count(vae: AutoencoderKLCogVideoX, num_frames: int) -> None:
    """Raise a one-line ValueError naming the nearest valid counts if `num_frames` is not valid."""
    valid = valid_frame_counts(vae, max(num_frames, 1) + 16)
    if num_frames not in valid:
        lower = max([v for v in valid if v < num_frames], default=None)
        upper = min(v for v in valid if v > num_frames)
        near = f"{lower} or {upper}" if lower else f"{upper}"
        raise ValueError(
            f"num_frames={num_frames} is not valid for this VAE (needs 8k+1 frames); nearest valid: {near}"
        )


def check_resolution(height: int, width: int, vae: AutoencoderKLCogVideoX, patch_size: int) -> None:
    """Raise a one-line ValueError if the frame size is not divisible by VAE stride x patch size."""
    factor = 2 ** (len(vae.config.block_out_channels) - 1) * patch_size
    if height % factor or width % factor:
        raise ValueError(
            f"resolution {height}x{width} is not divisible by {factor} (VAE stride x patch size); "
            f"try {height // factor * factor or factor}x{width // factor * factor or factor}"
        )


@torch.no_grad()
def encode_video(vae: AutoencoderKLCogVideoX, pixels: torch.Tensor, sample: bool = False,
                 generator: torch.Generator | None = None) -> torch.Tensor:  # fmt: skip
    """(B, 3, T, H, W) pixels in [-1, 1] -> (B, F, C, h, w) latents times the VAE's scaling factor."""
    dist = vae.encode(pixels.to(vae.dtype)).latent_dist
    z = dist.sample(generator) if sample else dist.mode()
    return (z * vae.config.scaling_factor).permute(0, 2, 1, 3, 4)  # (B, F, C, h, w)


@torch.no_grad()
def encode_reference(vae: AutoencoderKLCogVideoX, image: torch.Tensor, num_latent_frames: int,
                     sample: bool = False, generator: torch.Generator | None = None) -> torch.Tensor:  # fmt: skip
    """(B, 3, H, W) reference in [-1, 1] -> (B, F, C, h, w): its latent in frame 0, zeros after.

    CogVideoX 1.5 VAEs (`invert_scale_latents`) were trained with the image latent divided, not
    multiplied, by the scaling factor; we do the same so that released weights see what they expect.
    """
    dist = vae.encode(image[:, :, None].to(vae.dtype)).latent_dist
    z = (dist.sample(generator) if sample else dist.mode()).permute(0, 2, 1, 3, 4)  # (B, 1, C, h, w)
    sf = vae.config.scaling_factor
    z = z / sf if vae.config.invert_scale_latents else z * sf
    pad = z.new_zeros(z.shape[0], num_latent_frames - 1, *z.shape[2:])
    return torch.cat([z, pad], dim=1)


def pad_for_patch_t(latents: torch.Tensor, patch_size_t: int | None) -> torch.Tensor:
    """Repeat the first latent frame in front until F is divisible by the temporal patch size."""
    if not patch_size_t or latents.shape[1] % patch_size_t == 0:
        return latents
    extra = patch_size_t - latents.shape[1] % patch_size_t
    return torch.cat([latents[:, :1].expand(-1, extra, -1, -1, -1), latents], dim=1)


def unpad(latents: torch.Tensor, num_latent_frames: int) -> torch.Tensor:
    """Drop the front padding added by `pad_for_patch_t`."""
    return latents[:, latents.shape[1] - num_latent_frames :]


@torch.no_grad()
def decode_latents(vae: AutoencoderKLCogVideoX, latents: torch.Tensor) -> torch.Tensor:
    """(B, F, C, h, w) scaled latents -> (B, 3, T, H, W) pixels in [-1, 1]."""
    z = latents.permute(0, 2, 1, 3, 4) / vae.config.scaling_factor
    return vae.decode(z.to(vae.dtype)).sample.clamp(-1, 1)


def frames_to_tensor(frames, device=None, dtype=torch.float32) -> torch.Tensor:
    """(T, H, W, 3) uint8 numpy -> (3, T, H, W) in [-1, 1]."""
    t = torch.as_tensor(frames, device=device).permute(3, 0, 1, 2).to(dtype)
    return t / 127.5 - 1.0


def tensor_to_frames(pixels: torch.Tensor):
    """(3, T, H, W) in [-1, 1] -> (T, H, W, 3) uint8 numpy."""
    return ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 3, 0).cpu().numpy()

"""The latent codec: frame policy per model version, decoding to exactly the requested frames, padding,
and the reference-scaling conventions."""

import pytest
import torch
from diffusers import AutoencoderKLCogVideoX

from dynamictrl.models.latents import LatentCodec


def tiny_vae(invert: bool = False, scaling_factor: float = 0.7) -> AutoencoderKLCogVideoX:
    torch.manual_seed(0)
    return AutoencoderKLCogVideoX(
        block_out_channels=(8, 8, 16), latent_channels=16, layers_per_block=1, norm_num_groups=4,
        down_block_types=("CogVideoXDownBlock3D",) * 3, up_block_types=("CogVideoXUpBlock3D",) * 3,
        temporal_compression_ratio=4, invert_scale_latents=invert, scaling_factor=scaling_factor,
    ).eval()  # fmt: skip


@pytest.fixture(scope="module")
def vae():
    return tiny_vae()


def test_valid_frame_counts_per_model_version(vae):
    v15, v10 = LatentCodec(vae, patch_size_t=2), LatentCodec(vae, patch_size_t=None)
    assert v15.valid_frame_counts(45) == [1, 5, 9, 13, 17, 21, 25, 29, 33, 37, 41, 45]  # 4k+1
    assert v10.valid_frame_counts(45) == [1, 9, 17, 25, 33, 41]  # 8k+1
    assert v15.latent_frames(37) == 10 and v15.latent_frames(41) == 11
    with pytest.raises(ValueError, match=r"num_frames=38 is not valid for this CogVideoX 1.5 model \(needs 4k\+1 "
                                         r"frames\); nearest valid: 37 or 41") as err:  # fmt: skip
        v15.check_frames(38)
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match=r"clip_frames=37 is not valid for this CogVideoX 1.0 model \(needs 8k\+1 "
                                         r"frames\); nearest valid: 33 or 41"):  # fmt: skip
        v10.check_frames(37, "clip_frames")
    with pytest.raises(ValueError, match="nearest valid: 1$"):
        v15.check_frames(0)


@pytest.mark.parametrize("num_frames, latents, padded", [(37, 10, 10), (41, 11, 12), (13, 4, 4), (9, 3, 4), (1, 1, 2)])
def test_every_valid_count_runs_through_and_decodes_to_exactly_its_frames(vae, num_frames, latents, padded):
    codec = LatentCodec(vae, patch_size_t=2)
    x = torch.rand(1, 3, num_frames, 16, 16) * 2 - 1
    z = codec.encode_video(x)
    assert z.shape == (1, latents, 16, 4, 4)
    zp = codec.pad(z)
    assert zp.shape[1] == padded and torch.equal(codec.unpad(zp, latents), z)
    assert codec.decode(z, num_frames).shape == (1, 3, num_frames, 16, 16)
    assert codec.decode(z).shape[2] == num_frames  # the default: the frames these latents encode


def test_an_even_latent_count_is_decoded_whole_and_its_extra_leading_frames_dropped(vae):
    """37 frames -> 10 latents -> the VAE decodes all 10 together to 40 frames; the first latent frame
    covers 4 of them, so the 3 leading ones go and decoded frame i lines up with input frame i."""
    codec = LatentCodec(vae, patch_size_t=2)
    z = torch.randn(1, 10, 16, 4, 4)
    with torch.no_grad():
        whole = vae.decode(z.permute(0, 2, 1, 3, 4) / 0.7).sample.clamp(-1, 1)
    assert whole.shape[2] == 40
    torch.testing.assert_close(codec.decode(z, 37), whole[:, :, 3:], rtol=0, atol=0)
    official = LatentCodec(vae, patch_size_t=2, frame_trim="official")  # the official script's trim: the head
    torch.testing.assert_close(official.decode(z, 37), whole[:, :, :37], rtol=0, atol=0)


def test_padding_repeats_the_first_latent_frame_in_front(vae):
    codec = LatentCodec(vae, patch_size_t=2)
    z = torch.randn(2, 3, 16, 4, 4)
    zp = codec.pad(z)
    assert torch.equal(zp[:, 0], z[:, 0]) and torch.equal(zp[:, 1:], z)
    assert codec.pad(torch.randn(2, 4, 16, 4, 4)).shape[1] == 4
    assert LatentCodec(vae, patch_size_t=None).pad(z) is z


@pytest.mark.parametrize("invert, convention, factor", [
    (True, "diffusers", 1 / 0.7), (True, "official", 1.0), (True, "scaled", 0.7),
    (False, "diffusers", 0.7), (False, "official", 0.7), (False, "scaled", 0.7),
])  # fmt: skip
def test_reference_scaling_conventions(invert, convention, factor):
    vae = tiny_vae(invert=invert)
    codec = LatentCodec(vae, patch_size_t=2, reference_scaling=convention)
    image = torch.rand(1, 3, 16, 16) * 2 - 1
    ref = codec.encode_reference(image, 10)
    with torch.no_grad():
        raw = vae.encode(image[:, :, None]).latent_dist.mode().permute(0, 2, 1, 3, 4)
    assert ref.shape == (1, 10, 16, 4, 4) and ref[:, 1:].abs().max() == 0
    torch.testing.assert_close(ref[:, :1], raw * factor)
    torch.testing.assert_close(codec.encode_video(image[:, :, None]), raw * 0.7)  # video latents: always scaled


def test_an_unknown_reference_scaling_is_a_clear_error(vae):
    with pytest.raises(ValueError, match=r"reference_scaling='halved' is not valid; choose one of"):
        LatentCodec(vae, reference_scaling="halved")
    with pytest.raises(ValueError, match=r"frame_trim='middle' is not valid; choose one of"):
        LatentCodec(vae, frame_trim="middle")

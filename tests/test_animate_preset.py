"""animate's `preset` (ours or the official script's settings, a given key winning) and the default VAE
tiling (on when the frame exceeds the VAE's tile, if its tiles reassemble exactly)."""

import pytest
from diffusers import AutoencoderKLCogVideoX

from dynamictrl.animate.run import resolve, vae_tiling
from dynamictrl.errors import UserError
from test_animate_app import animate_cfg


def tiny_vae(blocks: int, **kw) -> AutoencoderKLCogVideoX:
    return AutoencoderKLCogVideoX(block_out_channels=(8,) * (blocks - 1) + (16,), latent_channels=16, layers_per_block=1,
                                  norm_num_groups=4, down_block_types=("CogVideoXDownBlock3D",) * blocks,
                                  up_block_types=("CogVideoXUpBlock3D",) * blocks, **kw)  # fmt: skip


def test_preset_official_sets_the_official_script_values_and_a_given_key_wins():
    ours = resolve(animate_cfg())
    assert (ours["seed"], ours["steps"], ours["frame_trim"], ours["prepend_reference_pose"], ours["resize"]) == (
        0, 25, "aligned", True, "crop")  # fmt: skip
    assert not ours["sample_posterior"] and ours["vae_tiling"] is None and not ours["vae_slicing"]
    official = resolve(animate_cfg(preset="official"))
    assert official == {"seed": 42, "steps": 50, "guidance_scale": 3.0, "frame_trim": "official",
                        "prepend_reference_pose": False, "align": False, "resize": "stretch", "sample_posterior": True,
                        "vae_tiling": None, "vae_slicing": True, "clip_frames": 37, "reference_scaling": "official"}  # fmt: skip
    given = resolve(animate_cfg(preset="official", seed=3, steps=4, prepend_reference_pose=True, frame_trim="aligned"))
    assert (given["seed"], given["steps"], given["prepend_reference_pose"], given["frame_trim"]) == (3, 4, True, "aligned")
    for bad, match in (({"preset": "offical"}, "preset=offical: choose official"), ({"resize": "pad"}, "resize=pad")):
        with pytest.raises(UserError, match=match) as err:
            resolve(animate_cfg(**bad))
        assert "\n" not in str(err.value)


def test_vae_tiling_is_on_by_default_above_the_tile_when_the_tiles_reassemble():
    real = tiny_vae(4)  # CogVideoX's geometry: stride 8, 240x360 tiles
    assert vae_tiling(real, 768, 1360, None) and not vae_tiling(real, 240, 360, None)
    assert not vae_tiling(real, 768, 1360, False) and vae_tiling(real, 96, 64, True)
    odd = tiny_vae(3, sample_height=96, sample_width=64)  # 48x32 tiles that diffusers crops wrongly at stride 4
    assert not vae_tiling(odd, 96, 64, None)
    with pytest.raises(UserError, match="vae_tiling=true: this VAE's 48x32 tiles do not reassemble"):
        vae_tiling(odd, 96, 64, True)
    assert vae_tiling(tiny_vae(3, sample_height=96, sample_width=80), 96, 64, None)  # 48x40 tiles do

"""The embedded model's VAE: fitted once offline, shipped in the package, loaded by every fresh build."""

import json
import math

import numpy as np
import torch

from dynamictrl.data.synthetic import make_video
from dynamictrl.models import embedded
from dynamictrl.pose.render import render_video


def reconstruction_psnr(vae, clips: np.ndarray) -> float:
    x = torch.from_numpy(clips).permute(0, 4, 1, 2, 3).float() / 127.5 - 1  # (N, 3, T, H, W)
    with torch.no_grad():
        rec = vae.decode(vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1)
    return 10 * math.log10(4 / ((rec - x) ** 2).mean().item())


def test_the_shipped_vae_reconstructs_unseen_clips_and_their_poses():
    vae = embedded.shipped_vae()
    assert vae is not None, f"{embedded.VAE_ASSET} is missing or was fitted for another architecture"
    meta = json.loads(embedded.VAE_ASSET.with_suffix(".json").read_text())
    assert meta["fit"]["steps"] == embedded.VAE_STEPS
    # Videos the fit never saw (it drew seeds 10_000 onwards).
    videos = [make_video(90_000 + i, embedded.NUM_FRAMES, embedded.HEIGHT, embedded.WIDTH, 8.0) for i in range(3)]
    frames = np.stack([v["frames"] for v in videos])
    poses = np.stack([render_video(v["kpts"], embedded.HEIGHT, embedded.WIDTH) for v in videos])
    fresh = embedded.AutoencoderKLCogVideoX(**embedded.VAE).eval()
    assert reconstruction_psnr(vae, frames) > reconstruction_psnr(fresh, frames) + 6  # 19.6 vs 11.8 dB
    assert reconstruction_psnr(vae, frames) > meta["fit"]["held_out_psnr"] - 1.5
    assert reconstruction_psnr(vae, poses) > meta["fit"]["held_out_pose_psnr"] - 1.5


def test_the_demo_layout_takes_the_shipped_2x_time_vae_which_reconstructs_clips_better(tmp_path):
    vae = embedded.shipped_vae("demo")
    assert vae is not None, f"{embedded.VAE_T2_ASSET} is missing or was fitted for another architecture"
    assert vae.config.temporal_compression_ratio == 2 and embedded.shipped_vae().config.temporal_compression_ratio == 4
    videos = [make_video(90_000 + i, embedded.NUM_FRAMES, embedded.HEIGHT, embedded.WIDTH, 8.0) for i in range(3)]
    frames = np.stack([v["frames"] for v in videos])
    assert reconstruction_psnr(vae, frames) > reconstruction_psnr(embedded.shipped_vae(), frames) + 1  # 9 frames, 5 latents vs 3
    built = embedded.build(tmp_path / "m", progress=False, layout="demo")
    loaded = embedded.AutoencoderKLCogVideoX.from_pretrained(built / "vae")
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in vae.state_dict().items())


def test_builds_take_the_shipped_vae_unless_told_to_fit(tmp_path):
    shipped = embedded.shipped_vae().state_dict()
    built = embedded.build(tmp_path / "model", progress=False)
    vae = embedded.AutoencoderKLCogVideoX.from_pretrained(built / "vae")
    assert all(torch.equal(vae.state_dict()[k], v) for k, v in shipped.items())
    assert json.loads((built / "BUILD.json").read_text())["vae_fit"]["shipped"] is True
    fitted = embedded.AutoencoderKLCogVideoX.from_pretrained(embedded.build(tmp_path / "fit", vae_steps=1, progress=False) / "vae")
    assert not torch.equal(fitted.state_dict()["encoder.conv_in.conv.weight"], shipped["encoder.conv_in.conv.weight"])


def test_fit_vae_writes_an_asset_that_loads_and_a_foreign_one_is_ignored(tmp_path, monkeypatch):
    monkeypatch.setattr(embedded, "VAE_ASSET", tmp_path / "assets" / "tiny-vae.safetensors")
    assert embedded.shipped_vae() is None
    meta = embedded.fit_vae_asset(steps=1, progress=False)
    vae = embedded.shipped_vae()
    assert vae is not None and vae.config.scaling_factor == meta["scaling_factor"]
    monkeypatch.setattr(embedded, "VAE", embedded.VAE | {"block_out_channels": (8, 8, 16)})
    assert embedded.shipped_vae() is None  # fitted for another architecture: build fits a new one


def test_fit_base_writes_an_i2v_base_without_pose_branch_that_builds_load(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    monkeypatch.setattr(embedded, "BASE_ASSET", tmp_path / "assets" / "tiny-base.safetensors")
    assert embedded.shipped_base() is None
    meta = embedded.fit_base_asset(steps=2, data_root=tmp_path / "data", progress=False,
                                   preprocess_overrides=["progress=false"], num_train=2, layout="tiny")  # fmt: skip
    assert meta["fit"]["steps"] == 2 and meta["architecture"]["num_layers"] == embedded.TRANSFORMER["num_layers"]
    weights = load_file(embedded.BASE_ASSET)
    pose = tuple(embedded.DynamiCtrlTransformer3DModel(**embedded.TRANSFORMER).new_modules())
    assert weights and not any(k.startswith(pose) for k in weights)  # an I2V base: no pose branch
    built = embedded.DynamiCtrlTransformer3DModel.from_pretrained(embedded.build(tmp_path / "m", progress=False) / "transformer")
    random = embedded.DynamiCtrlTransformer3DModel.from_pretrained(
        embedded.build(tmp_path / "r", progress=False, base=False) / "transformer")
    state, fresh = built.state_dict(), random.state_dict()
    assert all(torch.equal(state[k], v) for k, v in weights.items())  # the base's weights...
    assert any(not torch.equal(fresh[k], v) for k, v in weights.items())  # ...which training moved
    assert all(torch.equal(state[k], fresh[k]) for k in state if k.startswith(pose))  # the pose branch: its seeded init
    monkeypatch.setattr(embedded, "TRANSFORMER", embedded.TRANSFORMER | {"num_layers": 2})
    assert embedded.shipped_base() is None  # fitted for another architecture: the transformer stays random


def test_the_shipped_i2v_base_fits_the_demo_layout_only():
    meta = json.loads(embedded.BASE_ASSET.with_suffix(".json").read_text())
    assert meta["layout"] == embedded.BASE_LAYOUT == "demo" and meta["fit"]["steps"] == embedded.BASE_STEPS
    assert meta["fit"]["loss_last_200"] < meta["fit"]["loss_first_50"] / 3  # it learnt to denoise
    weights = embedded.shipped_base("demo")
    assert weights is not None and embedded.shipped_base("tiny") is None  # another architecture: not loaded
    pose = tuple(embedded.DynamiCtrlTransformer3DModel(**embedded.transformer_config("demo")).new_modules())
    assert not any(k.startswith(pose) for k in weights)

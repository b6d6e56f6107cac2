"""A released DynamiCtrl checkpoint at its native settings: a tiny folder in the released layout (key names,
the transformer's class name, a CogVideoX 1.5 VAE with `invert_scale_latents`) loads strictly, and the whole
pipeline at 37 frames (10 latent frames) equals an independent computation of the official inference."""

import json

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXDPMScheduler
from diffusers.models.embeddings import get_3d_rotary_pos_embed
from PIL import Image
from safetensors import safe_open
from skimage.data import astronaut
from transformers import AutoTokenizer, T5Config, T5EncoderModel

from dynamictrl.animate.run import load_pipeline
from dynamictrl.errors import UserError
from dynamictrl.models import embedded
from dynamictrl.models.pipeline import DynamiCtrlPipeline
from dynamictrl.models.transformer import DynamiCtrlTransformer3DModel
from dynamictrl.utils.video import read_video, write_video
from test_model_fidelity import reference_forward

ARCH = dict(num_attention_heads=2, attention_head_dim=16, in_channels=32, out_channels=16, time_embed_dim=32,
            ofs_embed_dim=32, text_embed_dim=32, num_layers=2, sample_width=24, sample_height=24, sample_frames=81,
            patch_size=2, patch_size_t=2, max_text_seq_length=16, use_rotary_positional_embeddings=True,
            use_learned_positional_embeddings=False, patch_bias=False)  # fmt: skip
SCALING = 0.7
TILE = (48, 40)  # the tiny VAE's tile (h, w): 96x64 frames are encoded and decoded in 2x2 tiles (sizes whose
# overlaps land on whole latents, as the real VAE's 240x360 tile does: diffusers crops wrongly otherwise)


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """A pipeline folder laid out as the released weights are: parts in subfolders, the transformer's config
    naming `DynamiCtrlTransformerModel` without our `control`/`pose_init` keys, a DDIM scheduler config, and a
    model_index.json naming classes of a package we do not have."""
    folder = tmp_path_factory.mktemp("released") / "DynamiCtrl"
    torch.manual_seed(0)
    tokenizer = embedded.build_tokenizer()
    tokenizer.save_pretrained(folder / "tokenizer")
    T5EncoderModel(T5Config(vocab_size=len(tokenizer), **embedded.T5)).eval().save_pretrained(folder / "text_encoder")
    AutoencoderKLCogVideoX(
        block_out_channels=(8, 8, 16), latent_channels=16, layers_per_block=1, norm_num_groups=4,
        down_block_types=("CogVideoXDownBlock3D",) * 3, up_block_types=("CogVideoXUpBlock3D",) * 3,
        temporal_compression_ratio=4, invert_scale_latents=True, scaling_factor=SCALING,
        sample_height=2 * TILE[0], sample_width=2 * TILE[1],  # the VAE's tile is half its sample size
    ).save_pretrained(folder / "vae")  # fmt: skip
    DynamiCtrlTransformer3DModel(**ARCH).save_pretrained(folder / "transformer")
    config = json.loads((folder / "transformer" / "config.json").read_text())
    config = {k: v for k, v in config.items() if k not in ("control", "pose_init")} | {
        "_class_name": "DynamiCtrlTransformerModel"}
    (folder / "transformer" / "config.json").write_text(json.dumps(config))
    CogVideoXDDIMScheduler(**embedded.SCHEDULER).save_pretrained(folder / "scheduler")
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "DynamiCtrlAnimationPipeline", "_diffusers_version": "0.32.0",
        "scheduler": ["diffusers", "CogVideoXDDIMScheduler"], "text_encoder": ["transformers", "T5EncoderModel"],
        "tokenizer": ["transformers", "T5Tokenizer"],
        "transformer": ["dynamictrl.models.model_dynamictrl", "DynamiCtrlTransformerModel"],
        "vae": ["dynamictrl.models.modules.model_cogvideox_autoencoderKL", "AutoencoderKLCogVideoX"]}))  # fmt: skip
    return folder


def test_the_released_layout_loads_strictly_with_its_native_settings(released):
    with safe_open(str(released / "transformer" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        keys = set(f.keys())
    for n in range(2):
        for part in ("linear.weight", "linear.bias", "norm.weight", "norm.bias"):
            assert f"transformer_blocks.{n}.control_norm1.{part}" in keys
    pipe = load_pipeline(released)
    report = pipe.transformer.loading_report
    assert not report["missing_keys"] and not report["unexpected_keys"] and not report["mismatched_keys"]
    assert pipe.settings["num_frames"] == 37 and pipe.reference_scaling == "official"
    assert type(pipe.scheduler).__name__ == "CogVideoXDPMScheduler" and pipe.scheduler.config.timestep_spacing == "trailing"
    for k, v in pipe.transformer.state_dict().items():  # every weight is the file's
        with safe_open(str(released / "transformer" / "diffusion_pytorch_model.safetensors"), "pt") as f:
            assert torch.equal(v, f.get_tensor(k)), k


def test_a_released_folder_with_a_missing_or_extra_key_is_refused(released, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    for change in ("missing", "extra"):
        folder = tmp_path / change
        shutil.copytree(released, folder)
        path = folder / "transformer" / "diffusion_pytorch_model.safetensors"
        state = load_file(str(path))
        if change == "missing":
            del state["transformer_blocks.1.control_norm1.linear.weight"]
        else:
            state["transformer_blocks.1.control_norm2.linear.weight"] = torch.zeros(1)
        save_file(state, str(path))
        with pytest.raises(ValueError, match=r"not the released DynamiCtrl layout \((missing|unexpected)_keys: "
                                             r"transformer_blocks.1.control_norm"):  # fmt: skip
            DynamiCtrlPipeline.from_pretrained(folder)


def official_inference(folder, image, pose, prompt, steps, guidance, seed):
    """The official DynamiCtrl inference, computed here from its description, with the checkpoint's parts:

    the VAE with tiling and slicing on; T5 embeddings of the prompt and of "" (text-only CFG); from one
    generator seeded `seed`, in this order: a posterior sample of the reference image's latent (left unscaled,
    the released inference on a CogVideoX 1.5 VAE), a posterior sample of the pose video's latent (times the
    scaling factor), then the starting noise; the reference latent in latent frame 0, zeros after,
    concatenated with the noisy latent on channels; 37 frames -> 10 latent frames, no padding; DPM (SDE)
    steps on trailing timesteps drawing their noise from the same generator, ofs 2.0, RoPE over
    (frames/2, h/2, w/2) patches; all 10 latent frames decoded together to 40 frames. `image` and `pose` are
    already at the output size. The model's forward is `reference_forward` (an independent re-derivation
    of the published block), not ours."""
    tokenizer = AutoTokenizer.from_pretrained(folder / "tokenizer")
    t5 = T5EncoderModel.from_pretrained(folder / "text_encoder").eval()
    vae = AutoencoderKLCogVideoX.from_pretrained(folder / "vae").eval()
    vae.enable_tiling()
    vae.enable_slicing()
    m = DynamiCtrlTransformer3DModel.from_pretrained(folder / "transformer").eval()
    sched = CogVideoXDPMScheduler.from_config(CogVideoXDDIMScheduler.load_config(folder / "scheduler"),
                                              timestep_spacing="trailing")  # fmt: skip
    cfg = m.config
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        ids = tokenizer(["", prompt], padding="max_length", max_length=cfg.max_text_seq_length, truncation=True,
                        add_special_tokens=True, return_tensors="pt").input_ids  # fmt: skip
        text = t5(ids)[0]  # (2, L, D): unconditional, then the prompt
        ref = torch.from_numpy(image).permute(2, 0, 1)[None, :, None].float() / 127.5 - 1  # (1, 3, 1, H, W)
        ref_lat = vae.encode(ref).latent_dist.sample(g).permute(0, 2, 1, 3, 4)  # (1, 1, 16, h, w), unscaled
        px = torch.from_numpy(pose).permute(3, 0, 1, 2)[None].float() / 127.5 - 1  # (1, 3, 37, H, W)
        pose_lat = vae.encode(px).latent_dist.sample(g).permute(0, 2, 1, 3, 4) * SCALING  # (1, 10, 16, h, w)
        frames = pose_lat.shape[1]
        assert frames == 10
        image_lat = torch.cat([ref_lat, torch.zeros(1, frames - 1, *ref_lat.shape[2:])], dim=1)
        h, w = pose_lat.shape[-2:]
        rope = get_3d_rotary_pos_embed(cfg.attention_head_dim, None, (h // 2, w // 2), frames // 2, grid_type="slice",
                                       max_size=(cfg.sample_height // 2, cfg.sample_width // 2))  # fmt: skip
        x = torch.randn(pose_lat.shape, generator=g)
        sched.set_timesteps(steps)
        old = None
        for i, t in enumerate(sched.timesteps):
            hidden = torch.cat([torch.cat([x, x]), torch.cat([image_lat, image_lat])], dim=2)
            v = reference_forward(m, hidden, text, t.expand(2), torch.tensor([2.0]), rope, torch.cat([pose_lat, pose_lat]))
            v_uncond, v_text = v.chunk(2)
            v = v_uncond + guidance * (v_text - v_uncond)
            prev = sched.timesteps[i - 1] if i > 0 else None
            x, old = sched.step(v, old, t, prev, x, generator=g, return_dict=False)
        video = vae.decode(x.permute(0, 2, 1, 3, 4) / SCALING).sample.clamp(-1, 1)  # (1, 3, 40, H, W)
    return ((video[0].permute(1, 2, 3, 0) + 1) * 127.5).round().byte().numpy()  # (40, H, W, 3)


def inputs(n=37, h=32, w=32, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 255, (h, w, 3), dtype=np.uint8), rng.integers(0, 255, (n, h, w, 3), dtype=np.uint8)


def test_37_frames_through_the_whole_pipeline_equal_the_official_inference(released):
    image, pose = inputs()
    pipe = load_pipeline(released)
    pipe.set_progress_bar_config(disable=True)
    pipe.vae.enable_tiling()
    pipe.vae.enable_slicing()
    kw = dict(prompt="a person in a red coat", num_inference_steps=3, guidance_scale=3.0)

    def call(**more):
        return pipe(image, pose, generator=torch.Generator().manual_seed(7), **kw, **more).frames[0].astype(int)

    ref40 = official_inference(released, image, pose, kw["prompt"], 3, 3.0, seed=7).astype(int)
    assert ref40.shape == (40, 32, 32, 3)
    # frame_trim="official" with posterior samples reproduces the official script frame for frame (its first 37).
    head = call(frame_trim="official", sample_posterior=True)
    assert head.shape == (37, 32, 32, 3) and np.abs(head - ref40[:37]).max() <= 1
    ours = call(sample_posterior=True)
    assert np.abs(ours - ref40[3:]).max() <= 1  # aligned: decoded frame i = pose frame i
    assert np.abs(ours - ref40[:37]).max() > 8  # (the official script's head: 3 frames behind)
    assert np.abs(call() - ours).max() > 8  # posterior modes (our default) are not the official samples
    other = call(sample_posterior=True, reference_scaling="diffusers")
    assert np.abs(other - ours).max() > 8  # the convention matters on this VAE


def test_preset_official_through_animate_equals_the_official_inference(released, tmp_path):
    """`make animate ... preset=official seed=42 steps=4 guidance_scale=3.0 height=96 width=64`: the reference
    stretched (PIL Lanczos, no crop) to 64x96, the 37 pose frames as they are, no reference pose in front,
    the first 37 of 40 decoded frames, all equal to the independent computation."""
    from dynamictrl.animate.run import run
    from dynamictrl.utils.video import read_image
    from test_animate_app import animate_cfg

    Image.fromarray(astronaut()).save(tmp_path / "ref.png")  # 512x512: stretched, not cropped, to 64 wide
    _, pose = inputs(37, 96, 64, seed=1)
    write_video(tmp_path / "pose.mp4", pose, 16)
    pose = read_video(tmp_path / "pose.mp4")[0]  # what animate reads: the decoded frames
    image = np.array(Image.fromarray(read_image(tmp_path / "ref.png")).resize((64, 96), Image.LANCZOS))
    prompt = "an astronaut"

    def animate(name, **more):
        run(animate_cfg(image=tmp_path / "ref.png", pose=tmp_path / "pose.mp4", prompt=f"'{prompt}'", model=released,
                        preset="official", seed=42, steps=4, guidance_scale=3.0, height=96, width=64,
                        frames_dir=tmp_path / name, output=tmp_path / f"{name}.mp4", **more))  # fmt: skip
        files = sorted((tmp_path / name).glob("*.png"))
        return np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files]).astype(int)

    ours = animate("official")
    ref40 = official_inference(released, image, pose, prompt, 4, 3.0, seed=42).astype(int)
    assert ours.shape == (37, 96, 64, 3) and np.abs(ours - ref40[:37]).max() <= 1
    settings = json.loads((tmp_path / "official.json").read_text())
    assert settings["vae_tiling"] and settings["frame_trim"] == "official" and settings["seed"] == 42
    assert np.abs(animate("untiled", vae_tiling=False) - ours).max() > 1  # the tiles matter at this size


def test_38_frames_is_a_one_line_error_naming_the_valid_counts(released):
    image, pose = inputs(38)
    pipe = load_pipeline(released)
    with pytest.raises(ValueError, match=r"num_frames=38 is not valid for this CogVideoX 1.5 model \(needs 4k\+1 "
                                         r"frames\); nearest valid: 37 or 41") as err:  # fmt: skip
        pipe(image, pose, prompt="x", num_inference_steps=1)
    assert "\n" not in str(err.value)


def test_animate_runs_a_released_model_in_37_frame_clips(released, tmp_path, clip_lengths):
    from dynamictrl.animate.run import run
    from test_animate_app import animate_cfg

    Image.fromarray(astronaut()).save(tmp_path / "ref.png")
    _, pose = inputs(37, 96, 96, seed=1)
    write_video(tmp_path / "pose.mp4", pose, 16)
    lengths = clip_lengths
    common = dict(image=tmp_path / "ref.png", pose=tmp_path / "pose.mp4", prompt="'an astronaut'", model=released,
                  steps=1, buckets="[[96,96]]")  # fmt: skip
    result = run(animate_cfg(**common, output=tmp_path / "o.mp4", num_frames=37, prepend_reference_pose=False))
    assert result["frames"] == 37 and lengths == [37]  # one clip of the released length
    assert len(read_video(tmp_path / "o.mp4")[0]) == 37
    settings = json.loads((tmp_path / "o.json").read_text())
    assert settings["clip_frames"] == 37 and settings["reference_scaling_used"] == "official"
    assert settings["frame_trim"] == "aligned" and settings["vae_tiling"]  # 96x96 exceeds the 48x40 tile
    with pytest.raises(UserError, match=r"clip_frames=38 is not valid .* nearest valid: 37 or 41") as err:
        run(animate_cfg(**common, output=tmp_path / "p.mp4", clip_frames=38))
    assert "\n" not in str(err.value)


def test_training_from_released_weights_at_37_frames_uses_their_convention(released):
    """Fine-tuning starts from the released folder: its reference convention, 10 latent frames, no padding."""
    from functools import partial

    from dynamictrl.train.module import DynamiCtrlModule

    module = DynamiCtrlModule(str(released), optimizer=partial(torch.optim.AdamW))
    module.configure_model()
    assert module.codec.reference_scaling == "official"
    g = torch.Generator().manual_seed(0)
    batch = {"video": torch.rand(1, 3, 37, 32, 32, generator=g) * 2 - 1, "pose": torch.rand(1, 3, 37, 32, 32, generator=g) * 2 - 1,
             "mask": torch.ones(1, 37, 32, 32, dtype=torch.bool), "caption": ["a person"]}  # fmt: skip
    target, _ = module.encode_clips(batch)
    assert target.shape[1] == 10 and module.codec.pad(target).shape[1] == 10
    loss = module.loss(batch, generator=torch.Generator().manual_seed(0))
    loss.backward()
    assert torch.isfinite(loss) and module.transformer.transformer_blocks[0].control_norm1.linear.weight.grad is not None
    scaled = DynamiCtrlModule(str(released), optimizer=partial(torch.optim.AdamW), reference_scaling="scaled")
    scaled.configure_model()
    assert scaled.codec.reference_scaling == "scaled"

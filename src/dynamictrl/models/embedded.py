"""The embedded default model: a tiny, seeded DynamiCtrl pipeline in the real diffusers layout.

Built on first use under `data/embedded/` and then loaded by `DynamiCtrlPipeline.from_pretrained`,
the same code that loads real weights. Its parts:

- a CogVideoX VAE (3 levels: 4x space, 4x time, 16 latent channels) fitted to synthetic clips and
  their pose renders, because a random VAE decodes everything to noise. The fit takes about 20 CPU
  minutes, so it is done once (`python -m dynamictrl.models.embedded fit-vae`) and shipped in the
  package (`models/assets/tiny-vae.safetensors`, 2.2 MB, with its figures in the .json beside it);
- a random T5 encoder with a word-level T5 tokenizer built offline (different captions give
  different embeddings; nothing about language is learnt);
- a random DynamiCtrl transformer in the CogVideoX 1.5 layout (temporal patches, ofs, RoPE), 4 layers
  of width 192: a 2x2x2 patch carries 256 input values, and a narrower model (64) could not pass
  them through (demo PSNR* 15 vs 18.5 at equal steps);
- the CogVideoX DPM scheduler with CogVideoX 1.5's settings.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import string
import sys
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKLCogVideoX, CogVideoXDPMScheduler
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm
from transformers import T5Config, T5EncoderModel, T5Tokenizer

from dynamictrl.models.pipeline import DynamiCtrlPipeline
from dynamictrl.models.transformer import DynamiCtrlTransformer3DModel

VERSION = "tiny-v9"  # bump when the recipe below changes: the cache is keyed by it
HEIGHT, WIDTH, NUM_FRAMES = 96, 64, 9

TRANSFORMER = dict(
    num_attention_heads=6, attention_head_dim=32, in_channels=32, out_channels=16, time_embed_dim=128,
    ofs_embed_dim=128, text_embed_dim=32, num_layers=4, sample_height=max(HEIGHT, WIDTH) // 4,
    sample_width=max(HEIGHT, WIDTH) // 4,
    sample_frames=NUM_FRAMES, patch_size=2, patch_size_t=2, max_text_seq_length=64,
    use_rotary_positional_embeddings=True, use_learned_positional_embeddings=False, patch_bias=False,
)  # fmt: skip
VAE = dict(
    block_out_channels=(16, 16, 32), latent_channels=16, layers_per_block=1, norm_num_groups=4,
    down_block_types=("CogVideoXDownBlock3D",) * 3, up_block_types=("CogVideoXUpBlock3D",) * 3,
    temporal_compression_ratio=4, sample_height=HEIGHT, sample_width=WIDTH, invert_scale_latents=False,
)  # fmt: skip
# Layouts of the embedded model: name -> frames per clip, how the synthetic videos are cut into clips
# (preprocess overrides), and overrides of TRANSFORMER and VAE. `tiny` is the default embedded model
# (make train/animate/eval without a model, the tests): 9 frames, 4x time compression, the 1.5 layout
# (2 temporal token positions). `demo` is the demo's and the ablation's miniature: 9-frame clips through
# a VAE with 2x time compression (5 latent frames) in the CogVideoX 1.0 layout (no temporal patch), so 5
# temporal token positions; its ground truth through that VAE scores 5.6 dB of figure PSNR above the
# static reference, against 3.2 dB for 17 frames through the 4x VAE at the same token count (NOTES).
LAYOUTS = {
    "tiny": {"num_frames": NUM_FRAMES, "cut": [], "transformer": {}, "vae": {}},
    "demo": {"num_frames": 9, "cut": ["num_frames=9", "stride=5"], "transformer": {"patch_size_t": None},
             "vae": {"temporal_compression_ratio": 2}},
}


def transformer_config(layout: str = "tiny") -> dict:
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r}: choose one of {sorted(LAYOUTS)}")
    return TRANSFORMER | LAYOUTS[layout]["transformer"]


def vae_config(layout: str = "tiny") -> dict:
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r}: choose one of {sorted(LAYOUTS)}")
    return VAE | LAYOUTS[layout]["vae"]


def clip_cut(layout: str) -> list[str]:
    """Preprocess overrides that cut the synthetic videos (27 frames) into this layout's clips."""
    return list(LAYOUTS[layout]["cut"])


T5 = dict(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, relative_attention_num_buckets=8,
          dropout_rate=0.0, feed_forward_proj="gated-gelu")  # fmt: skip
SCHEDULER = dict(
    beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000,
    prediction_type="v_prediction", rescale_betas_zero_snr=True, snr_shift_scale=1.0,
    timestep_spacing="trailing", clip_sample=False, set_alpha_to_one=True, steps_offset=0,
)  # fmt: skip

_WORDS = """the a an of and with in on is are wearing person image shirt trousers shoes hair background
pattern patterns stripes diagonal checkerboard polka dots wavy bands red blue green yellow purple orange
white black pink teal brown grey gray blond dark light man woman girl boy dress skirt jacket hoodie coat
top t-shirt jeans pants standing dancing indoor outdoor room wall floor street park beach sky city
appears to be setting there their they it this that color colour long short""".split()


def default_path(layout: str = "tiny") -> Path:
    """Where the embedded model lives: $DYNAMICTRL_DATA or ./data, then embedded/<version>[-<layout>]."""
    return Path(os.environ.get("DYNAMICTRL_DATA", "data")) / "embedded" / (VERSION if layout == "tiny" else f"{VERSION}-{layout}")


def build_tokenizer() -> T5Tokenizer:
    """A T5 (unigram) tokenizer over whole caption words plus single characters, so any text encodes."""
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -3.0)]
    words = sorted(set(_WORDS) | {w.capitalize() for w in _WORDS})
    vocab += [("▁" + w, -2.0) for w in words]
    chars = string.ascii_letters + string.digits + string.punctuation
    vocab += [(c, -8.0) for c in chars] + [("▁" + c, -9.0) for c in chars]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def fit_vae(vae: AutoencoderKLCogVideoX, steps: int, seed: int = 0, progress: bool = True, num_clips: int = 64,
            callback=None, clip_share: float = 0.5, clip_batch: int = 2, person_weight: float = 0.0,
            device: str = "cpu") -> dict:
    """Short reconstruction training on synthetic clips and their rendered poses: L1 on single frames
    and 9-frame clips.

    The pose videos are in the fit because DynamiCtrl encodes them with the same VAE: one fitted to
    RGB frames alone blurs the thin skeleton away, and the transformer is then left without a pose
    signal (a real CogVideoX VAE reconstructs pose renders well). Returns statistics of the fit
    (held-out PSNR of frames and of poses, latent std); sets `scaling_factor` so that latents have
    unit standard deviation, as CogVideoX's does for real video.

    `clip_share` of the steps fit `clip_batch` whole clips, the others 8 single frames; `person_weight`
    adds that much weight to the L1 on the figure's pixels (and on the drawn skeleton of poses). The
    defaults are the shipped VAE's recipe. `device`: where to fit (e.g. cuda on a lent GPU for a larger
    VAE and a longer fit); the VAE comes back on the CPU.
    """
    from dynamictrl.data.synthetic import make_video
    from dynamictrl.pose.render import render_video

    g = torch.Generator().manual_seed(seed)
    videos = [make_video(10_000 + seed * 1000 + i, NUM_FRAMES, HEIGHT, WIDTH, 8.0) for i in range(num_clips + 4)]

    def tensor(clips: list[np.ndarray]) -> torch.Tensor:  # (N, 3, T, H, W) in [-1, 1]
        return torch.from_numpy(np.stack(clips)).permute(0, 4, 1, 2, 3).float() / 127.5 - 1

    rgb = tensor([v["frames"] for v in videos]).to(device)
    pose = tensor([render_video(v["kpts"], HEIGHT, WIDTH) for v in videos]).to(device)
    # Where the person is (RGB: the figure's mask; pose: the drawn skeleton), for `person_weight`.
    rgb_mask = torch.from_numpy(np.stack([v["masks"] for v in videos]))[:, None].float().to(device)
    pose_mask = (pose > -1).any(1, keepdim=True).float()
    vae.to(device)
    train, held_out = (rgb[:num_clips], pose[:num_clips]), (rgb[num_clips:], pose[num_clips:])
    opt = torch.optim.AdamW(vae.parameters(), lr=2e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s / max(steps, 1), 1))))
    vae.train()
    start = time.perf_counter()
    bar = tqdm(range(steps), desc="fitting the tiny VAE", disable=not progress)
    for step in bar:
        pick = lambda n: torch.randint(0, num_clips, (n,), generator=g)  # noqa: E731
        if math.floor((step + 1) * clip_share) == math.floor(step * clip_share):  # single frames: 6 RGB, 2 poses
            t = torch.randint(0, NUM_FRAMES, (1,), generator=g).item()
            i, j = pick(6), pick(2)
            x = torch.cat([train[0][i], train[1][j]])[:, :, t : t + 1]
            m = torch.cat([rgb_mask[i], pose_mask[j]])[:, :, t : t + 1]
        else:  # whole clips, for the temporal layers: RGB, and on steps 3 mod 4 half of them poses
            i, j, is_pose = pick(clip_batch - clip_batch // 2), pick(clip_batch // 2), step % 4 == 3
            x = torch.cat([train[0][i], train[is_pose][j]])
            m = torch.cat([rgb_mask[i], (pose_mask if is_pose else rgb_mask)[j]])
        posterior = vae.encode(x).latent_dist
        rec = vae.decode(posterior.mode()).sample
        loss = ((rec - x).abs() * (1 + person_weight * m)).mean() + 1e-7 * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        bar.set_postfix(l1=f"{loss.item():.3f}")
        if callback is not None:
            callback(step, vae)
    vae.eval()
    psnr = {}
    with torch.no_grad():
        for name, x in zip(("held_out_psnr", "held_out_pose_psnr"), held_out, strict=True):
            z = vae.encode(x).latent_dist.mode()
            mse = ((vae.decode(z).sample.clamp(-1, 1) - x) / 2).pow(2).mean().item()
            psnr[name] = 10 * math.log10(1 / mse)
            if name == "held_out_psnr":
                std = float(z.std())
    vae.register_to_config(scaling_factor=1.0 / std)
    vae.to("cpu")
    return {"steps": steps, **psnr, "latent_std": std, "seconds": time.perf_counter() - start}


VAE_ASSET = Path(__file__).with_name("assets") / "tiny-vae.safetensors"  # + .json beside it: the fit's figures
VAE_STEPS = 3000  # the shipped VAE's fit (python -m dynamictrl.models.embedded fit-vae)
# The demo layout's VAE (2x time compression): the shipped VAE's weights refitted 800 clip-only steps
# with 2x time compression by scripts/vae_fit_exp.py (the command is in its .json).
VAE_T2_ASSET = Path(__file__).with_name("assets") / "tiny-vae-t2.safetensors"


def vae_asset(layout: str = "tiny") -> Path:
    """The shipped VAE file of a layout: the 4x one, or the 2x-time one for layouts that ask for it."""
    return VAE_T2_ASSET if vae_config(layout)["temporal_compression_ratio"] == 2 else VAE_ASSET


def shipped_vae(layout: str = "tiny") -> AutoencoderKLCogVideoX | None:
    """The layout's VAE fitted once offline and shipped in the package, or None when it is missing or
    was fitted for another architecture (then `build` fits one itself)."""
    asset = vae_asset(layout)
    meta_path = asset.with_suffix(".json")
    if not (asset.is_file() and meta_path.is_file()):
        return None
    if json.loads(meta_path.read_text()).get("architecture") != json.loads(json.dumps(vae_config(layout))):
        return None
    return load_vae_file(asset)


def load_vae_file(weights: Path) -> AutoencoderKLCogVideoX:
    """A VAE saved in the shipped asset's format: safetensors, and beside it a .json with its
    `architecture` (AutoencoderKLCogVideoX kwargs) and `scaling_factor`."""
    meta = json.loads(weights.with_suffix(".json").read_text())
    vae = AutoencoderKLCogVideoX(**meta["architecture"])
    vae.load_state_dict(load_file(weights), strict=True)
    vae.register_to_config(scaling_factor=meta["scaling_factor"])
    return vae.eval()


def fit_vae_asset(steps: int = VAE_STEPS, seed: int = 0, progress: bool = True) -> dict:
    """Fit the embedded VAE for `steps` and write it into the package (`VAE_ASSET` and its .json)."""
    torch.manual_seed(seed)
    vae = AutoencoderKLCogVideoX(**VAE)
    stats = fit_vae(vae, steps, seed, progress)
    VAE_ASSET.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, VAE_ASSET)
    meta = {"architecture": json.loads(json.dumps(VAE)), "scaling_factor": vae.config.scaling_factor,
            "seed": seed, "fit": stats}  # fmt: skip
    VAE_ASSET.with_suffix(".json").write_text(json.dumps(meta, indent=1))
    return meta


BASE_ASSET = Path(__file__).with_name("assets") / "tiny-base.safetensors"  # + .json: the fit's figures
BASE_STEPS = 1500  # the shipped base's fit (python -m dynamictrl.models.embedded fit-base)
BASE_LAYOUT = "demo"  # the layout the shipped base is fitted for


def shipped_base(layout: str = "tiny") -> dict[str, torch.Tensor] | None:
    """The tiny I2V base's transformer weights (no pose branch) fitted by `fit-base` and shipped in the
    package, or None when missing or fitted for another architecture than `layout`'s (the
    transformer then stays random)."""
    meta_path = BASE_ASSET.with_suffix(".json")
    if not (BASE_ASSET.is_file() and meta_path.is_file()):
        return None
    if json.loads(meta_path.read_text()).get("architecture") != json.loads(json.dumps(transformer_config(layout))):
        return None
    return load_file(BASE_ASSET)


def fit_base_asset(steps: int = BASE_STEPS, seed: int = 0, data_root: str | Path = "data/demo-base",
                   out: Path | None = None, progress: bool = True, preprocess_overrides: list[str] | None = None,
                   num_train: int = 200, layout: str = BASE_LAYOUT) -> dict:  # fmt: skip
    """Fit the tiny I2V base: the embedded transformer trained from random weights for `steps` with the
    demo's recipe but without its pose branch (`module.pose=false`), on synthetic clips of their own
    (seed 1000 + `seed`: not the demo's), as DynamiCtrl starts from a pretrained CogVideoX-I2V. Writes
    its weights without the pose branch to `out` (the package's asset by default) and its figures
    to the .json beside it."""
    import csv
    import tempfile

    from dynamictrl import config
    from dynamictrl.data.demo_data import make_demo_data
    from dynamictrl.train.run import run as train

    out = out or BASE_ASSET
    data = {"root": str(data_root), "num_train": num_train, "num_test": 1, "seed": 1000 + seed,
            "preprocess_overrides": clip_cut(layout) + list(preprocess_overrides or [])}  # fmt: skip
    shards = make_demo_data(data)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        model = build(Path(tmp) / "model", seed=seed, progress=progress, base=False, layout=layout)
        result = train(config.load("train", [
            "experiment=demo", f"output={tmp}/train", f"model.path={model}", f"data.train_shards={shards}/train-*.tar",
            f"model.num_frames={LAYOUTS[layout]['num_frames']}",
            f"trainer.max_steps={steps}", "module.pose=false", "samples.every_n_steps=0", "logger=csv",
            f"checkpoint_every={steps}", f"trainer.enable_progress_bar={str(progress).lower()}", f"seed={seed}"]))  # fmt: skip
        state = load_file(Path(result["transformer"]) / "diffusion_pytorch_model.safetensors")
        with open(result["metrics_csv"]) as f:
            losses = [float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")]
    pose = tuple(DynamiCtrlTransformer3DModel(**transformer_config(layout)).new_modules())
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.half().contiguous() for k, v in state.items() if not k.startswith(pose)}, out)  # half the bytes
    meta = {"architecture": json.loads(json.dumps(transformer_config(layout))), "layout": layout, "seed": seed, "data": data,
            "fit": {"steps": result["steps"], "loss_first_50": float(np.mean(losses[:50])),
                    "loss_last_200": float(np.mean(losses[-200:])), "seconds": time.perf_counter() - start,
                    "recipe": "experiment=demo module.pose=false"},
            "dtype": "float16 (fitted in float32; loaded into float32 weights)"}  # fmt: skip
    out.with_suffix(".json").write_text(json.dumps(meta, indent=1))
    return meta


def build(path: str | Path, vae_steps: int | None = None, seed: int = 0, progress: bool = True,
          base: bool = True, layout: str = "tiny") -> Path:  # fmt: skip
    """Build the embedded pipeline into `path` (atomically: a temporary folder, then a rename).

    `vae_steps=None` takes the VAE shipped in the package (fitted `VAE_STEPS` steps once, offline, by
    `fit-vae`; minutes of CPU a fresh machine does not have to spend), or fits one for `VAE_STEPS` if
    it is missing; a number fits one for that many steps (the tests' tiny builds).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    text_encoder = T5EncoderModel(T5Config(vocab_size=len(tokenizer), **T5)).eval()
    transformer = DynamiCtrlTransformer3DModel(**transformer_config(layout))
    weights = shipped_base(layout) if base else None
    if weights is not None:  # the I2V base; the pose branch keeps its seeded initial weights
        missing, unexpected = transformer.load_state_dict(weights, strict=False)
        pose = tuple(transformer.new_modules())
        if unexpected or not all(k.startswith(pose) for k in missing):
            raise RuntimeError(f"{BASE_ASSET}: does not fit the transformer (missing {missing[:3]}, unexpected {unexpected[:3]})")
    vae = shipped_vae(layout) if vae_steps is None else None
    if vae is not None:
        stats = json.loads(vae_asset(layout).with_suffix(".json").read_text())["fit"] | {"shipped": True}
    else:
        vae = AutoencoderKLCogVideoX(**vae_config(layout))
        stats = fit_vae(vae, vae_steps or VAE_STEPS, seed, progress)
    scheduler = CogVideoXDPMScheduler(**SCHEDULER)
    pipe = DynamiCtrlPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae,
                              transformer=transformer, scheduler=scheduler)  # fmt: skip
    pipe.save_pretrained(tmp)
    base_fit = json.loads(BASE_ASSET.with_suffix(".json").read_text())["fit"] if weights is not None else None
    (tmp / "BUILD.json").write_text(json.dumps({"version": VERSION, "layout": layout, "seed": seed, "vae_fit": stats,
                                                "base_fit": base_fit}, indent=1))  # fmt: skip
    # What animate should default to with this model (`DynamiCtrlPipeline.settings`).
    defaults = {"buckets": [[HEIGHT, WIDTH], [WIDTH, HEIGHT]], "clip_frames": LAYOUTS[layout]["num_frames"]}
    (tmp / "dynamictrl.json").write_text(json.dumps(defaults, indent=1))
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        tmp.rename(path)
    except OSError:  # another process finished first; theirs is as good as ours
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def ensure(path: str | Path | None = None, vae_steps: int | None = None, progress: bool = True,
           layout: str = "tiny") -> Path:  # fmt: skip
    """The embedded model's folder (of `layout`), built first if it is not there yet."""
    path = Path(path) if path else default_path(layout)
    if not (path / "model_index.json").is_file():
        print(f"Building the embedded tiny model ({layout} layout) in {path} (once; seconds with the shipped VAE)")
        build(path, vae_steps=vae_steps, progress=progress, layout=layout)
    return path.resolve()  # absolute: ranks and workers may run from other directories


def main(argv: list[str]) -> int:
    """python -m dynamictrl.models.embedded fit-vae|fit-base [STEPS]: refit the shipped VAE or the shipped
    I2V base (bump VERSION after)."""
    if not argv or argv[0] not in ("fit-vae", "fit-base") or len(argv) > 2 or (len(argv) == 2 and not argv[1].isdigit()):
        print("usage: python -m dynamictrl.models.embedded fit-vae|fit-base [STEPS]", file=sys.stderr)
        return 2
    if argv[0] == "fit-base":
        meta = fit_base_asset(int(argv[1]) if len(argv) == 2 else BASE_STEPS)
        print(f"wrote {BASE_ASSET}: {json.dumps(meta['fit'])}")
        return 0
    meta = fit_vae_asset(int(argv[1]) if len(argv) == 2 else VAE_STEPS)
    print(f"wrote {VAE_ASSET}: {json.dumps(meta['fit'])}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

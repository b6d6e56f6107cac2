"""LoRA: only the adapters and the pose branch train; the saved LoRA animates like the weights merged by hand."""

import re

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file
from skimage.data import astronaut

from dynamictrl import config
from dynamictrl.animate import run as animate_app
from dynamictrl.animate.run import load_pipeline
from dynamictrl.errors import UserError
from dynamictrl.models.lora import LORA_FILE, POSE_FILE
from dynamictrl.train.run import run as train
from dynamictrl.utils.video import write_video


def train_cfg(shards, model, out, *extra):
    return config.load("train", [f"data.train_shards={shards}/train-*.tar", f"model.path={model}", f"output={out}",
                                 "debug=default", "data.batch_size=2", "checkpoint_every=2", "module.ref_drop=0",
                                 "module.lora.rank=4", "module.lora.alpha=8", "module.optimizer.lr=1e-2",
                                 "module.lr_scheduler.num_warmup_steps=0", *extra])  # fmt: skip


def module_for(tiny_model, *extra):
    cfg = config.load("train", ["data.train_shards=x", "module.lora.rank=4", *extra])
    module = instantiate(cfg.module, model_path=str(tiny_model))
    module.configure_model()  # what the Trainer calls: meta build, adapters, load
    return module


def test_only_the_adapters_and_padaln_are_trainable(tiny_model):
    module = module_for(tiny_model, "module.lr_scheduler=null", "module.gradient_checkpointing=true")
    names = [n for n, _ in module.trainable()]
    lora = [n for n in names if ".lora_" in n]
    pose = [n for n in names if ".control_norm1." in n]
    assert sorted(lora + pose) == sorted(names)
    layers = module.transformer.config.num_layers
    assert len(pose) == 4 * layers  # control_norm1.{linear,norm}.{weight,bias}, trained in full
    wrapped = {n.split(".lora_")[0].split(".", 2)[2] for n in lora}
    assert wrapped == {"attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "norm1.linear"}
    assert len(lora) == 2 * 5 * layers
    opt = module.configure_optimizers()
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == sum(p.numel() for _, p in module.trainable())
    total = sum(p.numel() for p in module.transformer.parameters())
    assert sum(p.numel() for _, p in module.trainable()) < 0.2 * total

    # Gradients reach the adapters and PadaLN, and nothing else.
    batch = {"video": torch.rand(1, 3, 9, 96, 64) * 2 - 1, "pose": torch.rand(1, 3, 9, 96, 64) * 2 - 1,
             "mask": torch.ones(1, 9, 96, 64, dtype=torch.bool), "caption": ["a person"]}  # fmt: skip
    with torch.no_grad():  # B starts at zero, so A's gradient would be zero on the first step
        for n, p in module.transformer.named_parameters():
            if ".lora_B." in n:
                p.normal_(0, 0.01)
    module.loss(batch, generator=torch.Generator().manual_seed(0)).backward()
    got = {n for n, p in module.transformer.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert got == set(names)

    # Checkpoints hold the trainable weights only, so a resume checks that they are all there.
    kept = {f"transformer.{n}": p for n, p in module.trainable()}
    module.on_load_checkpoint({"state_dict": kept})
    with pytest.raises(UserError, match=r"resume: the checkpoint lacks 1 trainable weights .*same module.lora"):
        module.on_load_checkpoint({"state_dict": dict(list(kept.items())[1:])})


def test_pose_branch_variants_and_bf16_base(tiny_model):
    """Cross-attention's new layers are trained in full, not adapted; a bf16 base keeps float32 trainables."""
    module = module_for(tiny_model, "model.control=cross_attn", "module.lora.target_modules=[to_q,to_v]",
                        "module.lora.base_dtype=bfloat16")  # fmt: skip
    names = [n for n, _ in module.trainable()]
    assert any(".attn2.to_q.weight" in n for n in names) and any(".norm_cross." in n for n in names)
    assert not any(".attn2." in n and ".lora_" in n for n in names)  # no adapter inside the pose branch
    assert {n.split(".lora_")[0].rsplit(".", 1)[1] for n in names if ".lora_" in n} == {"to_q", "to_v"}
    assert all(p.dtype == torch.float32 for _, p in module.trainable())
    frozen = [p for p in module.transformer.parameters() if not p.requires_grad]
    assert frozen and all(p.dtype == torch.bfloat16 for p in frozen)


def test_a_bf16_base_trains_and_samples_under_autocast_and_refuses_full_precision(tiny_model, shards, tmp_path):
    bf16 = ("module.lora.base_dtype=bfloat16", "trainer.max_steps=1")
    result = train(train_cfg(shards, tiny_model, tmp_path / "a", *bf16, "trainer.precision=bf16-mixed",
                             "samples.every_n_steps=1", "samples.num_inference_steps=1"))  # fmt: skip
    assert result["steps"] == 1 and len(result["samples"]) == 1
    with safe_open(str(tmp_path / "a" / "lora" / POSE_FILE), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float32}
    with pytest.raises(UserError, match="base_dtype=bfloat16 needs autocast: trainer.precision=bf16-mixed"):
        train(train_cfg(shards, tiny_model, tmp_path / "b", *bf16))


@pytest.mark.parametrize("extra, message", [
    (["module.lora.rank=-2"], "module.lora.rank=-2: must be a positive integer"),
    (["module.lora.target_modules=[to_z]"], r"target_modules=\['to_z'\]: matches no linear layer"),
])  # fmt: skip
def test_bad_lora_settings_are_one_line_errors(tiny_model, extra, message):
    with pytest.raises(Exception) as err:
        module_for(tiny_model, *extra)
    cause = err.value.__cause__ or err.value  # Hydra wraps it; the train app shows the UserError itself
    assert isinstance(cause, UserError) and re.search(message, str(cause)) and "\n" not in str(cause)


@pytest.fixture(scope="module")
def trained(tiny_model, shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora") / "out"
    result = train(train_cfg(shards, tiny_model, out, "trainer.max_steps=5"))
    return out, result


def hand_merged(tiny_model, folder, scale):
    """The base pipeline with W + scale * alpha / r * B @ A written into each adapted layer, and the saved
    pose branch copied in: computed from the safetensors files, without peft."""
    import json

    pipe = load_pipeline(tiny_model)
    weights = pipe.transformer.state_dict()
    with safe_open(str(folder / LORA_FILE), "pt") as f:
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
        lora = {k: f.get_tensor(k) for k in f.keys()}
    factor = scale * meta["transformer.lora_alpha"] / meta["transformer.r"]
    with safe_open(str(folder / POSE_FILE), "pt") as f:
        pose = {k: f.get_tensor(k) for k in f.keys()}
    merged = dict(pose)
    for key in lora:
        if key.endswith(".lora_A.weight"):
            name = key.removeprefix("transformer.").removesuffix(".lora_A.weight")
            a, b = lora[key], lora[key.replace("lora_A", "lora_B")]
            merged[f"{name}.weight"] = weights[f"{name}.weight"] + factor * b @ a
    assert len(merged) == len(pose) + len(lora) // 2
    missing, unexpected = pipe.transformer.load_state_dict(merged, strict=False)
    assert not unexpected
    return pipe


def test_trained_lora_animates_like_the_weights_merged_by_hand(trained, tiny_model, tmp_path, monkeypatch):
    out, result = trained
    folder = out / "lora"
    assert result["steps"] == 5 and result["lora"] == str(folder)
    assert (folder / LORA_FILE).is_file() and (folder / POSE_FILE).is_file()
    with safe_open(str(folder / LORA_FILE), "pt") as f:
        assert all(k.startswith("transformer.transformer_blocks.") and ".lora_" in k for k in f.keys())
    # Checkpoints hold the trainable weights only (the frozen base is model.path's).
    ckpt = torch.load(result["last_ckpt"], weights_only=True, map_location="cpu")
    assert ckpt["state_dict"] and all(".lora_" in k or ".control_norm1." in k for k in ckpt["state_dict"])

    # Pipeline level: LoRA at scale 0.7 = hand-merged at 0.7, and far from the base model.
    pose = np.random.default_rng(0).integers(0, 255, (9, 96, 64, 3), dtype=np.uint8)

    def latents(pipe):
        pipe.set_progress_bar_config(disable=True)
        return pipe(pose[0], pose, prompt="a person", num_inference_steps=2, output_type="latent",
                    generator=torch.Generator().manual_seed(0)).frames  # fmt: skip

    base, with_lora = latents(load_pipeline(tiny_model)), latents(load_pipeline(tiny_model, folder, 0.7))
    merged = latents(hand_merged(tiny_model, folder, 0.7))
    assert torch.allclose(with_lora, merged, atol=1e-5, rtol=1e-4)
    assert (with_lora - base).abs().max() > 100 * (with_lora - merged).abs().max()
    assert (with_lora - base).abs().mean() > 1e-2

    # The app: make animate ... model=BASE lora=PATH, against the same app given the hand-merged model.
    # A portrait reference: the run's dynamictrl.json (model=out) lists only its training clips' 96x64
    # bucket, the base's lists both orientations; a square one would pick a different bucket per model.
    img = np.ascontiguousarray(astronaut()[:, 86:426])
    Image.fromarray(img).save(tmp_path / "ref.png")
    write_video(tmp_path / "driving.mp4", np.stack([np.roll(img, 8 * i, axis=1)[::2, ::2] for i in range(8)]), 8)
    videos = []
    real = animate_app.animate
    monkeypatch.setattr(animate_app, "animate", lambda *a, **k: videos.append(real(*a, **k)) or videos[-1])

    def app(pipe=None, **kw):
        with initialize_config_dir(config_dir=str(config.conf_dir() / "animate"), version_base="1.3"):
            cfg = compose("animate", [f"image={tmp_path / 'ref.png'}", f"driving={tmp_path / 'driving.mp4'}",
                                      "prompt=a person", f"output={tmp_path / 'o.mp4'}", f"model={tiny_model}",
                                      "steps=2", "progress=false", *[f"{k}={v}" for k, v in kw.items()]])  # fmt: skip
        return animate_app.run(cfg, pipe=pipe)

    app(lora=folder)
    app()
    app(pipe=hand_merged(tiny_model, folder, 1.0))
    app(model=out)  # the training output names its base and LoRA (model.json)
    lora_video, base_video, merged_video, output_video = (v.astype(int) for v in videos)
    assert np.abs(lora_video - merged_video).max() <= 1  # uint8 rounding of equal float frames
    assert np.abs(lora_video - base_video).mean() > 5 * max(np.abs(lora_video - merged_video).mean(), 0.1)
    assert np.array_equal(output_video, lora_video)


def test_a_lora_trained_on_a_plain_cogvideox_base_loads_onto_it(tiny_model, shards, tmp_path):
    """The usual start: a CogVideoX-I2V folder with no pose branch. Training adds PadaLN (saved in full);
    animate builds the base as DynamiCtrl and loads it, with model=RUN and with model=BASE lora=RUN/lora."""
    import shutil

    from diffusers import CogVideoXTransformer3DModel

    from dynamictrl.models.pipeline import DynamiCtrlPipeline
    from dynamictrl.models.transformer import DynamiCtrlTransformer3DModel

    pipe = DynamiCtrlPipeline.from_pretrained(tiny_model)
    arch = {k: v for k, v in pipe.transformer.config.items() if not k.startswith("_") and k not in ("control", "pose_init")}
    plain = CogVideoXTransformer3DModel(**arch)
    assert not plain.load_state_dict(pipe.transformer.state_dict(), strict=False).missing_keys
    pipe.register_modules(transformer=plain)
    base = tmp_path / "cogvideox"
    pipe.save_pretrained(base)
    shutil.copy(tiny_model / "dynamictrl.json", base)
    assert "CogVideoXTransformer3DModel" in (base / "model_index.json").read_text()

    out = tmp_path / "run"
    train(train_cfg(shards, base, out, "trainer.max_steps=2"))
    with safe_open(str(out / "lora" / POSE_FILE), "pt") as f:
        saved = {k: f.get_tensor(k) for k in f.keys()}
    pose = np.random.default_rng(0).integers(0, 255, (9, 96, 64, 3), dtype=np.uint8)
    results = []
    for loaded in (load_pipeline(out), load_pipeline(base, out / "lora")):
        assert isinstance(loaded.transformer, DynamiCtrlTransformer3DModel)
        own = loaded.transformer.state_dict()
        assert all(torch.equal(own[k], v) for k, v in saved.items()) and len(saved) == 16
        loaded.set_progress_bar_config(disable=True)
        results.append(loaded(pose[0], pose, prompt="a person", num_inference_steps=2, output_type="latent",
                              generator=torch.Generator().manual_seed(0)).frames)  # fmt: skip
    assert torch.equal(results[0], results[1])


def test_bad_lora_paths_are_one_line_errors(trained, tiny_model, tmp_path):
    out, _ = trained
    (tmp_path / "empty").mkdir()
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / LORA_FILE).write_bytes(b"not a safetensors file")
    (tmp_path / "other").mkdir()  # a LoRA for a wider model
    save_file({"transformer.transformer_blocks.0.attn1.to_q.lora_A.weight": torch.zeros(4, 512),
               "transformer.transformer_blocks.0.attn1.to_q.lora_B.weight": torch.zeros(512, 4)},
              str(tmp_path / "other" / LORA_FILE))  # fmt: skip
    cases = [
        (tmp_path / "missing", {}, "no such file or folder"),
        (tmp_path / "empty", {}, f"no {LORA_FILE} in this folder"),
        (tmp_path / "junk", {}, "is not a readable safetensors file"),
        (tmp_path / "other", {}, r"lora_A.weight has shape \(4, 512\), which does not fit"),
        (out / "lora", {"lora_scale": "strong"}, "lora_scale='strong': must be a number"),
        (None, {"lora_scale": 0.5}, "lora_scale=0.5 needs lora=PATH"),
    ]
    for path, kw, message in cases:
        with pytest.raises(UserError, match=message) as err:
            load_pipeline(tiny_model, path, **kw)
        assert "\n" not in str(err.value) and (path is None or f"lora={path}" in str(err.value) or "lora_scale" in kw)
    with pytest.raises(UserError, match="is a LoRA training output already; give model=BASE lora="):
        load_pipeline(out, out / "lora")


@pytest.mark.slow
def test_lora_resume_is_exact_and_ema_works(tiny_model, shards, tmp_path):
    """4 steps straight = 2 steps + resume to 4, with EMA on: same losses, same exported LoRA."""
    import csv

    def losses(path):
        return {int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(open(path)) if r.get("train/loss")}

    # A constant lr: the cosine schedule is a function of max_steps, which the split run changes.
    extra = ("module.ema_decay=0.9", "module.text_drop=0.3", "module.lr_scheduler=null")
    full = train(train_cfg(shards, tiny_model, tmp_path / "full", "trainer.max_steps=4", *extra))
    train(train_cfg(shards, tiny_model, tmp_path / "split", "trainer.max_steps=2", *extra))
    resumed = train(train_cfg(shards, tiny_model, tmp_path / "split", "trainer.max_steps=4", "resume=true", *extra))
    a, b = losses(full["metrics_csv"]), losses(resumed["metrics_csv"])
    assert sorted(a) == sorted(b) == [0, 1, 2, 3]
    for step in (2, 3):
        assert b[step] == pytest.approx(a[step], rel=1e-5)
    for name in (LORA_FILE, POSE_FILE):
        with safe_open(str(tmp_path / "full" / "lora" / name), "pt") as f, \
             safe_open(str(tmp_path / "split" / "lora" / name), "pt") as g:  # fmt: skip
            assert set(f.keys()) == set(g.keys())
            for k in f.keys():
                torch.testing.assert_close(f.get_tensor(k), g.get_tensor(k), rtol=1e-5, atol=1e-6)
    # EMA: the export holds the averaged weights, the trained ones sit in lora_raw/.
    with safe_open(str(tmp_path / "full" / "lora" / POSE_FILE), "pt") as f, \
         safe_open(str(tmp_path / "full" / "lora_raw" / POSE_FILE), "pt") as g:  # fmt: skip
        key = "transformer_blocks.0.control_norm1.linear.weight"
        assert not torch.equal(f.get_tensor(key), g.get_tensor(key))
    ckpt = torch.load(resumed["last_ckpt"], weights_only=True, map_location="cpu")
    weights = {k.removeprefix("transformer.") for k in ckpt["state_dict"] if k.startswith("transformer.")}
    ema = {k.removeprefix("ema.").replace("-", ".") for k in ckpt["state_dict"] if k.startswith("ema.")} - {"updates"}
    assert ema == weights and all(".lora_" in k or ".control_norm1." in k for k in weights)
    assert int(ckpt["state_dict"]["ema.updates"]) == 4  # 2 restored + 2: the EMA came back with the weights


@pytest.mark.parametrize("recipe, clip, static_gb", [("lora-24gb", "cogvideox1.5-480p", 15.8),
                                                     ("lora-48gb", "cogvideox1.5", 16.8)])  # fmt: skip
def test_lora_recipes_build_the_5b_model_as_their_plan_figures_say(recipe, clip, static_gb):
    """The recipe's settings on the full-size model (meta device): frozen bf16 + trainable fp32 bytes are
    the plan's weights, gradients and optimizer rows and the figure in the recipe's comment, and its clip
    config has its frame count."""
    from dynamictrl.models.lora import add_lora
    from dynamictrl.models.transformer import DynamiCtrlTransformer3DModel
    from dynamictrl.train import plan

    cfg = config.load("train", [f"experiment={recipe}", "data.train_shards=x", "model.path=/m"])
    assert cfg.module.gradient_checkpointing and cfg.samples.every_n_steps == 0 and cfg.trainer.devices == 1
    assert config.load("preprocess", [f"clip={clip}", "input=x", "output=y"]).num_frames == cfg.model.num_frames
    with torch.device("meta"):
        model = DynamiCtrlTransformer3DModel(**cfg.model.transformer)
        add_lora(model, **cfg.module.lora)
    params = list(model.parameters())
    assert {p.dtype for p in params if p.requires_grad} == {torch.float32}
    assert {p.dtype for p in params if not p.requires_grad} == {torch.bfloat16}
    # AdamW: weight, grad, m, v (16 B) and autocast's bf16 copy (2 B) per trainable; 2 B per frozen one
    static = sum(p.numel() * (18 if p.requires_grad else 2) for p in params)
    assert static / 1e9 == pytest.approx(static_gb, abs=0.05)
    state = plan.make_plan(config.load("train", [f"experiment={recipe}", "data.train_shards=x"]), recipe, 1, (1, 1, 1),
                           1, precomputed=True, measure=False).rows  # fmt: skip
    assert sum(v for k, v in state.items() if not k.startswith("VAE")) == pytest.approx(static, rel=1e-6)
    comment = (config.conf_dir() / "experiment" / f"{recipe}.yaml").read_text()
    assert f"(weights, gradients, optimizer: {static_gb})" in comment and "PLAN FIGURES" in comment

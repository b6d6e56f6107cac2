"""The memory plan: its table for every trainer config, its measured activations (the linear
extrapolation over blocks against a direct run), and the refusal of a model a config cannot hold."""

import contextlib

import pytest
import torch

from dynamictrl import config
from dynamictrl.errors import UserError
from dynamictrl.train import plan

FIVE_B = ["model=cogvideox1.5-5b-i2v", "data.train_shards=x"]


def test_plan_prints_every_trainer_config_and_what_fits(capsys):
    plans = plan.main(["model=cogvideox1.5-5b-i2v", "trainer=all", "measure=false", "gpus=8"])
    out = capsys.readouterr().out
    names = sorted(p.stem for p in (config.conf_dir() / "trainer").glob("*.yaml"))
    assert [p.trainer for p in plans] == names
    assert all(f"trainer={n}:" in out for n in names) and "5.77 B parameters" in out
    by = {p.trainer: p for p in plans}
    # fp32 weights + grads + AdamW (16 bytes) + autocast copies (2) of 5.77 B parameters on one GPU
    assert by["gpu"].total() / 1e9 == pytest.approx(18 * 5.77 + 0.43, rel=0.01)
    assert not by["gpu"].fits(80) and not by["ddp"].fits(80)
    assert by["fsdp"].fits(80) and by["deepspeed_zero2_offload"].fits(80) and by["deepspeed_zero3_offload"].fits(24)
    assert by["fsdp"].rows["AdamW state (fp32 shard)"] == pytest.approx(8 * 5.77e9 / 8, rel=0.01)


def test_measured_activations_extrapolate_over_blocks_as_a_direct_run_measures():
    cfg = config.load("train", [*FIVE_B, "model.transformer.num_layers=5", "model.transformer.num_attention_heads=4"])
    clip = (9, 128, 128)
    peaks = {}
    for checkpointing in (True, False):
        direct = plan.measure_activations(cfg, *clip, 1, checkpointing)
        scaled = plan.scaled(cfg, clip, 1, checkpointing)  # from 2- and 3-block runs
        assert scaled["transformer"] == pytest.approx(direct["transformer"], rel=0.01)
        assert scaled["vae"] == direct["vae"] > 0
        peaks[checkpointing] = direct["transformer"]
    assert peaks[True] < peaks[False]


def test_the_frozen_vae_is_counted_in_the_dtype_it_loads_in():
    """module.encoder_dtype decides the VAE's bytes (build.frozen_dtype), whatever the precision."""
    tiny = plan.count(config.load("train", ["data.train_shards=x"]))
    for precision, dtype, size in (("32-true", "bfloat16", 2), ("32-true", "float32", 4), ("32-true", "auto", 4),
                                   ("bf16-mixed", "auto", 2), ("bf16-mixed", "float32", 4)):  # fmt: skip
        cfg = config.load("train", ["data.train_shards=x", f"trainer.precision={precision}",
                                    f"module.encoder_dtype={dtype}"])  # fmt: skip
        p = plan.make_plan(cfg, "cpu", 1, (1, 1, 1), 1, precomputed=False, measure=False, counts=tiny)
        assert p.rows["VAE (frozen)"] == size * tiny.vae, (precision, dtype)
        assert p.rows["T5 (frozen; not loaded with precomputed shards)"] == size * tiny.t5


def test_strategies_are_classified_by_what_they_build_not_by_their_target_name():
    from omegaconf import OmegaConf

    def kind(strategy, accelerator="gpu"):
        return plan.strategy_kind(OmegaConf.create({"accelerator": accelerator, "strategy": strategy}))

    fsdp_yaml = OmegaConf.load(config.conf_dir() / "trainer" / "fsdp.yaml").strategy
    assert kind(fsdp_yaml) == "fsdp"
    assert kind(OmegaConf.merge(fsdp_yaml, {"_target_": "dynamictrl.train.strategies.FSDP2Strategy"})) == "fsdp"
    deepspeed = "lightning.pytorch.strategies.DeepSpeedStrategy"
    assert kind({"_target_": deepspeed, "config": {"zero_optimization": {"stage": 3}}}) == "zero3"
    assert kind({"_target_": deepspeed, "config": {"zero_optimization": {"stage": 2}}}) == "zero2"
    assert kind({"_target_": deepspeed, "stage": 3}) == "zero3"  # Lightning builds the config from `stage`
    assert kind({"_target_": "dynamictrl.train.strategies.deepspeed", "stage": 3, "offload_params": True}) == "zero3"
    assert kind({"_target_": "lightning.pytorch.strategies.DDPStrategy"}) == "ddp"
    assert kind("ddp") == kind("ddp_find_unused_parameters_true") == "ddp"  # Lightning's registry names
    assert kind("deepspeed_stage_3_offload") == "zero3"
    assert kind(None) == "single" and kind(None, "cpu") == "cpu"
    assert kind({"_target_": "lightning.pytorch.strategies.SingleDeviceStrategy", "device": "cpu"}, "cpu") == "cpu"
    for fsdp1 in ("fsdp", {"_target_": "lightning.pytorch.strategies.FSDPStrategy"}):  # Lightning's FSDP1
        with pytest.raises(UserError, match=r"trainer.strategy=FSDPStrategy: .*not supported.* use trainer=fsdp"):
            kind(fsdp1)


def test_a_config_that_cannot_hold_5b_refuses_it_with_one_line_naming_a_config_that_fits():
    for trainer in ("gpu", "ddp"):
        cfg = config.load("train", [*FIVE_B, f"trainer={trainer}", "gpu_gb=80"])
        with pytest.raises(UserError, match=r"cannot hold cogvideox1.5-5b-i2v: 10\d\.\d GB .* use trainer=fsdp") as e:
            plan.check_fits(cfg)
        assert "\n" not in str(e.value)
    one_gpu = config.load("train", [*FIVE_B, "trainer=fsdp", "trainer.devices=1", "gpu_gb=80"])
    with pytest.raises(UserError, match="use trainer=deepspeed_zero2_offload"):
        plan.check_fits(one_gpu)  # FSDP over one GPU shards nothing
    plan.check_fits(config.load("train", [*FIVE_B, "trainer=fsdp", "trainer.devices=8", "gpu_gb=80"]))
    plan.check_fits(config.load("train", [*FIVE_B, "trainer=gpu", "gpu_gb=141"]))  # an H200 holds it
    plan.check_fits(config.load("train", ["data.train_shards=x", "trainer=gpu", "gpu_gb=24"]))  # the tiny model


def test_the_train_app_refuses_before_loading_anything(tmp_path):
    from dynamictrl.train.gpu_check import skeleton
    from dynamictrl.train.run import run

    base = config.load("train", [*FIVE_B])
    folder = skeleton(tmp_path / "base", base, layers=42)  # configs only, no weights: nothing could load
    cfg = config.load("train", [*FIVE_B, "trainer=ddp", "gpu_gb=80", f"output={tmp_path}", f"model.path={folder}"])
    with pytest.raises(UserError, match="use trainer=fsdp"):
        run(cfg)


@pytest.mark.slow
def test_gpu_check_runs_its_whole_path_on_cpu_with_the_tiny_model(tmp_path):
    """scripts/gpu_check.sh --tiny: skeleton folders (configs only) at two depths, random weights, synthetic
    precomputed shards, trainer=fsdp through the train app in a process per run, and the report: both runs
    measured, the per-block line through them and its extrapolation to the full depth beside the plan."""
    import json
    import re

    from dynamictrl.train import gpu_check

    out = tmp_path / "gpu-check.md"
    args = ["--tiny", "--steps", "3", "--blocks", "3", "--out", str(out), "--work", str(tmp_path / "work")]
    result = gpu_check.main(args)  # K = 3 of the tiny model's 4 blocks (and K' = 2): the 4-block row is extrapolated
    small, large = result["runs"]
    assert (small["blocks"], large["blocks"], result["layers"]) == (2, 3, 4)
    for run in (small, large):
        assert run["step_s_median"] > 0 and run["peak_gb"] > 0 and run["step_tflop"] > 0 and run["plan"]["total"] > 0
    assert large["plan"]["total"] > small["plan"]["total"] and large["step_tflop"] > small["step_tflop"]
    full, per, fixed = result["extrapolated"], result["per_block"], result["fixed"]
    assert per["peak_gb"] == pytest.approx(large["peak_gb"] - small["peak_gb"])
    assert full["peak_gb"] == pytest.approx(fixed["peak_gb"] + 4 * per["peak_gb"])
    assert full["step_s"] == pytest.approx(large["step_s_median"] + (large["step_s_median"] - small["step_s_median"]))
    assert full["plan"]["total"] == pytest.approx(large["plan"]["total"] + per["plan_gb"], rel=0.01)  # linear in blocks
    assert per["plan_gb"] == pytest.approx(per["plan_state_gb"] + per["plan_activations_gb"]) and per["plan_state_gb"] > 0
    assert not (tmp_path / "work" / "train-3" / "checkpoints" / "last.ckpt").exists()  # final_save=false
    text = out.read_text()
    number = r"-?\d+\.\d+"
    for row in (rf"\| measured \| 2 \| {number} \| {number} \|", rf"\| measured \| 3 \| {number} \| {number} \|",
                rf"\| per block \(derived: slope of the two runs\) \| 1 \| {number} \| {number} \(state {number} "
                rf"\+ activations {number}\)", rf"\| fixed part \(derived: the line at 0 blocks\) \| 0 \| {number}",
                rf"\| extrapolated, full model \| 4 \| {number} \| {number} \|"):  # fmt: skip
        assert re.search(row, text), row
    assert "MEASURED on the CPU" in text and "EXTRAPOLATED, not run" in text and "NOT comparable with the plan" in text
    assert json.loads(out.with_suffix(".json").read_text())["clip"] == [9, 96, 64]


def test_lora_plan_trains_the_adapters_and_padaln_in_full_and_keeps_the_base_frozen(capsys):
    """module.lora.rank: fewer trainable parameters than full fine-tuning, PadaLN's among them in full, the
    frozen base in base_dtype; the gradient and optimizer rows follow the trainable set."""
    full = plan.count(config.load("train", FIVE_B))
    cfg = config.load("train", [*FIVE_B, "module.lora.rank=32", "module.lora.base_dtype=bfloat16"])
    lora = plan.count(cfg)
    model = plan.meta_transformer(cfg)
    trained = dict(plan.trainable_parameters(model, cfg))
    padaln = {n: p for n, p in model.named_parameters() if ".control_norm1." in n}
    adapters = {n: p for n, p in model.named_parameters() if ".lora_" in n}
    assert len(padaln) == 4 * 42 and set(padaln) <= set(trained)  # every PadaLN weight and bias, trained
    assert set(trained) == set(padaln) | set(adapters)
    n_padaln, n_adapters = (sum(p.numel() for p in d.values()) for d in (padaln, adapters))
    assert lora.trainable == n_padaln + n_adapters and n_padaln == pytest.approx(198.8e6, rel=1e-3)
    assert lora.trainable < 0.05 * full.trainable and full.trainable == full.total
    assert lora.total == full.total + n_adapters
    assert lora.frozen_bytes == 2 * (full.total - n_padaln) and lora.frozen_dtype == "bfloat16"

    p = plan.make_plan(cfg, "gpu", 1, (1, 1, 1), 1, precomputed=True, measure=False, counts=lora)
    assert p.rows["AdamW state (fp32 m, v)"] == 8 * lora.trainable and p.rows["gradients (fp32)"] == 4 * lora.trainable
    assert p.rows["weights, frozen (bfloat16)"] == lora.frozen_bytes and "weights (fp32)" not in p.rows
    assert p.total() < 0.25 * plan.make_plan(config.load("train", FIVE_B), "gpu", 1, (1, 1, 1), 1, True, False, full).total()
    with pytest.raises(UserError, match="LoRA trains under trainer=gpu, ddp or fsdp, not DeepSpeed"):
        plan.state_rows("zero2", lora, 8, cfg)

    plans = plan.main(["experiment=lora-24gb", "trainer=all", "measure=false", "gpus=8"])
    out = capsys.readouterr().out
    assert "LoRA rank 32" in out and "deepspeed_zero2_offload, deepspeed_zero3_offload left out" in out
    assert {p.kind for p in plans} == {"cpu", "single", "ddp", "fsdp"}


def test_lora_activations_are_measured_on_the_adapted_model():
    """The activation run uses the LoRA model: frozen linears keep no inputs for weight gradients."""
    small = [*FIVE_B, "model.transformer.num_layers=2", "model.transformer.num_attention_heads=4"]
    clip = (9, 128, 128)
    full = plan.measure_activations(config.load("train", small), *clip, 1, False)
    lora = plan.measure_activations(config.load("train", [*small, "module.lora.rank=8"]), *clip, 1, False)
    assert 0 < lora["transformer"] < full["transformer"] and lora["vae"] == full["vae"]


def _fake(mode, device, *shape, dtype=torch.bfloat16):
    """A fake tensor on `device`: "cuda" needs no GPU."""
    from torch._subclasses.fake_tensor import FakeTensor

    return FakeTensor(mode, torch.empty(*shape, device="meta", dtype=dtype), torch.device(device))


@contextlib.contextmanager
def _autocast(device):
    """bf16 autocast on `device`'s type: torch.autocast("cuda") turns itself off without a GPU, so set it directly."""
    kind = torch.device(device).type
    before = torch.get_autocast_dtype(kind), torch.is_autocast_enabled(kind)
    torch.set_autocast_dtype(kind, torch.bfloat16)
    torch.set_autocast_enabled(kind, True)
    try:
        yield
    finally:
        torch.set_autocast_dtype(kind, before[0])
        torch.set_autocast_enabled(kind, before[1])


def _output_dtypes(device, policy):
    """Every module's output dtypes in one forward of a 1-block 5B-architecture transformer and one VAE encode,
    on fake tensors on `device` under bf16 autocast (`policy` open)."""
    from diffusers import AutoencoderKLCogVideoX
    from torch._subclasses.fake_tensor import FakeTensorMode

    from dynamictrl.models.transformer import DynamiCtrlTransformer3DModel

    arch = plan.model_architecture(config.load("train", FIVE_B)) | {"num_layers": 1, "num_attention_heads": 2}
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with torch.device("meta"):
        model, vae = DynamiCtrlTransformer3DModel(**arch), AutoencoderKLCogVideoX()
    seen = {}
    for name, m in [*model.named_modules(), *(("vae." + n, m) for n, m in vae.named_modules())]:
        for tensors in (m._parameters, m._buffers):  # bf16 fake weights on `device`
            for k, w in tensors.items():
                fake = _fake(mode, device, *w.shape, dtype=torch.bfloat16 if w.is_floating_point() else w.dtype)
                tensors[k] = torch.nn.Parameter(fake) if isinstance(w, torch.nn.Parameter) else fake
        m.register_forward_hook(lambda m, i, out, name=name: seen.__setitem__(name, [
            x.dtype for x in (out if isinstance(out, tuple) else (out,)) if isinstance(x, torch.Tensor)]))  # fmt: skip

    def t(*shape, dtype=torch.bfloat16):
        return _fake(mode, device, *shape, dtype=dtype)

    lat, tokens, head = (1, 2, 16, 8, 8), 16, arch["attention_head_dim"]  # 2 latent frames, 8 x 8: 1 x 4 x 4 patches
    with _autocast(device), policy(), mode, torch.no_grad():
        model(hidden_states=t(*lat[:2], 32, *lat[3:]), encoder_hidden_states=t(1, 226, arch["text_embed_dim"]),
              timestep=t(1, dtype=torch.int64), ofs=t(1), control_hidden_states=t(*lat),
              image_rotary_emb=(t(tokens, head, dtype=torch.float32), t(tokens, head, dtype=torch.float32)))
        vae.encode(t(1, 3, 1, 32, 32))
    return seen


def test_the_measurement_emulates_cuda_autocast_module_by_module():
    """CUDA autocast's own kernels run on fake CUDA tensors without a GPU (forward only). Every module of the
    transformer and the VAE returns on the CPU under cuda_autocast_policy the dtypes it returns there; plain
    CPU autocast differs (its LayerNorm and GroupNorm return bf16): why the plan emulates."""
    cuda = _output_dtypes("cuda:0", contextlib.nullcontext)
    assert cuda["transformer_blocks.0.control_norm1.norm"] == [torch.float32]
    assert cuda["transformer_blocks.0.attn1.to_q"] == [torch.bfloat16]
    assert cuda["transformer_blocks.0"] == [torch.bfloat16] * 3  # the pose stream back in the compute dtype
    assert cuda["vae.encoder.down_blocks.0.resnets.0.norm1"] == [torch.float32]
    assert _output_dtypes("cpu", plan.cuda_autocast_policy) == cuda
    plain = _output_dtypes("cpu", contextlib.nullcontext)
    assert plain["transformer_blocks.0.control_norm1.norm"] == plain["vae.encoder.norm_out"] == [torch.bfloat16]


def _calls(x, w):
    import torch.nn.functional as F  # noqa: N812

    return {"layer_norm": lambda: F.layer_norm(x, (8,)), "group_norm": lambda: F.group_norm(x, 2),
            "softmax": lambda: x.softmax(-1), "log_softmax": lambda: F.log_softmax(x, -1), "exp": lambda: x.exp(),
            "pow": lambda: x**2, "sum": lambda: x.sum(-1), "normalize": lambda: F.normalize(x),
            "interpolate": lambda: F.interpolate(x, scale_factor=2.0), "softmax, bf16 asked": lambda: x.softmax(
                -1, dtype=torch.bfloat16), "linear": lambda: F.linear(x, w), "matmul": lambda: x @ w,
            "bmm": lambda: torch.bmm(x, w.expand(2, 8, 8)), "gelu": lambda: F.gelu(x),
            "sdpa": lambda: F.scaled_dot_product_attention(x, x, x)}  # fmt: skip


def test_cuda_autocast_policy_computes_cudas_fp32_ops_in_fp32_and_only_those():
    """Op by op against CUDA autocast on fake CUDA tensors: the fp32 list in fp32, matrix products in bf16."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    cuda = set(torch._C._dispatch_get_registrations_for_dispatch_key("AutocastCUDA"))
    cpu = set(torch._C._dispatch_get_registrations_for_dispatch_key("AutocastCPU"))
    for name in plan.CUDA_FP32_OPS:  # each has a CUDA autocast kernel and no CPU one
        assert f"aten::{name}" in cuda - cpu, name
    mode = FakeTensorMode()
    with _autocast("cuda"), mode:
        on_cuda = {k: f().dtype for k, f in _calls(_fake(mode, "cuda:0", 2, 4, 8),
                                                    _fake(mode, "cuda:0", 8, 8, dtype=torch.float32)).items()}  # fmt: skip
    fp32 = {k for k, dtype in on_cuda.items() if dtype == torch.float32}
    assert fp32 == {"layer_norm", "group_norm", "softmax", "log_softmax", "exp", "pow", "sum", "normalize",
                    "interpolate"}  # fmt: skip
    x = torch.randn(2, 4, 8, dtype=torch.bfloat16, requires_grad=True)
    calls = _calls(x, torch.randn(8, 8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert {calls[k]().dtype for k in fp32} == {torch.bfloat16}  # CPU autocast alone
        with plan.cuda_autocast_policy():
            assert {k: f().dtype for k, f in calls.items()} == on_cuda
            y = calls["layer_norm"]()
        assert calls["layer_norm"]().dtype == torch.bfloat16  # closed: the registrations are gone
    y.sum().backward()  # the cast to fp32 is on the graph: the gradient comes back in the input's dtype
    assert x.grad.dtype == torch.bfloat16
    with plan.cuda_autocast_policy():
        assert calls["layer_norm"]().dtype == torch.bfloat16  # outside autocast it changes nothing


def test_the_plan_sees_the_pose_stream_in_the_dtype_it_is_kept_in(monkeypatch):
    """DynamiCtrlBlock casts the pose stream back to the dtype it came in; before, it stayed in PadaLN's
    output dtype: fp32 on a GPU (CUDA autocast's LayerNorm). Measured with 2 checkpointed blocks, the old
    stream costs one fp32-minus-bf16 stream tensor per block (the second block's saved input; at the peak,
    the gradient for it): 2 x tokens x width x 2 bytes. Under CPU autocast alone the plan could not see it."""
    from dynamictrl.models.transformer import DynamiCtrlBlock

    new_forward = DynamiCtrlBlock.forward

    def old_forward(self, *args, **kwargs):  # the stream in the dtype of `control + control_gate * control`
        dtypes = []
        hook = self.control_norm1.register_forward_hook(lambda m, i, out: dtypes.append(
            torch.promote_types(out[0].dtype, out[1].dtype)))  # fmt: skip
        try:
            hidden, text, pose = new_forward(self, *args, **kwargs)
        finally:
            hook.remove()
        return hidden, text, pose.to(dtypes[0])

    cfg = config.load("train", [*FIVE_B, "model.transformer.num_attention_heads=4"])  # width 4 x 64
    tokens = 2 * (128 // 16) ** 2  # 9 frames: 3 latent frames, padded to 4, 2 per patch; 128 / 8 (VAE) / 2 (patch)

    def peak(forward, policy):
        with monkeypatch.context() as m:
            m.setattr(DynamiCtrlBlock, "forward", forward)
            m.setattr(plan, "cuda_autocast_policy", policy)
            return plan.measure_activations(cfg, 9, 128, 128, 1, checkpointing=True, num_layers=2)["transformer"]

    emulated = {f: peak(f, plan.cuda_autocast_policy) for f in (old_forward, new_forward)}
    assert emulated[old_forward] - emulated[new_forward] == pytest.approx(2 * tokens * 256 * 2, rel=0.05)
    plain = {f: peak(f, contextlib.nullcontext) for f in (old_forward, new_forward)}
    assert plain[old_forward] == plain[new_forward] < emulated[new_forward]

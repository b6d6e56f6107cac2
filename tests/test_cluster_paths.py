"""The defects a cluster user meets on first contact, each pinned by a test of its own: DeepSpeed's dtype
contract, ZeRO-3 construction and strict loading, one rank-0 notion under srun, FSDP2 CPU offload, the
RoPE and the pose stream in their dtypes. `make rehearse` (tests/test_rehearse.py) runs them end to end."""

import os
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import torch

from dynamictrl import config

TINY = dict(num_attention_heads=2, attention_head_dim=16, in_channels=32, out_channels=16, time_embed_dim=32,
            ofs_embed_dim=32, text_embed_dim=24, num_layers=2, sample_width=8, sample_height=12, sample_frames=9,
            patch_size=2, patch_size_t=2, max_text_seq_length=8, use_rotary_positional_embeddings=True,
            patch_bias=False)  # fmt: skip


def run_script(code: str, timeout: int = 300) -> str:
    """Run `code` in a fresh interpreter (process groups and zero.Init must not leak into the suite)."""
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stdout


# DeepSpeed: the batch stays fp32 and the forward runs under autocast to the engine's bf16 weights.
def test_deepspeed_bf16_engine_weights_train_on_fp32_batches(tiny_model, shards, tmp_path):
    """Lightning's DeepSpeedPrecision casts the batch to bf16 and adds no autocast: with the engine's bf16
    weights the step raised `mat1 and mat2 must have the same dtype` (the fp32 noise and latents), and the
    targets were rounded. The strategy's precision keeps the batch fp32 and autocasts; the loss is fp32."""
    from hydra.utils import instantiate
    from lightning.pytorch.plugins.precision import DeepSpeedPrecision

    from dynamictrl.train.strategies import _deepspeed_classes

    cfg = config.load("train", ["trainer=deepspeed_zero2_offload", f"data.train_shards={shards}/train-*.tar",
                                f"output={tmp_path}", "module.ref_drop=0"])  # fmt: skip
    module = instantiate(cfg.module, model_path=str(tiny_model))
    module.configure_model()
    module.transformer.to(torch.bfloat16)  # as DeepSpeed's bf16 engine holds the weights
    dm = instantiate(cfg.data)
    dm.setup()
    raw = next(iter(dm.train_dataloader()))
    assert DeepSpeedPrecision("bf16-mixed").convert_input(dict(raw))["video"].dtype == torch.bfloat16  # Lightning's
    plugin = _deepspeed_classes()[1]("bf16-mixed", "cpu")
    batch = plugin.convert_input(raw)
    assert batch["video"].dtype == torch.float32  # targets are not rounded to bf16
    with plugin.forward_context():
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
        loss = module.loss(batch, generator=torch.Generator().manual_seed(0))
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


def test_deepspeed_strategy_runs_on_a_cpu_accelerator_with_its_precision():
    from lightning.pytorch.strategies import DeepSpeedStrategy

    from dynamictrl.train.strategies import _deepspeed_classes, deepspeed

    strategy = deepspeed(stage=2, micro_batch_size=2, process_group_backend="gloo")
    assert isinstance(strategy, DeepSpeedStrategy) and isinstance(strategy, _deepspeed_classes()[0])
    assert strategy.config["train_micro_batch_size_per_gpu"] == 2  # a webdataset loader has no batch sampler
    assert strategy._process_group_backend == "gloo"


# ZeRO-3: built inside a real zero.Init, the pose branch initialised, the checkpoint strictly checked.
ZERO3 = """
import os, sys, json
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(29500 + os.getpid() % 1000), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
import torch, deepspeed
from pathlib import Path
from safetensors.torch import save_file
from dynamictrl.models.transformer import DynamiCtrlTransformer3DModel
from dynamictrl.train import build
from dynamictrl.errors import UserError
deepspeed.init_distributed("gloo")
tiny = json.loads(sys.argv[1]) if len(sys.argv) > 1 else {TINY}
folder = Path("{folder}")
torch.manual_seed(0)
base = DynamiCtrlTransformer3DModel(**tiny)
state = {{k: v for k, v in base.state_dict().items() if "control_norm1" not in k}}  # a base CogVideoX checkpoint
(folder / "good").mkdir(parents=True); (folder / "bad").mkdir()
save_file(state, str(folder / "good" / "m.safetensors"))
save_file({{k.replace("attn1.", "attention."): v for k, v in state.items()}}, str(folder / "bad" / "m.safetensors"))
cfg = {{"zero_optimization": {{"stage": 3}}, "train_micro_batch_size_per_gpu": 1, "bf16": {{"enabled": True}}}}
with deepspeed.zero.Init(config_dict_or_path=cfg):
    model = DynamiCtrlTransformer3DModel(**tiny)
    with build.outside_zero_init():
        whole = torch.nn.Linear(4, 4)
assert all(p.numel() == 0 for p in model.parameters())  # partitioned at creation (world of 1 still partitions)
assert whole.weight.numel() == 16 and not hasattr(whole.weight, "ds_id")
report = build.load_weights_zero3(model, folder / "good", rank=0)
assert report["missing_keys"] and all("control_norm1" in k for k in report["missing_keys"])
with deepspeed.zero.GatheredParameters(list(model.parameters())):
    got = {{k: v.detach().clone() for k, v in model.state_dict().items()}}
assert all(torch.equal(got[k], v.to(got[k].dtype)) for k, v in state.items())
pose = [v for k, v in got.items() if "control_norm1.linear.weight" in k]
assert pose and all(p.abs().sum() > 0 for p in pose)  # initialised, not left empty or zero
try:
    build.load_weights_zero3(model, folder / "bad", rank=0)
except UserError as e:
    print("REFUSED", e)
"""


def test_zero3_builds_in_zero_init_fills_the_checkpoint_and_refuses_wrong_key_names(tmp_path):
    out = run_script(ZERO3.format(TINY=TINY, folder=tmp_path))
    assert "REFUSED" in out and "lack" in out and "attn1" in out


# One rank-0 notion: srun sets SLURM_PROCID, not RANK.
def test_srun_tasks_take_rank_zeros_wandb_run_id(tmp_path, monkeypatch):
    from omegaconf import OmegaConf

    from dynamictrl.train.run import wandb_resume

    logger = OmegaConf.create({"_target_": "lightning.pytorch.loggers.WandbLogger"})
    for var in ("RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("SLURM_PROCID", "1")
    monkeypatch.setenv("SLURM_LOCALID", "0")  # task 1 is the first task of its node
    path = tmp_path / "wandb-run-id.txt"
    def rank0_writes():  # a moment later, as rank 0 writes it: whole or not at all (wandb_resume)
        path.with_name("tmp").write_text("rank0sid")
        os.replace(path.with_name("tmp"), path)

    threading.Timer(1.0, rank0_writes).start()
    start = time.monotonic()
    assert wandb_resume(logger, tmp_path) == {"id": "rank0sid", "resume": "allow"}
    assert time.monotonic() - start >= 0.9  # task 1 waited for rank 0 instead of writing its own id
    monkeypatch.setenv("SLURM_PROCID", "0")
    path.unlink()
    first = wandb_resume(logger, tmp_path)["id"]
    assert path.read_text() == first and wandb_resume(logger, tmp_path)["id"] == first


def test_global_rank_prefers_rank_then_slurm_procid(monkeypatch):
    from dynamictrl.utils.device import global_rank, launcher_world

    for var in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT"):
        monkeypatch.delenv(var, raising=False)
    assert global_rank() == 0 and launcher_world() == (0, 1)
    monkeypatch.setenv("SLURM_PROCID", "3")
    monkeypatch.setenv("SLURM_NTASKS", "4")
    assert global_rank() == 3 and launcher_world() == (3, 4)
    monkeypatch.setenv("RANK", "5")  # torchrun inside an allocation: its global rank wins
    monkeypatch.setenv("WORLD_SIZE", "8")
    assert global_rank() == 5 and launcher_world() == (5, 8)


# FSDP2 CPU offload: shards are filled in host memory and Lightning's move leaves them there.
def test_fsdp2_offload_fills_on_the_host_and_does_not_move_the_shards():
    from dynamictrl.train.strategies import FSDP2Strategy

    s = FSDP2Strategy(cpu_offload=True)
    s.parallel_devices = [torch.device("cuda", 0)]  # a GPU node (nothing is moved to it below)
    assert s.fill_device == torch.device("cpu")
    s.model = torch.nn.Linear(2, 2)
    s.model_to_device()  # Lightning's setup calls this; a move to cuda would fail here (no GPU)
    assert s.model.weight.device.type == "cpu"
    s.cpu_offload = False
    assert s.fill_device == torch.device("cuda", 0)  # without offload the shards are filled on the GPU


# RoPE in fp32 under FSDP2's bf16 policy, as inference computes it.
FSDP_ROPE = """
import os, json
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(29600 + os.getpid() % 1000))
import torch, torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from diffusers.models.embeddings import get_3d_rotary_pos_embed
from dynamictrl.models.transformer import DynamiCtrlTransformer3DModel
from dynamictrl.train.strategies import FSDP2Strategy
dist.init_process_group("gloo", rank=0, world_size=1)
s = FSDP2Strategy()
s._device_mesh = init_device_mesh("cpu", (1,), mesh_dim_names=("data_parallel",))
model = DynamiCtrlTransformer3DModel(**{TINY})
seen = []
for block in model.transformer_blocks:
    block.attn1.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["image_rotary_emb"][0].dtype), with_kwargs=True)
s.shard(model)
rope = get_3d_rotary_pos_embed(16, None, (6, 4), 2, grid_type="slice", max_size=(6, 4))
with torch.autocast("cpu", dtype=torch.bfloat16):
    out = model(hidden_states=torch.randn(1, 4, 32, 12, 8), encoder_hidden_states=torch.randn(1, 8, 24),
                timestep=torch.tensor([10]), ofs=torch.tensor([2.0]), image_rotary_emb=rope,
                control_hidden_states=torch.randn(1, 4, 16, 12, 8)).sample
print(json.dumps({{"rope": sorted({{str(d) for d in seen}}), "out": str(out.dtype)}}))
"""


def test_fsdp2_bf16_keeps_the_rope_in_fp32():
    import json

    got = json.loads(run_script(FSDP_ROPE.format(TINY=TINY)).strip().splitlines()[-1])
    assert got["rope"] == ["torch.float32"]


def test_fp32_inputs_to_bf16_weights_without_autocast_are_cast_by_the_model():
    from diffusers.models.embeddings import get_3d_rotary_pos_embed

    from dynamictrl.models.transformer import DynamiCtrlTransformer3DModel

    model = DynamiCtrlTransformer3DModel(**TINY).to(torch.bfloat16)
    rope = get_3d_rotary_pos_embed(16, None, (6, 4), 2, grid_type="slice", max_size=(6, 4))
    out = model(hidden_states=torch.randn(1, 4, 32, 12, 8), encoder_hidden_states=torch.randn(1, 8, 24),
                timestep=torch.tensor([10]), ofs=torch.tensor([2.0]), image_rotary_emb=rope,
                control_hidden_states=torch.randn(1, 4, 16, 12, 8)).sample  # fmt: skip
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


# The pose stream stays in the compute dtype under autocast (autocast's LayerNorm returns fp32).
def test_pose_stream_is_handed_on_in_the_compute_dtype_under_autocast():
    from dynamictrl.models.transformer import DynamiCtrlTransformer3DModel

    model = DynamiCtrlTransformer3DModel(**TINY)
    block = model.transformer_blocks[0]
    # CUDA autocast runs layer_norm in fp32 (CPU autocast leaves it in the input's dtype): emulate it
    block.control_norm1.norm.register_forward_hook(lambda m, args, out: out.float())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        pose = model.patch_embed.proj(torch.randn(1, 24, 256))  # a pose token stream as the embedding gives it
        _, _, stream = block(torch.randn(1, 24, 32), torch.randn(1, 8, 32), torch.randn(1, 32), pose)
    assert pose.dtype == torch.bfloat16 and stream.dtype == torch.bfloat16


def test_a_real_model_without_its_folder_is_refused_not_swapped_for_the_tiny_one():
    from dynamictrl.errors import UserError
    from dynamictrl.train.run import model_path

    cfg = config.load("train", ["model=cogvideox1.5-5b-i2v", "trainer=fsdp", "data.train_shards=x"])
    with pytest.raises(UserError, match="model.path is not set"):
        model_path(cfg)


def test_fsdp2_resume_loads_with_weights_only_unless_told_otherwise(tmp_path, monkeypatch):
    """A requeued job resumes through the strategy's load_checkpoint: unset, weights_only is True (no pickle)."""
    from types import SimpleNamespace

    from lightning.pytorch.strategies import ModelParallelStrategy

    from dynamictrl.train.strategies import FSDP2Strategy

    seen = []
    monkeypatch.setattr(ModelParallelStrategy, "load_checkpoint", lambda self, path, weights_only=None: seen.append(weights_only))
    s = FSDP2Strategy()
    monkeypatch.setattr(FSDP2Strategy, "lightning_module", SimpleNamespace(strict_loading=True))
    s.load_checkpoint(tmp_path / "last.ckpt")
    s.load_checkpoint(tmp_path / "last.ckpt", weights_only=False)
    assert seen == [True, False]

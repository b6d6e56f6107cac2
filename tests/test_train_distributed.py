"""Trainer configs: 2-process DDP trains on CPU (gloo); FSDP, DeepSpeed and SLURM configs compose
and build their strategy objects on CPU (FSDP2 trains on CPU in tests/test_train_fsdp.py)."""

import csv
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.utils import instantiate

from dynamictrl import config
from dynamictrl.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_two_process_ddp_on_cpu_trains_two_steps(tiny_model, shards, tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, str(ROOT / "pipelines" / "train" / "main.py"), "trainer=ddp", "trainer.accelerator=cpu",
           "trainer.devices=2", "trainer.precision=32-true", "trainer.strategy.process_group_backend=gloo",
           "trainer.max_steps=2", "trainer.log_every_n_steps=1", "trainer.enable_progress_bar=false",
           f"data.train_shards={shards}/train-*.tar", f"model.path={tiny_model}", f"output={out}", "logger=csv",
           "samples.every_n_steps=0", "data.num_workers=0", "data.batch_size=1"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert [int(r["step"]) for r in rows if r.get("train/loss")] == [0, 1]
    assert "train: 2 steps" in proc.stdout  # rank 0 reports; the export is rank 0's
    assert (out / "transformer" / "diffusion_pytorch_model.safetensors").is_file()


def strategy_of(trainer):
    return instantiate(config.load("train", [f"trainer={trainer}", "data.train_shards=x"]).trainer.strategy)


def test_fsdp_config_builds_an_fsdp2_strategy_sharding_every_block():
    from dynamictrl.train.strategies import FSDP2Strategy

    s = strategy_of("fsdp")
    assert isinstance(s, FSDP2Strategy) and s.wrap == ("DynamiCtrlBlock",) and s._save_distributed_checkpoint
    assert (s.param_dtype, s.reduce_dtype, s.reshard_after_forward) == ("bfloat16", "float32", True)
    assert s._tensor_parallel_size == 1  # pure data parallel (the 2-process run: tests/test_train_fsdp.py)


def test_deepspeed_zero3_config_offloads_parameters_and_optimizer():
    from dynamictrl.train.strategies import deepspeed_config

    cfg = config.load("train", ["trainer=deepspeed_zero3_offload", "data.train_shards=x"])
    ds = deepspeed_config(**{k: v for k, v in cfg.trainer.strategy.items() if k != "_target_"})
    zero = ds["zero_optimization"]
    assert zero["stage"] == 3 and zero["offload_param"]["device"] == "cpu" and zero["offload_optimizer"]["device"] == "cpu"
    with pytest.raises(UserError, match="needs ZeRO stage 3"):
        deepspeed_config(stage=2, offload_params=True)


def test_deepspeed_config_is_zero2_with_the_optimizer_on_the_cpu():
    from dynamictrl.train.strategies import deepspeed_config

    cfg = config.load("train", ["trainer=deepspeed_zero2_offload", "data.train_shards=x"])
    ds = deepspeed_config(**{k: v for k, v in cfg.trainer.strategy.items() if k != "_target_"})
    assert ds["zero_optimization"]["stage"] == 2
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert cfg.trainer.precision == "bf16-mixed"
    from lightning.pytorch.strategies import DeepSpeedStrategy

    s = strategy_of("deepspeed_zero2_offload")
    assert isinstance(s, DeepSpeedStrategy) and s.config["zero_optimization"]["stage"] == 2
    assert s.config["zero_optimization"]["offload_optimizer"]["device"] == "cpu"


def test_deepspeed_missing_is_a_one_line_error_with_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # an import of it now raises ImportError
    with pytest.raises(Exception, match="pip install deepspeed") as e:
        strategy_of("deepspeed_zero2_offload")
    assert isinstance(e.value.__cause__, UserError)


def test_slurm_example_is_multi_node_fsdp_with_the_slurm_environment():
    from lightning.pytorch.plugins.environments import SLURMEnvironment

    from dynamictrl.train.strategies import FSDP2Strategy

    cfg = config.load("train", ["trainer=slurm", "data.train_shards=x"])
    assert cfg.trainer.num_nodes == 2 and cfg.trainer.devices == 8 and cfg.trainer.precision == "bf16-mixed"
    assert isinstance(instantiate(cfg.trainer.strategy), FSDP2Strategy)
    assert isinstance(instantiate(cfg.trainer.plugins[0]), SLURMEnvironment)

"""Trainer configs: 2-process DDP trains on CPU (gloo); FSDP, DeepSpeed and SLURM configs compose
and build their strategy objects on CPU."""

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


def test_fsdp_config_builds_a_full_shard_strategy_with_activation_checkpointing():
    from lightning.pytorch.strategies import FSDPStrategy
    from torch.distributed.fsdp import ShardingStrategy

    from dynamictrl.models.transformer import DynamiCtrlBlock

    s = strategy_of("fsdp")
    assert isinstance(s, FSDPStrategy) and s.sharding_strategy == ShardingStrategy.FULL_SHARD
    assert s._state_dict_type == "sharded"
    assert s.kwargs["auto_wrap_policy"]._module_classes == {DynamiCtrlBlock}
    assert s._activation_checkpointing_kwargs["auto_wrap_policy"]._module_classes == {DynamiCtrlBlock}


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


def test_slurm_example_is_multi_node_ddp_with_the_slurm_environment():
    from lightning.pytorch.plugins.environments import SLURMEnvironment
    from lightning.pytorch.strategies import DDPStrategy

    cfg = config.load("train", ["trainer=slurm", "data.train_shards=x"])
    assert cfg.trainer.num_nodes == 2 and cfg.trainer.devices == 8 and cfg.trainer.precision == "bf16-mixed"
    assert isinstance(instantiate(cfg.trainer.strategy), DDPStrategy)
    assert isinstance(instantiate(cfg.trainer.plugins[0]), SLURMEnvironment)

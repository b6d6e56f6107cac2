"""Trainer configs compose and build their strategy objects on CPU. Every one of them trains on CPU
processes, launched as on a cluster, in tests/test_rehearse.py (make rehearse); FSDP2's sampling in
lockstep and LoRA under FSDP2 in tests/test_train_fsdp.py."""

import sys
from pathlib import Path

import pytest
from hydra.utils import instantiate

from dynamictrl import config
from dynamictrl.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


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
    ds = deepspeed_config(**{k: v for k, v in cfg.trainer.strategy.items() if k not in ("_target_", "process_group_backend")})
    zero = ds["zero_optimization"]
    assert zero["stage"] == 3 and zero["offload_param"]["device"] == "cpu" and zero["offload_optimizer"]["device"] == "cpu"
    with pytest.raises(UserError, match="needs ZeRO stage 3"):
        deepspeed_config(stage=2, offload_params=True)


def test_deepspeed_config_is_zero2_with_the_optimizer_on_the_cpu():
    from dynamictrl.train.strategies import deepspeed_config

    cfg = config.load("train", ["trainer=deepspeed_zero2_offload", "data.train_shards=x"])
    ds = deepspeed_config(**{k: v for k, v in cfg.trainer.strategy.items() if k not in ("_target_", "process_group_backend")})
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

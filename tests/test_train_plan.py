"""The memory plan: its table for every trainer config, its measured activations (the linear
extrapolation over blocks against a direct run), and the refusal of a model a config cannot hold."""

import pytest

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
    for checkpointing in (True, False):
        direct = max(plan.measure_activations(cfg, *clip, 1, checkpointing).values())
        assert plan.activations_by_scaling(cfg, clip, 1, checkpointing) == pytest.approx(direct, rel=0.01)
    with_ckpt = plan.activations_by_scaling(cfg, clip, 1, True)
    assert with_ckpt < plan.activations_by_scaling(cfg, clip, 1, False)


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
    from dynamictrl.train.run import run

    cfg = config.load("train", [*FIVE_B, "trainer=ddp", "gpu_gb=80", f"output={tmp_path}"])
    with pytest.raises(UserError, match="use trainer=fsdp"):
        run(cfg)  # model.path is unset (???): the refusal comes first

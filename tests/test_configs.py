"""Every shipped YAML composes, and what it builds instantiates on CPU."""

from pathlib import Path

import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

from dynamictrl import config

CONF = config.conf_dir()


def group(name):
    return sorted(p.stem for p in (CONF / name).glob("*.yaml"))


# Every trainer config builds a Trainer on CPU (GPU settings swapped for CPU ones when there is no GPU).
# FSDP and DeepSpeed Trainers refuse a CPU accelerator: their strategy objects are built in
# tests/test_train_distributed.py.
@pytest.mark.parametrize("trainer", [t for t in group("trainer") if not t.startswith(("fsdp", "deepspeed"))])
@pytest.mark.parametrize("experiment", [None, *group("experiment")])
def test_train_configs_compose_and_the_trainer_builds(trainer, experiment, tmp_path):
    overrides = [f"trainer={trainer}", "data.train_shards=x"]
    overrides += [f"experiment={experiment}"] if experiment else []
    cfg = config.load("train", overrides)
    OmegaConf.resolve(cfg)
    if trainer != "cpu" and not pytest.importorskip("torch").cuda.is_available():
        from omegaconf import open_dict

        with open_dict(cfg):
            cfg.trainer.update(accelerator="cpu", precision="32-true", devices=1, num_nodes=1)
            cfg.trainer.pop("plugins", None)  # SLURMEnvironment needs SLURM's variables
    trainer_obj = instantiate(cfg.trainer, logger=False, enable_checkpointing=False, default_root_dir=str(tmp_path))
    assert trainer_obj.max_steps == cfg.trainer.max_steps and trainer_obj.gradient_clip_val == 1.0
    opt = instantiate(cfg.module.optimizer)
    import torch

    o = opt([torch.nn.Parameter(torch.zeros(1))])
    assert instantiate(cfg.module.lr_scheduler)(o, num_training_steps=10) is not None


@pytest.mark.parametrize("model", group("model"))
def test_model_configs_compose_and_full_sizes_build_on_meta(model):
    cfg = config.load("train", [f"model={model}", "data.train_shards=x"])
    assert cfg.model.num_frames % 8 == 1
    if "transformer" in cfg.model:
        import torch

        from dynamictrl.models import DynamiCtrlTransformer3DModel

        with torch.device("meta"):
            m = DynamiCtrlTransformer3DModel(**cfg.model.transformer)
        n = sum(p.numel() for p in m.parameters())
        low, high = (1.6e9, 1.9e9) if "2b" in model else (5.5e9, 5.9e9)  # 1.69 B / 5.57 B plus PadaLN
        assert low < n < high


@pytest.mark.parametrize("clip", group("clip"))
@pytest.mark.parametrize("pose", group("pose"))
def test_preprocess_configs_compose(clip, pose):
    cfg = config.load("preprocess", [f"clip={clip}", f"pose={pose}", "input=x", "output=y"])
    assert cfg.num_frames % 8 == 1 and cfg.pose._target_
    assert all(h % 16 == 0 and w % 16 == 0 for h, w in cfg.buckets)


@pytest.mark.parametrize("stage", ["mask", "caption"])
def test_mask_and_caption_configs_compose_and_name_an_importable_backend(stage):
    """Model backends are built with tiny weights in their own tests; here every choice composes and
    its `_target_` (if any: sidecar choices load no model) is a class that exists."""
    import importlib

    for choice in group(stage):
        node = config.load("preprocess", [f"{stage}={choice}", "input=x", "output=y"])[stage]
        assert node.name
        if "_target_" in node:
            module, _, cls = node._target_.rpartition(".")
            assert isinstance(getattr(importlib.import_module(module), cls), type)


@pytest.mark.parametrize("engine", group("engine"))
def test_engine_configs_compose(engine):
    e = config.load("preprocess", [f"engine={engine}", "input=x", "output=y"]).engine
    assert e.name == engine
    if engine == "ray":  # every model stage has its pool settings, and the defaults fit a 2-CPU machine
        from dynamictrl.preprocess.resources import resolve_pools, unschedulable

        assert all({"concurrency", "num_gpus", "num_cpus", "batch_size"} <= set(e[s]) for s in ("pose", "mask", "caption"))
        assert unschedulable(resolve_pools(e, [{"CPU": 2.0}], {"pose": 1.0}), [{"CPU": 2.0}]) is None


def test_pose_backend_instantiates():
    backend = instantiate(config.load("preprocess", ["input=x", "output=y"]).pose)
    backend.reset()
    backend.close()


def test_debug_overlay_and_other_apps_compose():
    assert config.load("train", ["debug=default", "data.train_shards=x"]).trainer.max_steps == 2
    assert config.load("eval", ["generated=a", "reference=b", "output=c"]).metrics.protocol == "disco"
    # eval's config has its own folder so that model=PATH is a value, not a choice of conf/model
    ev = config.load("eval", ["dataset=tiktok", "data_root=d", "model=/some/folder", "output=c", "metrics=clean"])
    assert ev.model == "/some/folder" and ev.metrics.protocol == "clean" and ev.metrics.fvd_weights is None
    assert config.load("demo").eval_clips > 0
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF / "animate"), version_base="1.3"):
        cfg = compose("animate", ["image=a.png", "pose=b.mp4", "model=/some/folder"])
    assert cfg.pose == "b.mp4" and cfg.model == "/some/folder"


def test_every_yaml_is_covered():
    groups = ("trainer", "experiment", "model", "clip", "pose", "mask", "caption", "debug", "eval/metrics", "logger",
              "engine")
    covered = {"train", "preprocess", "precompute", "eval", "demo", "animate/animate", "eval/eval", "data/shards",
               "ablation"}  # ablation: composed in test_ablation
    covered |= {f"{g}/{n}" for g in groups for n in group(g)}
    covered |= {"hydra/launcher/slurm"}  # composed in test_preprocess_faults
    shipped = {str(p.relative_to(CONF).with_suffix("")) for p in Path(CONF).rglob("*.yaml")}
    assert shipped <= covered, shipped - covered

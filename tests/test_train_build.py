"""Where the parts are built: under every shipped trainer config the transformer exists only on the
meta device (FSDP2: already sharded) until the strategy's device gets it from the checkpoint; the
frozen encoders come in the configured dtype; T5 is not loaded when the shards are precomputed."""

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hydra.utils import instantiate

from dynamictrl import config
from dynamictrl.train import build
from dynamictrl.train.plan import strategy_kind

TRAINERS = sorted(p.stem for p in (config.conf_dir() / "trainer").glob("*.yaml"))


@pytest.fixture
def one_rank_group():
    """A world of one (gloo), for the FSDP2 device mesh."""
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def stub_trainer(cfg):
    """The config's real strategy object on the CPU, in the role Lightning gives it in configure_model."""
    strategy = instantiate(cfg.trainer.strategy) if cfg.trainer.get("strategy") else None
    if strategy is None:
        strategy = SimpleNamespace(root_device=torch.device("cpu"))
    else:
        strategy.parallel_devices = [torch.device("cpu")]
    if hasattr(strategy, "shard"):
        from torch.distributed.device_mesh import init_device_mesh

        strategy._device_mesh = init_device_mesh("cpu", (1,), mesh_dim_names=("data_parallel",))
    return SimpleNamespace(strategy=strategy, precision=cfg.trainer.precision, global_rank=0)


@pytest.mark.parametrize("trainer", TRAINERS)
def test_each_trainer_config_builds_the_module_where_it_belongs(trainer, tiny_model, precomputed, monkeypatch,
                                                                one_rank_group):  # fmt: skip
    from torch.distributed.tensor import DTensor

    cfg = config.load("train", [f"trainer={trainer}", f"data.train_shards={precomputed}", f"model.path={tiny_model}"])
    module = instantiate(cfg.module, model_path=str(tiny_model), precomputed_dir=str(precomputed))
    assert module.transformer is None and list(module.parameters()) == []  # the constructor loads nothing
    kind = strategy_kind(cfg.trainer)
    seen = {}
    original = build.load_weights

    def spy(model, folder, device):
        seen["devices"] = {p.device.type for p in model.parameters()}
        seen["sharded"] = all(isinstance(p, DTensor) for p in model.parameters())
        seen["dtype"] = {p.dtype for p in model.parameters()}
        return original(model, folder, device)

    monkeypatch.setattr(build, "load_weights", spy)
    if kind == "zero3":  # its parameters are created inside deepspeed.zero.Init (partitioned); not on CPU here
        monkeypatch.setattr(build, "load_weights_zero3", lambda *a: seen.setdefault("zero3", True))
    module._trainer = stub_trainer(cfg)
    module.configure_model()

    bf16 = "bf16" in str(cfg.trainer.precision)
    if kind == "zero3":
        assert seen == {"zero3": True}
    else:
        assert seen["devices"] == {"meta"}  # nothing materialised before the strategy placed it
        assert seen["sharded"] == (kind == "fsdp")  # FSDP2 shards while still on meta
        # DeepSpeed keeps bf16 weights (its optimizer holds the fp32 master copy); the others fp32 masters
        assert seen["dtype"] == {torch.bfloat16 if kind == "zero2" and bf16 else torch.float32}
        expected = build_reference(tiny_model)
        got = {k: (v.full_tensor() if isinstance(v, DTensor) else v) for k, v in module.transformer.state_dict().items()}
        assert all(torch.equal(got[k].float(), expected[k].to(got[k].dtype).float()) for k in expected)
    assert module.pipe.vae.dtype == (torch.bfloat16 if bf16 else torch.float32)
    assert module.pipe.text_encoder is None and module.pipe.tokenizer is None  # precomputed: no T5
    empty = torch.from_numpy(__import__("numpy").load(Path(precomputed) / build.EMPTY_TEXT))
    assert torch.equal(module._empty_text, empty)
    assert module.transformer.gradient_checkpointing is False  # auto: off below 1B parameters


def build_reference(folder):
    from dynamictrl.models.transformer import DynamiCtrlTransformer3DModel

    return DynamiCtrlTransformer3DModel.from_pretrained(folder, subfolder="transformer").state_dict()


def test_raw_shards_load_t5_in_the_configured_dtype_and_keep_the_encoders_on_the_cpu(tiny_model):
    cfg = config.load("train", ["data.train_shards=x", "module.encoder_dtype=bfloat16"])
    module = instantiate(cfg.module, model_path=str(tiny_model))
    module.configure_model()
    assert module.pipe.text_encoder.dtype == torch.bfloat16 and module.pipe.vae.dtype == torch.bfloat16
    assert module.pipe.text_encoder.device.type == "cpu"  # moved to the training device in on_fit_start


def test_empty_text_is_encoded_once_and_cached_when_precompute_did_not_store_it(tiny_model, tmp_path):
    emb = build.empty_text_embedding(tmp_path, str(tiny_model), 64, torch.float32)
    assert emb.shape == (64, 32) and (tmp_path / build.EMPTY_TEXT).is_file()
    parts = build.load_frozen(str(tiny_model), torch.float32, text_encoder=True)
    assert torch.equal(emb, build.encode_empty(parts["tokenizer"], parts["text_encoder"], 64))
    assert torch.equal(build.empty_text_embedding(tmp_path, "/nonexistent", 64, torch.float32), emb)  # from the file


def test_gradient_checkpointing_auto_turns_on_for_full_size_models(tiny_model):
    cfg = config.load("train", ["data.train_shards=x"])
    module = instantiate(cfg.module, model_path=str(tiny_model))
    from dynamictrl.train.plan import meta_transformer

    big = meta_transformer(config.load("train", ["model=cogvideox1.5-5b-i2v", "data.train_shards=x"]))
    assert module.checkpointing(big) is True
    assert module.checkpointing(meta_transformer(cfg)) is False


@pytest.mark.parametrize("trainer", ["gpu", "fsdp", "deepspeed_zero2_offload"])
def test_lora_adapters_are_added_on_the_meta_model_before_sharding_and_loading(trainer, tiny_model, precomputed,
                                                                               monkeypatch, one_rank_group):  # fmt: skip
    """LoRA with the meta build: the adapters exist (sharded under FSDP2) before anything is materialised,
    the base is filled from the checkpoint under peft's `base_layer` names in base_dtype, the adapters
    start as peft's init from the seed (B zero), the same under every strategy; DeepSpeed refuses LoRA."""
    from torch.distributed.tensor import DTensor

    from dynamictrl.errors import UserError

    lora = ["module.lora.rank=4", "module.lora.base_dtype=bfloat16", "module.ema_decay=0.9"]
    cfg = config.load("train", [f"trainer={trainer}", f"data.train_shards={precomputed}", f"model.path={tiny_model}",
                                *lora])  # fmt: skip
    module = instantiate(cfg.module, model_path=str(tiny_model), precomputed_dir=str(precomputed))
    module._trainer = stub_trainer(cfg)
    if trainer.startswith("deepspeed"):
        with pytest.raises(UserError, match="LoRA trains under trainer=gpu, ddp or fsdp, not DeepSpeed") as err:
            module.configure_model()
        assert "\n" not in str(err.value)
        return
    seen = {}
    original = build.load_weights

    def spy(model, folder, device):
        named = dict(model.named_parameters())
        seen["adapters"] = [n for n in named if ".lora_" in n]
        seen["devices"] = {p.device.type for p in named.values()}
        seen["sharded"] = all(isinstance(p, DTensor) for p in named.values())
        return original(model, folder, device)

    monkeypatch.setattr(build, "load_weights", spy)
    module.configure_model()
    assert seen["adapters"] and seen["devices"] == {"meta"} and seen["sharded"] == (trainer == "fsdp")

    def full(t):
        return t.full_tensor() if isinstance(t, DTensor) else t

    got = {k: full(v) for k, v in module.transformer.state_dict().items()}
    expected = build_reference(tiny_model)
    base = {k: v for k, v in got.items() if ".lora_" not in k}
    assert {k.replace(".base_layer.", ".") for k in base} == set(expected)
    assert all(torch.equal(v, expected[k.replace(".base_layer.", ".")].to(v.dtype)) for k, v in base.items())
    trainable = dict(module.trainable())
    assert {v.dtype for k, v in base.items() if f"{k}" not in trainable} == {torch.bfloat16}
    assert {full(p).dtype for p in trainable.values()} == {torch.float32}
    assert all(".lora_" in n or ".control_norm1." in n for n in trainable)
    lora_b = [v for k, v in got.items() if ".lora_B." in k]
    lora_a = {k: v for k, v in got.items() if ".lora_A." in k}
    assert lora_b and all(not v.any() for v in lora_b) and all(v.abs().sum() > 0 for v in lora_a.values())
    # the adapters' init is a function of the seed only (the same unsharded, on the CPU, outside a Trainer)
    plain = instantiate(config.load("train", ["data.train_shards=x", *lora]).module, model_path=str(tiny_model))
    plain.configure_model()
    ref = plain.transformer.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in lora_a.items())
    # EMA covers exactly the trainable set (adapters + PadaLN), and a LoRA checkpoint keeps it
    assert set(module.ema.names) == set(trainable)
    keys = module.checkpoint_keys()
    assert {k for k in keys if k.startswith("transformer.")} == {f"transformer.{n}" for n in trainable}
    assert "ema.updates" in keys and len(keys) == 2 * len(trainable) + 1

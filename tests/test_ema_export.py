"""The export streams: each tensor is made whole one at a time, kept on rank 0 only, and written into
diffusers' sharded safetensors files as they fill, so no rank holds the full state (8 ranks a node would
hold 8 x 23 GB of fp32 EMA at 5B). The files load with from_pretrained and equal the weights (or the
EMA averages) they came from."""

import json
import weakref

import lightning as L
import pytest
import torch
from hydra.utils import instantiate
from torch import nn

from dynamictrl import config
from dynamictrl.models.transformer import DynamiCtrlTransformer3DModel
from dynamictrl.train.export import WEIGHTS, gathered, read_weights, write_weights
from dynamictrl.train.module import EMAWeights
from dynamictrl.train.run import export
from test_grad_norm import two_processes


@pytest.fixture(scope="module")
def module(tiny_model):
    """The training module of the tiny model with an EMA that has moved away from the weights."""
    cfg = config.load("train", ["data.train_shards=x", "module.ema_decay=0.5"])
    m = instantiate(cfg.module, model_path=str(tiny_model))
    m.configure_model()
    with torch.no_grad():
        for _, p in m.trainable():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    m.ema.update([p for _, p in m.trainable()])
    return m


def nbytes(state):
    return sum(t.numel() * t.element_size() for t in state.values())


def test_a_small_shard_limit_gives_several_files_that_from_pretrained_loads(module, tmp_path):
    state = module.transformer.state_dict()
    limit = nbytes(state) // 4
    export(L.Trainer(accelerator="cpu", devices=1, logger=False), module, tmp_path / "t", shard_bytes=limit)
    files = sorted(p.name for p in (tmp_path / "t").glob(f"{WEIGHTS}*.safetensors"))
    assert len(files) >= 4 and files[0] == f"{WEIGHTS}-00001-of-{len(files):05d}.safetensors", files
    index = json.loads((tmp_path / "t" / f"{WEIGHTS}.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == nbytes(state) and set(index["weight_map"]) == set(state)
    for f in files:  # a file holds at most `limit` bytes of tensors, or one larger tensor
        held = [state[k] for k, v in index["weight_map"].items() if v == f]
        assert nbytes(dict(enumerate(held))) <= limit or len(held) == 1, f
    loaded = DynamiCtrlTransformer3DModel.from_pretrained(tmp_path / "t").state_dict()
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)


def test_the_ema_export_equals_the_ema_buffers_and_the_raw_one_the_weights(module, tmp_path):
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False)
    export(trainer, module, tmp_path / "raw")  # the default limit: one file, as before
    export(trainer, module, tmp_path / "ema", ema=True, shard_bytes=nbytes(module.transformer.state_dict()) // 3)
    assert (tmp_path / "raw" / f"{WEIGHTS}.safetensors").is_file()
    raw, ema = read_weights(tmp_path / "raw"), read_weights(tmp_path / "ema")
    weights = module.transformer.state_dict()
    averages = dict(module.ema.named_tensors())
    assert averages and all(torch.equal(ema[k], v) for k, v in averages.items())
    assert all(torch.equal(raw[k], v) for k, v in weights.items())
    assert all(not torch.equal(ema[k], weights[k]) for k in averages)  # the EMA is not the weights
    assert all(torch.equal(ema[k], v) for k, v in weights.items() if k not in averages)  # the rest: the model's
    loaded = DynamiCtrlTransformer3DModel.from_pretrained(tmp_path / "ema").state_dict()
    assert all(torch.equal(loaded[k], ema[k]) for k in ema)


def tiny() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*(nn.Linear(16, 16) for _ in range(5)), nn.LayerNorm(16))  # tensors < a shard


def watched(tensors, rank: int, limit: int):
    """The stream, checked as it flows: nothing reaches rank 1; on rank 0 the gathered tensors still
    alive (in the shard being filled) never exceed one shard plus the incoming tensor."""
    live: dict[int, int] = {}
    for name, t in tensors:
        if rank:
            assert t is None, name
        else:
            live[id(t)] = t.numel() * t.element_size()
            weakref.finalize(t, live.pop, id(t))
            assert sum(live.values()) <= limit + live[id(t)], (name, live)
        yield name, t


def _gather_under_fsdp2(rank: int, out: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    full = tiny().state_dict()
    model = tiny()
    mesh = init_device_mesh("cpu", (2,))
    for layer in model:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    ema = EMAWeights(list(model.named_parameters()), decay=0.5)  # shards, like the weights
    limit = nbytes(full) // 3
    for kind, named in (("weights", model.state_dict().items()), ("ema", ema.named_tensors())):
        stream = watched(gathered(named, keep=rank == 0), rank, limit)
        if rank:
            assert all(t is None for _, t in stream)
            continue
        files = write_weights(f"{out}/{kind}", stream, limit)
        assert len(files) >= 3
        written = read_weights(f"{out}/{kind}")
        assert written.keys() == full.keys() and all(torch.equal(written[k], full[k]) for k in full), kind


def test_under_fsdp2_rank_0_writes_the_whole_weights_and_the_other_rank_holds_none(tmp_path):
    two_processes(_gather_under_fsdp2, str(tmp_path))


def _gather_under_zero3(rank: int, out: str) -> None:
    import os

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2")
    import deepspeed

    from dynamictrl.train.export import zero3_gathered

    deepspeed.init_distributed(dist_backend="gloo")
    full = tiny().state_dict()
    with deepspeed.zero.Init(config_dict_or_path={"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 1}):
        model = tiny()  # created partitioned: no rank holds a whole parameter
    assert all(p.numel() == 0 for p in model.parameters())
    limit = nbytes(full) // 3
    stream = watched(zero3_gathered(model, keep=rank == 0), rank, limit)
    if rank:
        assert all(t is None for _, t in stream)
        return
    write_weights(f"{out}/zero3", stream, limit)
    written = read_weights(f"{out}/zero3")
    assert written.keys() == full.keys() and all(torch.equal(written[k], full[k]) for k in full)


def test_under_deepspeed_zero3_rank_0_writes_the_whole_weights_gathered_module_by_module(tmp_path):
    pytest.importorskip("deepspeed")
    two_processes(_gather_under_zero3, str(tmp_path))

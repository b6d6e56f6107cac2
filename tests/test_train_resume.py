"""Exact resume: a run stopped at step 10 and resumed to 20 logs the losses of an uninterrupted run."""

import csv

import pytest
import torch

from dynamictrl import config
from dynamictrl.train.datamodule import ShardDataModule
from dynamictrl.train.run import run


def losses(path):
    return {int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(open(path)) if r.get("train/loss")}


def train_cfg(shards, model, out, *extra):
    return config.load("train", ["experiment=demo", f"data.train_shards={shards}/train-*.tar", f"model.path={model}",
                                 f"output={out}", "logger=csv", "samples.every_n_steps=0", "data.batch_size=2",
                                 "data.num_workers=2", "trainer.enable_progress_bar=false", "checkpoint_every=5",
                                 "module.ref_drop=0.3", "module.text_drop=0.3", *extra])  # fmt: skip


@pytest.mark.slow
def test_resumed_run_logs_the_losses_of_an_uninterrupted_run(tiny_model, shards, tmp_path):
    full = run(train_cfg(shards, tiny_model, tmp_path / "full", "trainer.max_steps=20"))
    run(train_cfg(shards, tiny_model, tmp_path / "split", "trainer.max_steps=10"))
    resumed = run(train_cfg(shards, tiny_model, tmp_path / "split", "trainer.max_steps=20", "resume=true"))
    a, b = losses(full["metrics_csv"]), losses(resumed["metrics_csv"])
    assert sorted(a) == list(range(20)) and sorted(b) == list(range(20))  # CSV steps are 0-based: 10..19 = 11..20
    for step in range(10, 20):
        assert b[step] == pytest.approx(a[step], rel=1e-4), step
    assert len(set(round(a[s], 6) for s in range(20))) > 15  # the losses differ from step to step
    ckpt = torch.load(resumed["last_ckpt"], weights_only=False, map_location="cpu")
    assert ckpt["global_step"] == 20 and "ShardDataModule" in ckpt and ckpt["optimizer_states"]
    assert ckpt["lr_schedulers"][0]["last_epoch"] == 20
    periodic = sorted(p.name for p in (tmp_path / "split" / "checkpoints").glob("step-*.ckpt"))
    assert periodic == ["step-000015.ckpt", "step-000020.ckpt"]  # keep_checkpoints=2, across the resume too


def keys_of(dm, n):
    out, it = [], iter(dm.train_dataloader())
    for _ in range(n):
        out.append(tuple(dm.on_before_batch_transfer(next(it), 0)["key"]))
    return out


@pytest.mark.parametrize("workers", [0, 2])
def test_the_data_position_is_saved_and_restored(shards, workers):
    """Without a model: batches 4..9 after a restore at 4 are batches 4..9 of one uninterrupted stream,
    with dataloader workers too (a resumed loader rotates its workers to keep the global order)."""

    def dm():
        d = ShardDataModule(f"{shards}/train-*.tar", num_frames=9, batch_size=2, num_workers=workers, shuffle_buffer=4)
        d.setup()
        return d

    continuous = keys_of(dm(), 9)
    first = dm()
    head = keys_of(first, 3)
    state = first.state_dict()
    second = dm()
    second.load_state_dict(state)
    assert head + keys_of(second, 6) == continuous
    assert len(set(continuous)) > 3  # several different batches over epochs


@pytest.mark.slow
def test_a_resumed_run_continues_the_same_wandb_run(tiny_model, shards, tmp_path):
    """The wandb run id is kept in OUTPUT/wandb-run-id.txt: a resumed (or requeued) run logs to the same
    wandb run (offline here: both runs' folders carry the one id)."""
    out = tmp_path / "w"
    run(train_cfg(shards, tiny_model, out, "trainer.max_steps=2", "logger=default", "checkpoint_every=2"))
    run_id = (out / "wandb-run-id.txt").read_text().strip()
    run(train_cfg(shards, tiny_model, out, "trainer.max_steps=4", "logger=default", "checkpoint_every=2", "resume=true"))
    folders = sorted((out / "wandb").glob("offline-run-*"))
    # one folder per start (one only when both started within the same second); a new id would add one
    assert folders and all(f.name.endswith(f"-{run_id}") for f in folders), folders
    assert (out / "wandb-run-id.txt").read_text().strip() == run_id
    import wandb

    assert wandb.run is None  # closed: the next training in this process starts a run of its own

"""Checkpoints on a bounded disk: the newest `keep_checkpoints` step-N.ckpt are kept, and last.ckpt is a
link moved atomically to the newest complete one, so a job killed while a checkpoint is written (minutes
at 5B) resumes from the previous one instead of a half-written last.ckpt."""

import csv
import os

import pytest
import torch
from lightning.pytorch.strategies import Strategy

from dynamictrl import config
from dynamictrl.errors import UserError
from dynamictrl.train.run import resume_path, run


def train_cfg(shards, model, out, *extra):
    return config.load("train", [f"data.train_shards={shards}/train-*.tar", f"model.path={model}", f"output={out}",
                                 "debug=default", "data.batch_size=1", "checkpoint_every=2", "keep_checkpoints=2",
                                 *extra])  # fmt: skip


def periodic(out):
    return sorted(p.name for p in (out / "checkpoints").glob("step-*.ckpt"))


def step_of(ckpt):
    return torch.load(ckpt, weights_only=True, map_location="cpu")["global_step"]


def losses(out):
    return {int(r["step"]) for r in csv.DictReader(open(out / "metrics.csv")) if r.get("train/loss")}


@pytest.mark.slow
def test_two_checkpoints_are_kept_and_last_links_the_newest_which_resumes(tiny_model, shards, tmp_path):
    out = tmp_path / "run"
    result = run(train_cfg(shards, tiny_model, out, "trainer.max_steps=6"))
    last = out / "checkpoints" / "last.ckpt"
    assert last.is_symlink() and os.readlink(last) == "step-000006.ckpt"  # relative: the folder can move
    assert periodic(out) == ["step-000004.ckpt", "step-000006.ckpt"] and result["last_ckpt"] == str(last)
    assert step_of(last) == 6

    run(train_cfg(shards, tiny_model, out, "trainer.max_steps=8", "resume=true"))
    assert os.readlink(last) == "step-000008.ckpt" and step_of(last) == 8
    assert periodic(out) == ["step-000006.ckpt", "step-000008.ckpt"]
    assert losses(out) == set(range(8))  # 0-5 before the resume, 6-7 after it


@pytest.mark.slow
def test_a_kill_while_the_final_checkpoint_is_written_leaves_last_at_the_previous_one(tiny_model, shards, tmp_path,
                                                                                     monkeypatch):  # fmt: skip
    """The strategies that matter at 5B write their checkpoint in place, a folder of shards (FSDP2, DeepSpeed):
    killed half way, what is on disk is neither the old checkpoint nor the new one."""
    out = tmp_path / "run"
    real = Strategy.save_checkpoint

    def killed_at_step_5(self, checkpoint, filepath, storage_options=None):
        if checkpoint["global_step"] == 5:
            with open(filepath, "wb") as f:
                f.write(b"PK\x03\x04 half a checkpoint")
            raise RuntimeError("killed while saving")
        return real(self, checkpoint, filepath, storage_options)

    monkeypatch.setattr(Strategy, "save_checkpoint", killed_at_step_5)
    with pytest.raises(RuntimeError, match="killed while saving"):
        run(train_cfg(shards, tiny_model, out, "trainer.max_steps=5"))  # checkpoints at 2, 4, and the end (5)
    monkeypatch.setattr(Strategy, "save_checkpoint", real)
    last = out / "checkpoints" / "last.ckpt"
    assert step_of(last) == 4  # the link never moved to the half-written step 5
    assert resume_path(config.load("train", ["data.train_shards=x", "resume=auto"]), last).endswith("step-000004.ckpt")

    run(train_cfg(shards, tiny_model, out, "trainer.max_steps=5", "resume=true"))
    assert os.readlink(last) == "step-000005.ckpt" and step_of(last) == 5  # the half-written one was replaced
    assert periodic(out) == ["step-000004.ckpt", "step-000005.ckpt"]


def test_pruning_keeps_the_newest_up_to_the_linked_one_and_leaves_later_leftovers(tmp_path):
    from dynamictrl.train.callbacks import prune, relink

    for step in (2, 4, 6, 8):
        (tmp_path / f"step-{step:06d}.ckpt").write_text("a file")
    (tmp_path / "step-000010.ckpt").mkdir()  # a folder of shards a killed run left half written
    (tmp_path / "step-000010.ckpt" / "__0_0.distcp").write_text("half")
    relink(tmp_path / "last.ckpt", tmp_path / "step-000006.ckpt")
    relink(tmp_path / "last.ckpt", tmp_path / "step-000008.ckpt")  # replaces the link (os.replace)
    prune(tmp_path, 2, tmp_path / "step-000008.ckpt")
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["last.ckpt", "step-000006.ckpt", "step-000008.ckpt", "step-000010.ckpt"]
    assert os.readlink(tmp_path / "last.ckpt") == "step-000008.ckpt"
    prune(tmp_path, 0, tmp_path / "step-000008.ckpt")  # 0 or 1: the newest only
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt", "step-000008.ckpt", "step-000010.ckpt"]
    prune(tmp_path, -1, tmp_path / "step-000008.ckpt")  # -1: all
    assert (tmp_path / "step-000008.ckpt").is_file()


def test_a_link_to_a_missing_checkpoint_is_a_one_line_error(tmp_path):
    last = tmp_path / "last.ckpt"
    os.symlink("step-000006.ckpt", last)
    for mode in ("true", "auto"):
        with pytest.raises(UserError, match="points at step-000006.ckpt, which is missing") as err:
            resume_path(config.load("train", ["data.train_shards=x", f"resume={mode}"]), last)
        assert "\n" not in str(err.value)

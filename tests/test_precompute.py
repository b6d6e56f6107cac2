"""Precompute: shards of VAE latents and T5 embeddings train to the raw path's first-step loss."""

import csv
import io
import tarfile

import numpy as np
import pytest
import torch
from hydra.utils import instantiate

from dynamictrl import config
from dynamictrl.train.precompute import run as precompute
from dynamictrl.train.run import run as train


def test_precomputed_shards_hold_npy_members_only(precomputed):
    with tarfile.open(next(precomputed.glob("*.tar"))) as tar:
        names = tar.getnames()
        suffixes = {n.split(".", 1)[1] for n in names}
        assert suffixes == {"latents.npy", "pose_latents.npy", "text.npy", "ref.npy", "ref_mask.npy", "txt", "json"}
        ref = np.load(io.BytesIO(tar.extractfile(next(n for n in names if n.endswith(".ref.npy"))).read()),
                      allow_pickle=False)  # fmt: skip
        assert ref.dtype == np.uint8 and ref.shape == (96, 64, 3)


def first_loss(shards_glob, model, out):
    cfg = config.load("train", ["experiment=demo", f"data.train_shards={shards_glob}", f"model.path={model}",
                                f"output={out}", "debug=default", "trainer.max_steps=1", "data.batch_size=2",
                                "module.ref_drop=0.5", "module.text_drop=0.5", "module.mask_reference=true"])  # fmt: skip
    rows = list(csv.DictReader(open(train(cfg)["metrics_csv"])))
    return float(rows[0]["train/loss"])


def test_precomputed_training_gives_the_raw_first_step_loss(tiny_model, shards, precomputed, tmp_path):
    raw = first_loss(f"{shards}/train-*.tar", tiny_model, tmp_path / "raw")
    pre = first_loss(f"{precomputed}/*.tar", tiny_model, tmp_path / "pre")
    assert pre == pytest.approx(raw, rel=1e-5)  # measured: ~3e-8 (float32 rounding of batched vs single encodes)


def test_precomputed_and_raw_batches_agree_under_every_recipe_option(tiny_model, shards, precomputed):
    cfg = config.load("train", ["experiment=demo", f"data.train_shards={shards}/train-*.tar", "data.num_workers=0",
                                "data.batch_size=3", "module.cache_latents=false"])  # fmt: skip
    module = instantiate(cfg.module, model_path=str(tiny_model))
    module.configure_model()
    batches = []
    for glob in (f"{shards}/train-*.tar", f"{precomputed}/*.tar"):
        dm = instantiate(cfg.data, train_shards=glob)
        dm.setup()
        batches.append(next(iter(dm.train_dataloader())))
    raw, pre = batches
    assert raw["key"] == pre["key"]  # same order, same buckets
    assert torch.equal(raw["video"][:, :, 0], pre["ref"]) and torch.equal(raw["mask"][:, 0], pre["ref_mask"])
    for opts in [dict(), dict(mask_reference=True, text_drop=1.0), dict(ref_drop=1.0)]:
        module.hparams.update(dict(mask_reference=False, text_drop=0.0, ref_drop=0.0) | opts)
        a = module.loss(raw, generator=module.step_generator(3))
        b = module.loss(pre, generator=module.step_generator(3))
        assert b.item() == pytest.approx(a.item(), rel=1e-5), opts


def test_precompute_is_resumable_and_a_wrong_frame_count_is_a_clear_error(tiny_model, shards, precomputed):
    again = precompute(config.load("precompute", [f"input={shards}/train-*.tar", f"output={precomputed}",
                                                  f"model.path={tiny_model}", "progress=false"]))  # fmt: skip
    assert again["clips"] == 0  # every shard already done
    from dynamictrl.errors import UserError
    from dynamictrl.train.datamodule import ShardDataModule

    dm = ShardDataModule(f"{precomputed}/*.tar", num_frames=17)
    dm.setup()
    with pytest.raises(UserError, match="precomputed for 9 frames"):
        next(iter(dm.train_dataloader()))

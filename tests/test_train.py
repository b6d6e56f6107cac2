"""Training: one step learns through PadaLN, and the train app writes metrics.csv and last.ckpt."""

import csv

import torch

from dynamictrl import config
from dynamictrl.train.run import run


def test_a_training_step_updates_the_transformer_and_padaln(tiny_model, shards, tmp_path):
    cfg = config.load("train", ["experiment=demo", f"data.train_shards={shards}/train-*.tar", f"output={tmp_path}",
                                "data.batch_size=2", "module.ref_drop=0"])  # fmt: skip
    from hydra.utils import instantiate

    module = instantiate(cfg.module, model_path=str(tiny_model))
    dm = instantiate(cfg.data)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    assert batch["video"].shape == (2, 3, 9, 96, 64)
    loss = module.loss(batch, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(loss) and loss > 0
    loss.backward()
    grad = module.transformer.transformer_blocks[0].control_norm1.linear.weight.grad
    assert grad is not None and grad.abs().sum() > 0
    assert all(p.grad is None for p in module.pipe.vae.parameters())  # frozen


def test_train_app_writes_metrics_and_checkpoint(tiny_model, shards, tmp_path, monkeypatch):
    monkeypatch.setenv("DYNAMICTRL_DATA", str(tmp_path / "data"))
    cfg = config.load("train", [f"data.train_shards={shards}/train-*.tar", f"output={tmp_path / 'out'}",
                                f"model.path={tiny_model}", "debug=default", "trainer.max_steps=3"])  # fmt: skip
    result = run(cfg)
    rows = list(csv.DictReader(open(result["metrics_csv"])))
    assert "step" in rows[0] and "train/loss" in rows[0]
    assert len([r for r in rows if r["train/loss"]]) == 3
    assert (tmp_path / "out" / "checkpoints" / "last.ckpt").is_file()
    state = torch.load(result["last_ckpt"], weights_only=True, map_location="cpu")["state_dict"]
    assert all(k.startswith("transformer.") for k in state)  # frozen VAE/T5 stay out of checkpoints
    assert (tmp_path / "out" / "transformer" / "diffusion_pytorch_model.safetensors").is_file()


import pytest  # noqa: E402


@pytest.mark.parametrize("control", ["uvt", "cross_attn"])
def test_ablation_variants_train_from_the_same_checkpoint(control, tiny_model, shards, tmp_path):
    from hydra.utils import instantiate

    cfg = config.load("train", ["experiment=demo", f"data.train_shards={shards}/train-*.tar", f"output={tmp_path}",
                                f"model.control={control}", "model.pose_init=zero"])  # fmt: skip
    module = instantiate(cfg.module, model_path=str(tiny_model))
    assert module.transformer.config.control == control
    dm = instantiate(cfg.data)
    dm.setup()
    loss = module.loss(next(iter(dm.train_dataloader())), generator=torch.Generator().manual_seed(0))
    loss.backward()
    assert torch.isfinite(loss)

"""FSDP2 on CPU: two gloo processes train the tiny model with trainer=fsdp (the config GPU clusters
use), sample in lockstep, save a sharded checkpoint, resume from it, and export a diffusers
transformer equal to the sharded weights gathered offline."""

import csv
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def train(out, tiny_model, shards, steps, *extra):
    cmd = [sys.executable, str(ROOT / "pipelines" / "train" / "main.py"), "trainer=fsdp", "trainer.accelerator=cpu",
           "trainer.devices=2", "trainer.precision=32-true", "trainer.strategy.param_dtype=null",
           f"trainer.max_steps={steps}", "trainer.log_every_n_steps=1", "trainer.enable_progress_bar=false",
           f"data.train_shards={shards}/train-*.tar", f"model.path={tiny_model}", f"output={out}", "logger=csv",
           "data.num_workers=0", "data.batch_size=1", "module.ema_decay=0.9", "module.optimizer.lr=1e-3",
           "checkpoint_every=100", *extra]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def consolidated(ckpt: Path, tmp: Path) -> dict:
    """The sharded checkpoint folder gathered into one state dict by torch's own converter."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    tmp.mkdir(parents=True, exist_ok=True)
    dcp_to_torch_save(ckpt, tmp / "full.pt")
    return torch.load(tmp / "full.pt", weights_only=True)


def base_weights(folder: Path) -> dict:
    from dynamictrl.models.transformer import DynamiCtrlTransformer3DModel

    return DynamiCtrlTransformer3DModel.from_pretrained(folder, subfolder="transformer").state_dict()


def exported(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "diffusion_pytorch_model.safetensors"))


@pytest.mark.slow
def test_two_process_fsdp2_trains_saves_resumes_and_exports_the_gathered_weights(tiny_model, shards, tmp_path):
    out = tmp_path / "fsdp"
    train(out, tiny_model, shards, 2, "samples.every_n_steps=2", "samples.num_inference_steps=2")
    ckpt = out / "checkpoints" / "last.ckpt"
    assert ckpt.is_dir() and sorted(p.name for p in ckpt.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    # every rank sampled its own clip at step 2 (in lockstep: FSDP2's forward needs both ranks' shards)
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["step-000002-rank1.mp4", "step-000002.mp4"]

    full = consolidated(ckpt, tmp_path / "a")["state_dict"]
    weights = {k[len("transformer.") :]: v for k, v in full.items() if k.startswith("transformer.")}
    ema = {k[len("ema.") :].replace("-", "."): v for k, v in full.items() if k.startswith("ema.") and k != "ema.updates"}
    raw, averaged = exported(out / "transformer_raw"), exported(out / "transformer")
    assert raw.keys() == weights.keys() and len(weights) > 20
    assert all(torch.equal(raw[k], weights[k]) for k in weights)  # export == the shards gathered offline
    assert all(torch.equal(averaged[k], ema[k]) for k in ema)  # the EMA export, from its shards
    assert any(not torch.equal(averaged[k], weights[k]) for k in ema)
    before = base_weights(tiny_model)
    assert any(not torch.equal(before[k], weights[k]) for k in weights)  # it trained

    train(out, tiny_model, shards, 3, "samples.every_n_steps=0", "resume=true")
    rows = [r for r in csv.DictReader(open(out / "metrics.csv")) if r.get("train/loss")]
    assert [int(r["step"]) for r in rows] == [0, 1, 2]
    again = consolidated(ckpt, tmp_path / "b")
    assert int(again["state_dict"]["ema.updates"]) == 3  # 2 restored + 1: the EMA came back from the shards
    steps = {int(s["step"]) for s in again["optimizer_0"]["state"].values()}
    assert steps == {3}  # AdamW's state was restored, not restarted
    weights = {k[len("transformer.") :]: v for k, v in again["state_dict"].items() if k.startswith("transformer.")}
    raw = exported(out / "transformer_raw")
    assert all(torch.equal(raw[k], weights[k]) for k in weights)


@pytest.mark.slow
def test_two_process_fsdp2_lora_saves_the_trainable_shards_only_and_resumes_from_them(tiny_model, shards, tmp_path):
    """LoRA under FSDP2: the adapters are sharded with the base, the DCP checkpoint holds the adapters, PadaLN
    and their EMA only, a resume loads that partial checkpoint (optimizer and EMA included), and the
    exported LoRA equals the gathered shards."""
    from safetensors.torch import load_file

    from dynamictrl.models.lora import LORA_FILE, POSE_FILE

    out = tmp_path / "lora"
    train(out, tiny_model, shards, 2, "samples.every_n_steps=0", "module.lora.rank=4")
    ckpt = out / "checkpoints" / "last.ckpt"
    saved = consolidated(ckpt, tmp_path / "a")["state_dict"]
    weights = {k.removeprefix("transformer."): v for k, v in saved.items() if k.startswith("transformer.")}
    assert weights and all(".lora_" in k or ".control_norm1." in k for k in weights)  # no frozen base
    assert {k.removeprefix("ema.").replace("-", ".") for k in saved if k.startswith("ema.")} == {*weights, "updates"}
    assert any(".lora_B." in k and v.abs().sum() > 0 for k, v in weights.items())  # B trained away from zero

    train(out, tiny_model, shards, 3, "samples.every_n_steps=0", "module.lora.rank=4", "resume=true")
    again = consolidated(ckpt, tmp_path / "b")
    assert int(again["state_dict"]["ema.updates"]) == 3  # 2 restored + 1
    assert {int(s["step"]) for s in again["optimizer_0"]["state"].values()} == {3}  # AdamW restored
    weights = {k.removeprefix("transformer."): v for k, v in again["state_dict"].items() if k.startswith("transformer.")}
    pose = load_file(str(out / "lora_raw" / POSE_FILE))
    adapters = load_file(str(out / "lora_raw" / LORA_FILE))
    assert pose and all(torch.equal(v, weights[k]) for k, v in pose.items())
    for key, value in adapters.items():  # transformer.X.lora_A.weight <- X.lora_A.default.weight
        name = key.removeprefix("transformer.").replace(".lora_A.", ".lora_A.default.").replace(".lora_B.", ".lora_B.default.")
        assert torch.equal(value, weights[name])

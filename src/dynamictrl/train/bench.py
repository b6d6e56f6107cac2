"""Training benchmarks for `make bench`: loader throughput against what a step consumes, raw against
precomputed shards, and step time / peak memory per trainer config that runs here (MFU on a GPU).

Everything runs on the embedded tiny model's architecture (VAE fit skipped: speed does not depend on
it) and a few synthetic clips, so absolute numbers only say how the parts compare on this machine.
"""

from __future__ import annotations

import csv
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

# bf16 dense peak FLOP/s by device name, for MFU
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12, "4090": 165e12}


def _loader_clips_per_s(glob: str, num_frames: int, batches: int = 6) -> float:
    from dynamictrl.train.datamodule import ShardDataModule

    dm = ShardDataModule(glob, num_frames=num_frames, batch_size=2, num_workers=0)
    dm.setup()
    it = iter(dm.train_dataloader())
    next(it)
    start, clips = time.perf_counter(), 0
    for _ in range(batches):
        clips += len(next(it)["caption"])
    return clips / (time.perf_counter() - start)


def _step_s(module: Any, batch: dict, steps: int = 4) -> float:
    opt = torch.optim.AdamW(module.transformer.parameters(), lr=1e-5)
    times = []
    for i in range(steps + 1):
        start = time.perf_counter()
        opt.zero_grad()
        module.loss(batch, generator=module.step_generator(i)).backward()
        opt.step()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def _trainer_run(trainer: str, shards: str, model: Path, out: Path, extra: list[str]) -> dict[str, float]:
    from dynamictrl import config
    from dynamictrl.train.run import run

    cfg = config.load("train", [f"trainer={trainer}", f"data.train_shards={shards}", f"model.path={model}",
                                f"output={out}", "logger=csv", "samples.every_n_steps=0", "trainer.max_steps=6",
                                "trainer.log_every_n_steps=1", "trainer.enable_progress_bar=false",
                                "data.num_workers=0", "data.batch_size=2", "checkpoint_every=1000", *extra])  # fmt: skip
    rows = list(csv.DictReader(open(run(cfg)["metrics_csv"])))
    steps = [float(r["perf/step_s"]) for r in rows if r.get("perf/step_s")][1:]
    mem = max(float(r["perf/peak_mem_gb"]) for r in rows if r.get("perf/peak_mem_gb"))
    return {"step_s": statistics.median(steps), "peak_mem_gb": mem}


def _mfu(module: Any, batch: dict, step_s: float) -> dict[str, Any]:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        module.loss(batch, generator=module.step_generator(0)).backward()
    name = torch.cuda.get_device_name()
    peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
    flops = counter.get_total_flops()
    return {"device": name, "flops_per_step": flops, "peak_bf16": peak,
            "mfu": flops / step_s / peak if peak else None}  # fmt: skip


def run() -> tuple[dict, list[str]]:
    from hydra.utils import instantiate

    from dynamictrl import config
    from dynamictrl.data.synthetic import generate
    from dynamictrl.models import embedded
    from dynamictrl.preprocess.run import run as preprocess
    from dynamictrl.train.precompute import run as precompute

    root = Path(tempfile.mkdtemp(prefix="dynamictrl-train-bench-"))
    model = embedded.build(root / "model", vae_steps=2, progress=False)
    raw = generate(root / "raw", num_train=3, num_test=1, num_frames=20, progress=False)
    preprocess(config.load("preprocess", [f"input={raw}", f"output={root / 'shards'}", "progress=false"]))
    raw_glob = f"{root / 'shards'}/train-*.tar"
    pre = precompute(config.load("precompute", [f"input={raw_glob}", f"output={root / 'pre'}",
                                                f"model.path={model}", "progress=false"]))  # fmt: skip
    pre_glob = f"{root / 'pre'}/*.tar"
    cfg = config.load("train", [f"data.train_shards={raw_glob}", f"model.path={model}", "data.batch_size=2"])
    module = instantiate(cfg.module, model_path=str(model))
    module.configure_model()
    frames = int(cfg.data.num_frames)
    batches = {}
    for name, glob in (("raw", raw_glob), ("precomputed", pre_glob)):
        dm = instantiate(cfg.data, train_shards=glob, num_workers=0)
        dm.setup()
        batches[name] = dm.on_before_batch_transfer(next(iter(dm.train_dataloader())), 0)
    res: dict[str, Any] = {"precompute_clips_per_s": pre["clips"] / pre["seconds"], "loader": {}, "step": {}}
    for name, glob in (("raw", raw_glob), ("precomputed", pre_glob)):
        step = _step_s(module, batches[name])
        res["loader"][name] = _loader_clips_per_s(glob, frames)
        res["step"][name] = {"step_s": step, "clips_per_s_consumed": 2 / step}
    res["precompute_speedup"] = res["step"]["raw"]["step_s"] / res["step"]["precomputed"]["step_s"]
    configs = ["cpu"] + (["gpu", "ddp", "fsdp"] if torch.cuda.is_available() else [])
    res["trainers"] = {}
    for t in configs:
        extra = ["trainer.devices=1"] if t in ("ddp", "fsdp") else []
        for name, glob in (("raw", raw_glob), ("precomputed", pre_glob)):
            res["trainers"][f"{t} ({name})"] = _trainer_run(t, glob, model, root / f"run-{t}-{name}", extra)
    if torch.cuda.is_available():
        module.to("cuda")
        module.on_fit_start()
        gpu_batch = {k: v.cuda() if torch.is_tensor(v) else v for k, v in batches["precomputed"].items()}
        with torch.autocast("cuda", dtype=torch.bfloat16):
            res["mfu"] = _mfu(module, gpu_batch, _step_s(module, gpu_batch))

    lines = ["## Training (tiny model, 9 frames at 96x64, batch 2)", "",
             "| shards | loader clips/s | step s (fwd+bwd+AdamW) | clips/s a step consumes |", "|---|---|---|---|"]
    for name in ("raw", "precomputed"):
        s = res["step"][name]
        lines.append(f"| {name} | {res['loader'][name]:.1f} | {s['step_s']:.3f} | {s['clips_per_s_consumed']:.1f} |")
    lines += ["", f"Precomputed shards: {res['precompute_speedup']:.2f}x faster steps (the VAE encodes of clip and "
              f"pose and the T5 pass leave the step); precompute itself ran at {res['precompute_clips_per_s']:.2f} clips/s.",
              "", "| trainer config (shards) | median step s | peak memory GB |", "|---|---|---|"]  # fmt: skip
    lines += [f"| {k} | {v['step_s']:.3f} | {v['peak_mem_gb']:.2f} |" for k, v in res["trainers"].items()]
    lines += ["", "Trainer step time is the wall time between steps, data loading included. Peak memory: CUDA "
              "max allocated on a GPU; on CPU the process's peak resident set, which only grows over the run."]  # fmt: skip
    if "mfu" in res:
        m = res["mfu"]
        mfu = f"{100 * m['mfu']:.2f}%" if m["mfu"] is not None else "unknown peak"
        lines += ["", f"MFU on {m['device']}: {m['flops_per_step'] / 1e9:.1f} GFLOP a step, {mfu} of bf16 peak "
                  "(the tiny model cannot fill a GPU: measure at scale with model=cogvideox1.5-5b-i2v)."]  # fmt: skip
    else:
        lines += ["", "MFU: no GPU here (measured when one is present)."]
    lines.append("")
    shutil.rmtree(root, ignore_errors=True)
    return res, lines


if __name__ == "__main__":
    print("\n".join(run()[1]))

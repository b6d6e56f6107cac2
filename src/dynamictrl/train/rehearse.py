"""Cluster rehearsal on CPU processes: every shipped trainer config trains the real DynamiCtrlModule
the way its users launch it, with the config's own precision and strategy class.

    python -m dynamictrl.train.rehearse [CONFIG ...] [--out DIR]      (make rehearse ARGS="fsdp slurm")

For each config (ROWS): 3 steps, a checkpoint, a SIGKILL of every process, a resume for 2 more steps
and the export; beside it the same 5 steps uninterrupted. A row passes when
- the killed run left its step-3 checkpoint and `last.ckpt` points at it,
- the resumed run's losses at steps 4-5 and its export equal the uninterrupted run's ("resume equal"),
- the export loads with `from_pretrained` (LoRA: its two files) and equals the weights of the final
  checkpoint gathered offline by the strategy's own converter ("export equal"),
- (slurm) both tasks name one wandb run;
and across rows, the first-step losses (same weights, same batch) agree to bf16 rounding: a strategy
that loaded the wrong or no weights, or a wrong dtype path, stands out.

What may differ from a GPU run, and only this: `trainer.accelerator=cpu`, `devices`/`num_nodes` (2
processes, or 1 for the one-GPU configs), the process-group backend (gloo), the tiny model and its
small dataset (model.path, data.train_shards, the clip size), a learning rate that moves the tiny
weights in 5 steps with no warm-up, and no sample videos. Precision (bf16-mixed where the config says
so), strategy class (FSDP2 `fully_shard` with its mixed-precision policy and activation checkpointing
forced on; DeepSpeed's engine on its CPU accelerator, `zero.Init` for ZeRO-3) and launcher variables
(torchrun's; for `slurm` only what `srun` sets: SLURM_PROCID, SLURM_LOCALID, SLURM_NTASKS, SLURM_NODEID,
SLURM_JOB_NAME, ..., no RANK/LOCAL_RANK) are the config's. Workers run from another directory than
the driver's. What only a GPU can show (NCCL, CUDA kernels, memory, speed) is in README "Train".
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import random
import resource
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L

LAUNCH_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT",
               "TORCHELASTIC_RUN_ID")  # fmt: skip
KILL_AT, TOTAL = 3, 5
AGREE = 0.01  # relative spread of the first-step loss across configs (fp32 and bf16 strategies)


@dataclass
class Row:
    """One trainer config as its users launch it: `torchrun` (N processes), `srun` (N one-task nodes) or
    `python` (one process)."""

    name: str
    overrides: list[str]
    launcher: str
    procs: int = 2
    lora: bool = False
    cpu: list[str] = field(default_factory=list)  # the CPU overrides: accelerator, devices/nodes, backend


GLOO = "trainer.strategy.process_group_backend=gloo"
ROWS = {
    "fsdp": Row("fsdp", ["trainer=fsdp", "module.gradient_checkpointing=true"], "torchrun",
                cpu=["trainer.accelerator=cpu", "trainer.devices=2", GLOO]),
    "slurm": Row("slurm", ["trainer=slurm", "module.gradient_checkpointing=true", "logger=default"], "srun",
                 cpu=["trainer.accelerator=cpu", "trainer.devices=1", "trainer.num_nodes=2", GLOO]),
    "ddp": Row("ddp", ["trainer=ddp"], "torchrun", cpu=["trainer.accelerator=cpu", "trainer.devices=2", GLOO]),
    "gpu": Row("gpu", ["trainer=gpu"], "python", procs=1, cpu=["trainer.accelerator=cpu"]),
    "deepspeed_zero2_offload": Row("deepspeed_zero2_offload", ["trainer=deepspeed_zero2_offload"], "torchrun",
                                   cpu=["trainer.accelerator=cpu", "trainer.devices=2", GLOO]),
    "deepspeed_zero3_offload": Row("deepspeed_zero3_offload", ["trainer=deepspeed_zero3_offload"], "torchrun",
                                   cpu=["trainer.accelerator=cpu", "trainer.devices=2", GLOO]),
    "lora-24gb": Row("lora-24gb", ["experiment=lora-24gb"], "python", procs=1, lora=True,
                     cpu=["trainer.accelerator=cpu"]),
    "lora-48gb": Row("lora-48gb", ["experiment=lora-48gb"], "python", procs=1, lora=True,
                     cpu=["trainer.accelerator=cpu"]),
}  # fmt: skip


class KillAtStep(L.Callback):
    """SIGKILL this process when the optimizer step `step` is about to start: the checkpoint of the step
    before is on disk, nothing else is flushed or closed (a node lost mid-run)."""

    def __init__(self, step: int, marker: Path):
        self.step, self.marker = step, marker

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step >= self.step:
            self.marker.write_text(str(trainer.global_step))
            os.kill(os.getpid(), signal.SIGKILL)


# 1. The worker: one rank of one run, as pipelines/train/main.py runs it, plus a report.
def worker(report: Path, kill_at: int | None, overrides: list[str]) -> None:
    from dynamictrl import config
    from dynamictrl.errors import user_errors
    from dynamictrl.train.run import run
    from dynamictrl.utils.device import global_rank

    cfg = config.load("train", overrides)
    extra = [KillAtStep(kill_at, report.with_name(f"killed-{global_rank()}"))] if kill_at else []
    with user_errors("train"):
        result = run(cfg, extra_callbacks=extra)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    info = {"rank": global_rank(), "result": result, "peak_rss": peak}
    report.with_name(f"{report.stem}-{global_rank()}.json").write_text(json.dumps(info, default=str))


# 2. The launchers.
def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS and not k.startswith("SLURM_")}
    env.update(OMP_NUM_THREADS="1", WANDB_MODE="offline", WANDB_SILENT="true", PYTHONUNBUFFERED="1")
    return env


def launch(row: Row, args: list[str], cwd: Path, log: Path, timeout: float) -> int:
    """Start the row's processes the way its launcher would and wait for them all; the exit status."""
    env = _clean_env()
    port = str(random.randint(20000, 40000))
    worker_cmd = ["-m", "dynamictrl.train.rehearse", "--worker", *args]
    with open(log, "a") as out:
        if row.launcher == "torchrun":
            cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={row.procs}", "--nnodes=1",
                   "--master-addr=127.0.0.1", f"--master-port={port}", *worker_cmd]  # fmt: skip
            procs = [subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)]
        elif row.launcher == "srun":  # `srun --nodes=N --ntasks-per-node=1`: SLURM's variables, nothing else
            procs = []
            for r in range(row.procs):
                task = env | {"SLURM_PROCID": str(r), "SLURM_LOCALID": "0", "SLURM_NODEID": str(r),
                              "SLURM_NTASKS": str(row.procs), "SLURM_NNODES": str(row.procs),
                              "SLURM_NTASKS_PER_NODE": "1", "SLURM_JOB_NAME": "rehearse", "SLURM_JOB_ID": port,
                              "SLURM_NODELIST": "127.0.0.1", "SLURM_JOB_NUM_NODES": str(row.procs)}  # fmt: skip
                procs.append(subprocess.Popen([sys.executable, *worker_cmd], cwd=cwd, env=task, stdout=out,
                                              stderr=subprocess.STDOUT, start_new_session=True))  # fmt: skip
        else:
            procs = [subprocess.Popen([sys.executable, *worker_cmd], cwd=cwd, env=env, stdout=out,
                                      stderr=subprocess.STDOUT, start_new_session=True)]  # fmt: skip
        deadline = time.monotonic() + timeout
        codes = []
        for p in procs:
            try:
                codes.append(p.wait(timeout=max(1.0, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                for q in procs:
                    os.killpg(q.pid, signal.SIGKILL)
                codes.append(-9)
        if any(codes):  # a lost task takes the job down, as srun / torchrun do
            for q in procs:
                if q.poll() is None:
                    os.killpg(q.pid, signal.SIGKILL)
                    q.wait()
    return next((c for c in codes if c), 0)


# 3. Reading what a run left.
def losses(out: Path) -> dict[int, float]:
    rows = csv.DictReader(open(out / "metrics.csv")) if (out / "metrics.csv").is_file() else []
    return {int(r["step"]): float(r["train/loss"]) for r in rows if r.get("train/loss")}


def gathered(ckpt: Path, tmp: Path) -> dict[str, Any]:
    """The transformer weights a checkpoint holds, gathered offline by the strategy's own converter:
    torch.distributed.checkpoint folders (FSDP2), DeepSpeed folders (its fp32 weights), or one file."""
    import torch

    ckpt = ckpt.resolve()
    if (ckpt / "meta.pt").is_file():
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

        dcp_to_torch_save(ckpt, tmp / "full.pt")
        state = torch.load(tmp / "full.pt", weights_only=True)["state_dict"]
    elif ckpt.is_dir():
        from lightning.pytorch.utilities.deepspeed import convert_zero_checkpoint_to_fp32_state_dict

        convert_zero_checkpoint_to_fp32_state_dict(ckpt, tmp / "full.pt")
        state = torch.load(tmp / "full.pt", weights_only=False)["state_dict"]  # our own file, just written
    else:
        state = torch.load(ckpt, weights_only=True)["state_dict"]
    return {k.removeprefix("transformer."): v for k, v in state.items() if k.startswith("transformer.")}


def exported(out: Path, lora: bool) -> dict[str, Any]:
    """The export as a user loads it: from_pretrained (full) or the LoRA folder's files."""
    if lora:
        from safetensors.torch import load_file

        from dynamictrl.models.lora import LORA_FILE, POSE_FILE

        state = dict(load_file(str(out / "lora" / POSE_FILE)))
        for key, value in load_file(str(out / "lora" / LORA_FILE)).items():  # transformer.X.lora_A.weight
            name = key.removeprefix("transformer.").replace(".lora_A.", ".lora_A.default.")
            state[name.replace(".lora_B.", ".lora_B.default.")] = value
        return state
    from dynamictrl.models.transformer import DynamiCtrlTransformer3DModel

    return DynamiCtrlTransformer3DModel.from_pretrained(out / "transformer").state_dict()


def same(a: dict[str, Any], b: dict[str, Any], keys: Any = None) -> bool:
    """Equal tensors on `keys` (default: all of a, which b must hold), compared in a's dtype."""
    import torch

    keys = list(a) if keys is None else list(keys)
    return bool(keys) and all(k in b and torch.equal(a[k], b[k].to(a[k].dtype)) for k in keys)


# 4. One row.
def rehearse(row: Row, model: Path, shards: Path, out: Path, timeout: float) -> dict[str, Any]:
    import shutil

    shutil.rmtree(out, ignore_errors=True)
    cwd = out / "cwd"  # the workers' working directory: not the driver's, as on a cluster
    cwd.mkdir(parents=True)
    log = out / "log.txt"
    common = [*row.overrides, *row.cpu, "model=tiny", f"model.path={model}", f"data.train_shards={shards}/train-*.tar",
              "model.num_frames=9", "data.num_workers=0", "data.batch_size=1", "samples.every_n_steps=0",
              f"trainer.max_steps={TOTAL}", f"checkpoint_every={KILL_AT}", "trainer.log_every_n_steps=1",
              "trainer.enable_progress_bar=false", "module.optimizer.lr=1e-3", "module.lr_scheduler.num_warmup_steps=0"]  # fmt: skip
    if "logger=default" not in row.overrides:
        common.append("logger=csv")
    t0 = time.monotonic()
    res: dict[str, Any] = {"config": row.name, "launcher": row.launcher, "processes": row.procs, "ok": False,
                           "group": "lora" if row.lora else "full"}  # fmt: skip
    runs = {"killed": out / "killed", "resumed": out / "killed", "straight": out / "straight"}
    code = launch(row, [str(out / "killed" / "report"), str(KILL_AT), *common, f"output={runs['killed']}"], cwd, log, timeout)
    killed = sorted((out / "killed").glob("killed-*"))
    res["killed"] = bool(killed) and code != 0
    last = out / "killed" / "checkpoints" / "last.ckpt"
    res["checkpoint_at_kill"] = last.resolve().name if last.exists() else None
    code_b = launch(row, [str(out / "killed" / "resumed"), "0", *common, f"output={runs['resumed']}", "resume=true"],
                    cwd, log, timeout)  # fmt: skip
    code_c = launch(row, [str(out / "straight" / "report"), "0", *common, f"output={runs['straight']}"], cwd, log, timeout)
    res["seconds"] = round(time.monotonic() - t0, 1)
    reports = {name: [json.loads(p.read_text()) for p in sorted(out.glob(f"*/{name}-[0-9].json"))]
               for name in ("resumed", "report")}  # fmt: skip
    res["peak_rss_gb"] = round(max((r["peak_rss"] for rs in reports.values() for r in rs), default=0) / 1e9, 2)
    if code_b or code_c:
        res["error"] = f"exit {code_b or code_c}: see {log}"
        return res
    resumed, straight = losses(runs["resumed"]), losses(runs["straight"])
    res["steps"], res["first_loss"] = max(resumed, default=-1) + 1, straight.get(0)
    tail = range(KILL_AT, TOTAL)
    export = exported(runs["resumed"], row.lora)
    res["resume_equal"] = all(k in resumed and k in straight and resumed[k] == straight[k] for k in tail) and same(
        export, exported(runs["straight"], row.lora))  # fmt: skip
    (out / "gather").mkdir()
    with open(log, "a") as quiet, contextlib.redirect_stdout(quiet):  # DeepSpeed's converter prints
        ckpt = gathered(runs["resumed"] / "checkpoints" / "last.ckpt", out / "gather")
    res["export_equal"] = same(export, ckpt)
    ids = {r["result"].get("wandb_id") for r in reports["resumed"]}  # every task of the resumed run
    res["wandb_ids"] = sorted(str(i) for i in ids)
    res["ok"] = bool(res["killed"] and res["checkpoint_at_kill"] == f"step-{KILL_AT:06d}.ckpt" and res["steps"] == TOTAL
                     and res["resume_equal"] and res["export_equal"]
                     and (row.launcher != "srun" or (len(ids) == 1 and None not in ids)))  # fmt: skip
    return res


def line(r: dict[str, Any]) -> str:
    if "error" in r:
        return f"{r['config']:<24} FAILED {r['error']} ({r['seconds']} s)"
    wandb = f"  wandb run {r['wandb_ids'][0]} on every task" if len(r.get("wandb_ids", [])) == 1 and r["wandb_ids"][0] != "None" else ""
    return (f"{r['config']:<24} {'ok    ' if r['ok'] else 'FAILED'} {r['launcher']} x{r['processes']}  "
            f"steps {KILL_AT}+{r['steps'] - KILL_AT} (killed at {KILL_AT}: {r['killed']})  resume equal: {r['resume_equal']}  "
            f"export equal: {r['export_equal']}  peak RSS {r['peak_rss_gb']} GB  {r['seconds']} s{wandb}")  # fmt: skip


def data(out: Path) -> tuple[Path, Path]:
    """The tiny model (the embedded one) and a small preprocessed dataset, made once under `out`."""
    from dynamictrl import config
    from dynamictrl.data.synthetic import generate
    from dynamictrl.models import embedded
    from dynamictrl.preprocess.run import run as preprocess

    model = embedded.ensure()
    shards = out / "shards"
    if not list(shards.glob("train-*.tar")):
        raw = generate(out / "raw", num_train=3, num_test=1, num_frames=20, progress=False)
        preprocess(config.load("preprocess", [f"input={raw}", f"output={shards}", "progress=false"]))
    return Path(model), shards


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        report, kill_at, *overrides = argv[1:]
        worker(Path(report), int(kill_at) or None, overrides)
        return []
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("configs", nargs="*", default=list(ROWS), help=f"of {', '.join(ROWS)} (default: all)")
    p.add_argument("--out", default="outputs/rehearse")
    p.add_argument("--timeout", type=float, default=900, help="seconds per launch")
    args = p.parse_args(argv)
    unknown = [c for c in args.configs if c not in ROWS]
    if unknown:
        raise SystemExit(f"rehearse: error: unknown config {unknown[0]} (choose from {', '.join(ROWS)})")
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    model, shards = data(out)
    results = []
    for name in args.configs:
        r = rehearse(ROWS[name], model, shards, out / name, args.timeout)
        print(line(r), flush=True)
        results.append(r)
    spreads, agree = {}, True
    for group in ("full", "lora"):  # the LoRA recipes accumulate 8 batches: their step 0 logs another batch
        first = [r["first_loss"] for r in results if r.get("first_loss") is not None and r["group"] == group]
        if len(first) < 2:
            continue
        spreads[group] = spread = (max(first) - min(first)) / min(first)
        agree &= spread <= AGREE  # the same weights and batch: every strategy must compute the same loss
        print(f"first-step loss, {group} fine-tuning, {len(first)} configs: {min(first):.5f} to {max(first):.5f} "
              f"({spread:.2%} apart; bf16 rounding allows {AGREE:.0%}): {'agree' if spread <= AGREE else 'DISAGREE'}")  # fmt: skip
    (out / "report.json").write_text(json.dumps({"rows": results, "first_loss_spread": spreads}, indent=1))
    if not (all(r["ok"] for r in results) and agree):
        raise SystemExit(1)
    return results


if __name__ == "__main__":
    main()

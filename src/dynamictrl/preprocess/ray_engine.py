"""`engine=ray`: the preprocessing stages as a Ray Data streaming pipeline, on one machine or a cluster.

    from_items(inputs) -> flat_map decode (CPU tasks) -> map_batches pose (actor pool)
      -> map_batches mask+crop (actor pool) -> map_batches caption (actor pool)
      -> map_batches encode (CPU tasks: the sample is staged on the output's file system)
      -> the driver (`run`): Assembler, manifest, rejects; shard writer tasks tar the staged samples

Each model stage is a pool of `concurrency` actors with `num_gpus` each (conf/engine/ray.yaml; `auto`
sizes the pools from the cluster's GPUs, `resources.resolve_pools`); Ray gives an actor its GPU through
CUDA_VISIBLE_DEVICES, so the backends' `auto` device is that GPU. Ray Data streams: windows flow to the
GPU actors while later inputs decode, with backpressure bounding what is in flight. Rows carry
`stages.to_row` records (one schema, raw array bytes, no pickle). The driver sees metadata only: the
encoded samples go from the encode tasks to the output folder, and shard writer tasks turn them into
shards, so the bytes never pass through the driver.

On a cluster (`address: auto` after `ray start` on every node) workers run in their own directories,
so the driver makes every path absolute (`run.absolute_paths`) and checks, on every node, that the
input and the output are there (the output must be one shared file system: workers write into it).
A window whose worker dies (out of memory, a crash in native code) is retried `max_retries` times on a
fresh worker, then its input is rejected with that reason and the run goes on (`Attempts`).
"""

from __future__ import annotations

import io
import logging
import os
import resource
import shutil
import tarfile
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from dynamictrl.errors import UserError
from dynamictrl.preprocess.stages import (
    Assembler,
    End,
    Failed,
    Item,
    Outcome,
    Window,
    from_row,
    guarded,
    manifest_row,
    to_row,
)

STAGES = ("pose", "mask", "caption")
GPU_WEIGHTS = {"pose": 1.0, "mask": 1.0, "caption": 2.0}  # one GPU's split between the model stages (auto)


def _rows(batch: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    keys = list(batch)
    return [dict(zip(keys, values, strict=True)) for values in zip(*(batch[k] for k in keys), strict=True)]


def _batch(rows: list[dict[str, Any]]) -> dict[str, list]:
    return {k: [r[k] for r in rows] for k in rows[0]} if rows else {}


# ------------------------------------------------------------------------------------ bounded retries


class Attempts:
    """The run's ledger of work in progress (a Ray actor). A worker opens an entry before a unit of work
    (decode an input, run a stage on a window) and closes it after; an entry still open when the same
    unit comes back is an attempt whose worker died (Ray restarts the actor and retries the task, without
    end). After `max_retries` such deaths the unit is not run again: its input is rejected."""

    def __init__(self):
        self._open: dict[str, list[str]] = {}
        self._deaths = 0

    def begin(self, key: str, where: str) -> list[str]:
        earlier = list(self._open.get(key, []))
        self._deaths += bool(earlier)
        self._open.setdefault(key, []).append(where)
        return earlier

    def end(self, key: str) -> None:
        self._open.pop(key, None)

    def withdraw(self, key: str) -> None:
        """Close this attempt's entry without closing the unit (opened, then not run this way)."""
        if self._open.get(key):
            self._open[key].pop()

    def deaths(self) -> int:
        return self._deaths


class Guard:
    """Runs one unit of work under the ledger, in a worker."""

    def __init__(self, ledger, stage: str, max_retries: int):
        self.ledger, self.stage, self.max_retries = ledger, stage, int(max_retries)

    def where(self) -> str:
        import ray

        node = ray.util.get_node_ip_address() if ray.is_initialized() else "this machine"
        return f"pid {os.getpid()} on node {node}"

    def reason(self, index: int, earlier: list[str]) -> str | None:
        """The reject reason once the unit's workers died more than `max_retries` times, else None."""
        if len(earlier) <= self.max_retries:
            return None
        what = "decoding it" if index < 0 else f"on its clip {index}"
        n = len(earlier)
        return (f"failed: the {self.stage} worker died {n} time{'s' if n > 1 else ''} {what} (last: {earlier[-1]}): killed, out "
                "of memory or crashed in native code; Ray's logs on that node are in /tmp/ray/session_latest/logs")  # fmt: skip

    def _call(self, name: str, *args):
        """A ledger method: on the Ray actor, or on a plain `Attempts` (unit tests)."""
        method = getattr(self.ledger, name)
        if not hasattr(method, "remote"):
            return method(*args)
        import ray

        return ray.get(method.remote(*args))

    def open(self, video: int, index: int) -> list[str]:
        """Open this attempt's entry; returns the earlier attempts that died (where they ran)."""
        return self._call("begin", self._key(video, index), self.where())

    def begin(self, video: int, index: int) -> str | None:
        return self.reason(index, self.open(video, index))

    def end(self, video: int, index: int) -> None:
        self._call("end", self._key(video, index))

    def withdraw(self, video: int, index: int) -> None:
        self._call("withdraw", self._key(video, index))

    def _key(self, video: int, index: int) -> str:
        return f"{self.stage}/{video}/{index}"

    def run(self, step: Callable[[Window], Window], w: Window) -> Window | Failed:
        reason = self.begin(w.video, w.index)
        if reason is not None:
            return Failed(w.video, w.index, reason)
        out = guarded(step, w)
        self.end(w.video, w.index)
        return out


# ------------------------------------------------------------------------------------------ the stages


class Stage:
    """One model stage on a batch of rows, in a Ray actor: windows go through `stage` (errors become
    `Failed` rows, see `stages.guarded`; a dying worker is retried, see `Attempts`), every other row
    passes through. Models load on first need."""

    def __init__(self, cfg: dict, stage: str, ledger, max_retries: int):
        from dynamictrl.preprocess.backends import Backends

        self.cfg = OmegaConf.create(cfg)
        self.stage = stage
        self.backends = Backends(self.cfg)
        self.guard = Guard(ledger, stage, max_retries)

    def _one(self, w: Window) -> Window:
        from dynamictrl.preprocess.stages import mask_and_crop, pose

        if self.stage == "pose":
            return pose(w, self.backends)
        return mask_and_crop(w, self.cfg, self.backends)

    def _caption(self, windows: list[Window]) -> dict[int, Window | Failed]:
        """Captions in one batch; window by window when the batch raised, or when a worker died on any
        of its windows before (so that only the window that kills it is charged from then on)."""
        from dynamictrl.preprocess.stages import caption

        earlier = {id(w): self.guard.open(w.video, w.index) for w in windows}
        if not any(earlier.values()):
            try:
                caption(windows, self.backends)
            except Exception:  # noqa: BLE001 - the batch failed: caption window by window to find the culprit
                pass
            else:
                for w in windows:
                    self.guard.end(w.video, w.index)
                return {id(w): w for w in windows}
        for w in windows:
            self.guard.withdraw(w.video, w.index)
        return {id(w): self.guard.run(lambda x: caption([x], self.backends)[0], w) for w in windows}

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        objs = [from_row(r) for r in _rows(batch)]
        windows = [o for o in objs if isinstance(o, Window)]
        if self.stage == "caption" and windows:
            done = self._caption(windows)
            objs = [done.get(id(o), o) for o in objs]
        elif windows:
            objs = [self.guard.run(self._one, o) if isinstance(o, Window) else o for o in objs]
        return _batch([to_row(o) for o in objs])


def _decode(row: dict[str, Any], cfg: dict, has_caption_model: bool, ledger, max_retries: int) -> Iterator[dict[str, Any]]:
    from dynamictrl.preprocess.stages import decode

    guard = Guard(ledger, "decode", max_retries)
    video = int(row["video"])
    reason = guard.begin(video, -1)
    if reason is not None:
        yield to_row(End(video, 0, reason))
        return
    item = Item(Path(row["path"]), row["video_id"], row["split"])
    for obj in decode(item, video, OmegaConf.create(cfg), has_caption_model):
        yield to_row(obj)
    guard.end(video, -1)


def stage_sample(w: Window, folder: Path) -> Window:
    """Write the window's encoded sample to `folder/<key>.tar` (one sample, its members as a shard
    holds them), for a shard writer to pick up; the window keeps [key, file name]."""
    sample = w.sample
    key = sample["__key__"]
    tmp, final = folder / f".{key}.{uuid.uuid4().hex}.tmp", folder / f"{key}.tar"
    with tarfile.open(tmp, "w") as tar:
        for name in sorted(k for k in sample if not k.startswith("__")):
            info = tarfile.TarInfo(f"{key}.{name}")
            info.size = len(sample[name])
            tar.addfile(info, io.BytesIO(sample[name]))
    os.replace(tmp, final)
    w.sample, w.staged = None, [key, final.name]
    return w


def read_staged(path: Path) -> dict[str, Any]:
    """A staged sample back as webdataset members: {"__key__": key, member: bytes}."""
    sample: dict[str, Any] = {}
    with tarfile.open(path) as tar:
        for member in tar:
            key, name = member.name.split(".", 1)
            sample["__key__"] = key
            sample[name] = tar.extractfile(member).read()
    return sample


def _encode(batch: dict[str, np.ndarray], cfg: dict, staging: str, ledger, max_retries: int) -> dict[str, list]:
    from dynamictrl.preprocess.stages import encode

    conf, folder = OmegaConf.create(cfg), Path(staging)
    guard = Guard(ledger, "encode", max_retries)

    def step(w: Window) -> Window:
        w = encode(w, conf)
        return stage_sample(w, folder) if w.sample is not None else w

    objs = [from_row(r) for r in _rows(batch)]
    return _batch([to_row(guard.run(step, o) if isinstance(o, Window) else o) for o in objs])


# ------------------------------------------------------------------------------------- shard writers


def write_shard(folder: str, name: str, staged: list[str]) -> str:
    """Tar staged samples (files, in order) into a hidden temporary file beside `folder/name` and return
    its name; the staged files are removed. The driver renames it into place (`RayShards`): a writer
    left running by a killed driver can never make a shard appear that no manifest lists."""
    import webdataset as wds

    tmp = f".{name}.{uuid.uuid4().hex}.tmp"
    with wds.TarWriter(str(Path(folder) / tmp)) as writer:
        for path in staged:
            writer.write(read_staged(Path(path)))
    for path in staged:
        Path(path).unlink(missing_ok=True)
    return tmp


class RayShards:
    """Shards written by Ray tasks: the driver groups whole inputs into shards exactly as `ShardSink`
    does for the local engine (same names, same members), hands each full shard to a writer task (at most
    `write.concurrency` at once) and returns manifest rows in order once their shard is in place."""

    def __init__(self, out: Path, staging: Path, rank: int, shard_size: int, write: DictConfig):
        import ray

        self.out, self.staging, self.rank, self.shard_size = out, staging, rank, shard_size
        self.concurrency = max(1, int(write.concurrency))
        self.task = ray.remote(write_shard).options(num_cpus=float(write.num_cpus), max_retries=2)
        self.groups: dict[str, dict[str, Any]] = {}
        self.next: dict[str, int] = {}
        self.inflight: deque = deque()  # (ref, shard name, manifest rows)

    def _name(self, split: str) -> str:
        if split not in self.next:
            existing = sorted(self.out.glob(f"{split}-{self.rank:04d}-[0-9][0-9][0-9][0-9][0-9].tar"))
            self.next[split] = int(existing[-1].stem.rsplit("-", 1)[1]) + 1 if existing else 0
        index = self.next[split]
        self.next[split] += 1
        return f"{split}-{self.rank:04d}-{index:05d}.tar"

    def add(self, item: Item, outcome: Outcome) -> list[dict]:
        g = self.groups.get(item.split)
        if g is None:
            g = self.groups[item.split] = {"name": self._name(item.split), "files": [], "rows": []}
        g["files"] += [str(self.staging / f) for _, f in outcome.staged]
        g["rows"].append(manifest_row(item, outcome, g["name"]))
        if len(g["files"]) >= self.shard_size:
            self._dispatch(item.split)
        return self._collect(block=False)

    def _dispatch(self, split: str) -> None:
        g = self.groups.pop(split)
        self.inflight.append((self.task.remote(str(self.out), g["name"], g["files"]), g["name"], g["rows"]))

    def _collect(self, block: bool) -> list[dict]:
        import ray

        rows: list[dict] = []
        while self.inflight:
            ref, name, group = self.inflight[0]
            must = block or len(self.inflight) > self.concurrency
            if not must and not ray.wait([ref], timeout=0)[0]:
                break
            try:
                os.replace(self.out / ray.get(ref), self.out / name)  # in place, then listed (run.record)
            except Exception as err:  # noqa: BLE001 - a writer that cannot write stops the run with its line
                raise UserError(f"output {self.out}: writing shard {name} failed: {str(err).splitlines()[-1]}") from None
            self.inflight.popleft()
            rows += group
        return rows

    def finish(self) -> list[dict]:
        for split in list(self.groups):
            if self.groups[split]["files"]:
                self._dispatch(split)
        return self._collect(block=True)


# --------------------------------------------------------------------------------------------- cluster


def start(e: DictConfig) -> bool:
    """Connect to Ray (or start a local cluster); True when this call started it."""
    import ray

    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": bool(e.log_to_driver),
                              "logging_level": "ERROR", "configure_logging": True}  # fmt: skip
    if e.address:
        kwargs["address"] = str(e.address)
    else:  # "local": a new cluster here, even when this machine runs one (plain ray.init would join it)
        kwargs["address"] = "local"
        kwargs |= {k: e[k] for k in ("num_cpus", "num_gpus", "object_store_memory") if e.get(k) is not None}
    try:
        ray.init(**kwargs)
    except (ConnectionError, RuntimeError) as err:
        raise UserError(f"engine.address={e.address}: no Ray cluster there ({str(err).splitlines()[0]})") from None
    return True


def alive_nodes() -> list[dict[str, Any]]:
    import ray

    return [n for n in ray.nodes() if n.get("Alive")]


def _sees(paths: list[str], probe: str) -> list[str]:
    """On one node: which of `paths` are missing, and whether the driver's probe file is there."""
    missing = [p for p in paths if not os.path.exists(p)]
    return missing + ([] if os.path.exists(probe) else [probe])


def check_visible(inputs: list[str], out: Path) -> None:
    """Every alive node must see the input paths and the output folder (the driver's probe file in it):
    workers read the inputs and write the staged samples and the shards there. One line otherwise."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    probe = out / f".probe-{uuid.uuid4().hex}"
    probe.write_text("written by the preprocessing driver\n")
    try:
        task, nodes = ray.remote(_sees), alive_nodes()
        refs = [task.options(num_cpus=0, max_retries=0, scheduling_strategy=NodeAffinitySchedulingStrategy(
                    n["NodeID"], soft=False)).remote(inputs, str(probe)) for n in nodes]  # fmt: skip
        for n, missing in zip(nodes, ray.get(refs), strict=True):
            where = f"Ray node {n['NodeManagerAddress']} ({n['NodeID'][:8]})"
            if str(probe) in missing:
                raise UserError(f"output={out}: not visible from {where}; workers write the shards there, so the "
                                "output must be on a file system every node mounts at the same path")  # fmt: skip
            if missing:
                raise UserError(f"input {missing[0]}: not found on {where}; every node reads the inputs, so they "
                                "must be at the same path on every node")  # fmt: skip
    finally:
        probe.unlink(missing_ok=True)


def gpu_weights(cfg: DictConfig) -> dict[str, float]:
    """The `auto` GPU split: a stage whose configured backend takes a `device` runs on a GPU."""
    return {s: GPU_WEIGHTS[s] if "_target_" in (cfg.get(s) or {}) and "device" in cfg[s] else 0.0 for s in STAGES}


def plan(e: DictConfig, cfg: DictConfig, wait_s: float) -> DictConfig:
    """The engine config with `auto` pools resolved from the cluster, once the cluster can place every
    actor (per node and per GPU); waits up to `wait_s` for nodes to join (autoscaling), then one line."""
    from dynamictrl.preprocess.resources import bundles, resolve_pools, unschedulable, wait_until_schedulable

    def nodes() -> list[dict[str, float]]:
        return [dict(n["Resources"]) for n in alive_nodes()]

    resolved = resolve_pools(e, nodes(), gpu_weights(cfg))
    if unschedulable(resolved, nodes()) is not None:
        if wait_s > 0:  # an autoscaling cluster adds nodes for demands it sees: show it the pipeline's
            autoscaler_request(bundles(resolved))
        wait_until_schedulable(resolved, nodes, wait_s, warn=lambda line: print(f"preprocess: {line}", flush=True))
    return resolved


def autoscaler_request(shapes: list[dict[str, float]]) -> bool:
    """Ask an autoscaler (if the cluster runs one) for room for `shapes`; [] withdraws the request.
    A hint: without an autoscaler it changes nothing. False when Ray refused it."""
    from ray.autoscaler.sdk import request_resources

    try:
        request_resources(bundles=shapes)
    except Exception:  # noqa: BLE001 - only a hint; the wait below says what is missing
        return False
    return True


def check_resources(e: DictConfig, nodes: list[dict[str, float]]) -> None:
    """Refuse (one line) a pipeline these nodes cannot place."""
    from dynamictrl.preprocess.resources import unschedulable

    reason = unschedulable(e, nodes)
    if reason is not None:
        raise UserError(reason)


class RayEngine:
    """A Ray run over `todo`: `outcomes()` yields each input's outcome as it completes; `shards` writes
    them (writer tasks); `close()` shuts down what this run started and removes its staging folder."""

    def __init__(self, todo: list[Item], cfg: DictConfig, out: Path, rank: int):
        import ray

        self.todo, self.cfg, self.out = todo, cfg, out
        self.e = e = cfg.engine
        self._cpu0 = _cpu_seconds()
        self._t0 = time.perf_counter()
        logging.getLogger("ray.data").setLevel(logging.WARNING)  # its per-run INFO lines; the driver's bar counts inputs
        self.started = start(e)
        try:
            local = not e.address
            self.pools = plan(e, cfg, 0.0 if local else float(e.wait_for_resources_s))
            check_visible([str(cfg.input), *sorted({str(it.path) for it in todo})[:16]], out)
            # A killed run's staged samples and unfinished shards go (their inputs are redone); each run
            # stages in its own folder, so a task the killed run left running cannot touch this run's files.
            for old in [*out.glob(f".staging-rank{rank:04d}-*"), *out.glob(f".*-{rank:04d}-[0-9]*.tar.*.tmp")]:
                if old.is_dir():
                    shutil.rmtree(old, ignore_errors=True)
                else:
                    old.unlink(missing_ok=True)
            self.staging = out / f".staging-rank{rank:04d}-{uuid.uuid4().hex[:8]}"
            self.staging.mkdir(parents=True)
            self.ledger = ray.remote(Attempts).options(num_cpus=0).remote()
            self.shards = RayShards(out, self.staging, rank, int(cfg.shard_size), self.pools.write)
        except BaseException:
            self.close()
            raise

    def outcomes(self) -> Iterator[Outcome]:
        import ray.data

        from dynamictrl.preprocess.backends import caption_model_configured

        e, pools, cfg = self.e, self.pools, self.cfg
        plain = OmegaConf.to_container(cfg, resolve=True)
        retries = {"ledger": self.ledger, "max_retries": int(e.max_retries)}
        ctx = ray.data.DataContext.get_current()
        ctx.execution_options.preserve_order = bool(e.preserve_order)
        ctx.enable_progress_bars = False  # the driver's bar counts inputs
        ctx.print_on_execution_start = False
        inputs = [{"video": v, "path": str(it.path), "video_id": it.video_id, "split": it.split}
                  for v, it in enumerate(self.todo)]  # fmt: skip
        ds = ray.data.from_items(inputs, override_num_blocks=len(inputs))
        ds = ds.flat_map(_decode, fn_kwargs={"cfg": plain, "has_caption_model": caption_model_configured(cfg), **retries},
                         num_cpus=e.decode.num_cpus)  # fmt: skip
        for stage in STAGES:
            s = pools[stage]
            ds = ds.map_batches(Stage, fn_constructor_kwargs={"cfg": plain, "stage": stage, **retries}, batch_format="numpy",
                                batch_size=int(s.batch_size), compute=ray.data.ActorPoolStrategy(size=int(s.concurrency)),
                                num_gpus=float(s.num_gpus), num_cpus=float(s.num_cpus))  # fmt: skip
        ds = ds.map_batches(_encode, fn_kwargs={"cfg": plain, "staging": str(self.staging), **retries},
                            batch_format="numpy", batch_size=1, num_cpus=e.encode.num_cpus)  # fmt: skip
        assembler = Assembler(cfg)
        for row in ds.iter_rows():
            outcome = assembler.add(from_row(row))  # a fatal Failed raises its UserError here
            if outcome is not None:
                yield outcome

    @property
    def summary(self) -> dict[str, Any]:
        import ray

        wall = time.perf_counter() - self._t0
        cpu = _cpu_seconds() - self._cpu0
        try:
            deaths = int(ray.get(self.ledger.deaths.remote(), timeout=30))
        except Exception:  # noqa: BLE001 - a figure for the summary; the run's outcome does not depend on it
            deaths = None
        return {"driver_cpu_s": cpu, "wall_s": wall, "driver_cpu_share": cpu / max(wall, 1e-9), "worker_deaths": deaths,
                "pools": {s: {k: self.pools[s][k] for k in ("concurrency", "num_gpus", "num_cpus")} for s in STAGES}}  # fmt: skip

    def close(self) -> None:
        import ray

        staging = getattr(self, "staging", None)
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        if ray.is_initialized() and self.e.address:
            autoscaler_request([])  # the run's demand ends with it
        if self.started:
            ray.shutdown()
            self.started = False


def _cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime

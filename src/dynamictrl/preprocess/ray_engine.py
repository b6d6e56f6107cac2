"""`engine=ray`: the preprocessing stages as a Ray Data streaming pipeline.

    from_items(inputs) -> flat_map decode (CPU tasks) -> map_batches pose (actor pool)
      -> map_batches mask+crop (actor pool) -> map_batches caption (actor pool) -> map_batches encode
      (CPU tasks) -> the driver (`run`): Assembler, shards, manifest, rejects

Each model stage is a pool of `concurrency` actors with `num_gpus` each (conf/engine/ray.yaml); Ray
gives an actor its GPU through CUDA_VISIBLE_DEVICES, so the backends' `auto` device is that GPU. Ray
Data streams: windows flow to the GPU actors while later inputs decode, with backpressure bounding
what is in flight. Rows carry `stages.to_row` records (one schema, npz payloads, no pickle).

`address: null` starts a local Ray cluster in this process (shut down at the end); `address: auto`
joins a running cluster (`ray start --head` on one node, `ray start --address=HEAD:6379` on the
others; the package and the model weights must be installed at the same paths on every node).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from dynamictrl.errors import UserError
from dynamictrl.preprocess.stages import Assembler, Item, Outcome, Window, from_row, to_row


def _rows(batch: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    keys = list(batch)
    return [dict(zip(keys, values, strict=True)) for values in zip(*(batch[k] for k in keys), strict=True)]


def _batch(rows: list[dict[str, Any]]) -> dict[str, list]:
    return {k: [r[k] for r in rows] for k in ("kind", "video", "meta", "payload")}


class Stage:
    """One model stage on a batch of rows, in a Ray actor: windows go through `stage` (errors become
    `Failed` rows, see `stages.guarded`), every other row passes through. Models load on first need."""

    def __init__(self, cfg: dict, stage: str):
        from dynamictrl.preprocess.run import Backends

        self.cfg = OmegaConf.create(cfg)
        self.stage = stage
        self.backends = Backends(self.cfg)

    def _one(self, w: Window) -> Window:
        from dynamictrl.preprocess.stages import mask_and_crop, pose

        if self.stage == "pose":
            return pose(w, self.backends)
        return mask_and_crop(w, self.cfg, self.backends)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        from dynamictrl.preprocess.stages import caption, guarded

        objs = [from_row(r) for r in _rows(batch)]
        windows = [o for o in objs if isinstance(o, Window)]
        if self.stage == "caption" and windows:
            try:
                caption(windows, self.backends)
            except Exception:  # noqa: BLE001 - the batch failed: caption window by window to find the culprit
                done = {id(w): guarded(lambda x: caption([x], self.backends)[0], w) for w in windows}
                objs = [done.get(id(o), o) for o in objs]
        elif windows:
            objs = [guarded(self._one, o) if isinstance(o, Window) else o for o in objs]
        return _batch([to_row(o) for o in objs])


def _decode(row: dict[str, Any], cfg: dict, has_caption_model: bool) -> Iterator[dict[str, Any]]:
    from pathlib import Path

    from dynamictrl.preprocess.stages import decode

    item = Item(Path(row["path"]), row["video_id"], row["split"])
    for obj in decode(item, int(row["video"]), OmegaConf.create(cfg), has_caption_model):
        yield to_row(obj)


def _encode(batch: dict[str, np.ndarray], cfg: dict) -> dict[str, list]:
    from dynamictrl.preprocess.stages import encode, guarded

    conf = OmegaConf.create(cfg)
    objs = [from_row(r) for r in _rows(batch)]
    return _batch([to_row(guarded(lambda w: encode(w, conf), o) if isinstance(o, Window) else o) for o in objs])


def start(e: DictConfig) -> bool:
    """Connect to Ray (or start a local cluster); True when this call started it."""
    import ray

    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": bool(e.log_to_driver),
                              "logging_level": "ERROR", "configure_logging": True}  # fmt: skip
    if e.address:
        kwargs["address"] = str(e.address)
    else:
        kwargs |= {k: e[k] for k in ("num_cpus", "num_gpus", "object_store_memory") if e.get(k) is not None}
    try:
        ray.init(**kwargs)
    except ConnectionError as err:
        raise UserError(f"engine.address={e.address}: no Ray cluster there ({str(err).splitlines()[0]})") from None
    return True


def check_resources(e: DictConfig, cluster: dict[str, float]) -> None:
    """Refuse a pipeline the cluster cannot schedule (Ray would wait forever): the actor pools hold
    their CPUs and GPUs for the whole run, and a decode or encode task must still fit beside them."""
    pools = [(name, e[name]) for name in ("pose", "mask", "caption")]
    cpus = sum(float(p.num_cpus) * int(p.concurrency) for _, p in pools)
    gpus = sum(float(p.num_gpus) * int(p.concurrency) for _, p in pools)
    have_cpu, have_gpu = float(cluster.get("CPU", 0)), float(cluster.get("GPU", 0))
    task = max(float(e.decode.num_cpus), float(e.encode.num_cpus))
    if gpus > have_gpu + 1e-9:
        raise UserError(f"engine: the pose, mask and caption actor pools ask for {gpus:g} GPUs (num_gpus x "
                        f"concurrency); the Ray cluster has {have_gpu:g}")  # fmt: skip
    if cpus + task > have_cpu + 1e-9:
        raise UserError(f"engine: the actor pools hold {cpus:g} CPUs and a decode/encode task needs {task:g}; the "
                        f"Ray cluster has {have_cpu:g} (lower engine.*.num_cpus or concurrency)")  # fmt: skip


def ray_engine(todo: list[Item], cfg: DictConfig) -> Iterator[Outcome]:
    """The stages as a Ray Data pipeline over `todo`; yields each input's outcome as it completes."""
    import ray
    import ray.data

    from dynamictrl.preprocess.run import caption_model_configured

    e = cfg.engine
    plain = OmegaConf.to_container(cfg, resolve=True)
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # its per-run INFO lines; the driver's bar counts inputs
    started = start(e)
    try:
        check_resources(e, ray.cluster_resources())
        ctx = ray.data.DataContext.get_current()
        ctx.execution_options.preserve_order = bool(e.preserve_order)
        ctx.enable_progress_bars = False  # the driver's bar counts inputs
        ctx.print_on_execution_start = False
        inputs = [{"video": v, "path": str(it.path), "video_id": it.video_id, "split": it.split}
                  for v, it in enumerate(todo)]  # fmt: skip
        ds = ray.data.from_items(inputs, override_num_blocks=len(inputs))
        ds = ds.flat_map(_decode, fn_kwargs={"cfg": plain, "has_caption_model": caption_model_configured(cfg)},
                         num_cpus=e.decode.num_cpus)  # fmt: skip
        for stage in ("pose", "mask", "caption"):
            s = e[stage]
            ds = ds.map_batches(Stage, fn_constructor_kwargs={"cfg": plain, "stage": stage}, batch_format="numpy",
                                batch_size=int(s.batch_size), compute=ray.data.ActorPoolStrategy(size=int(s.concurrency)),
                                num_gpus=float(s.num_gpus), num_cpus=float(s.num_cpus))  # fmt: skip
        ds = ds.map_batches(_encode, fn_kwargs={"cfg": plain}, batch_format="numpy", batch_size=1,
                            num_cpus=e.encode.num_cpus)  # fmt: skip
        assembler = Assembler(cfg)
        for row in ds.iter_rows():
            outcome = assembler.add(from_row(row))  # a fatal Failed raises its UserError here
            if outcome is not None:
                yield outcome
    finally:
        if started:
            ray.shutdown()

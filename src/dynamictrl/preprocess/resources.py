"""Fitting the `engine=ray` pipeline to the Ray cluster before it starts.

Ray Data holds each actor pool's CPUs and GPUs for the whole run and, when an actor cannot be placed,
waits without a word. So `auto` pool sizes are resolved from the alive nodes, and the actors are packed
node by node, GPU by GPU, as Ray's scheduler must place them: cluster totals accept two 1-GPU nodes
for an actor that asks for 2 GPUs, and 0.75 + 0.5 of one GPU; Ray never places either. `nodes` are
the per-node total resources of the alive nodes (`ray.nodes()[i]["Resources"]`), e.g.
`[{"CPU": 8.0, "GPU": 2.0}, {"CPU": 4.0}]`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from omegaconf import DictConfig, OmegaConf

from dynamictrl.errors import UserError

STAGES = ("pose", "mask", "caption")
TOL = 1e-9


def _num(x: float) -> str:
    return f"{round(x, 6) + 0.0:g}"  # + 0.0: no "-0" from float noise


def _count(x: float, unit: str) -> str:
    return f"{_num(x)} {unit}{'' if 0 < x <= 1 else 's'}"


def _whole_gpus(node: dict[str, float]) -> int:
    return math.floor(float(node.get("GPU", 0)) + TOL)


def _setting(e: DictConfig, stage: str, key: str) -> float | None:
    """`engine.<stage>.<key>` as a number; None for auto."""
    value = e[stage][key]
    if isinstance(value, str) and value.strip().lower() == "auto":
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise UserError(f"engine.{stage}.{key}={value}: a number or auto")
    return float(value)


def resolve_pools(e: DictConfig, nodes: list[dict[str, float]], gpu_weights: dict[str, float]) -> DictConfig:
    """A copy of the engine config `e` with each pool's `num_gpus: auto` and `concurrency: auto` resolved.

    `gpu_weights[stage]` > 0: the stage's model runs on a GPU, with that weight; 0: no GPU. With G whole
    GPUs in the cluster, a GPU stage's auto `num_gpus` is its weight's share of ONE GPU, rounded down to
    0.01 so that one actor of each GPU stage fits on a GPU together (0 when G is 0 or the weight is 0),
    and its auto `concurrency` is G (one set per GPU; G // n for an explicit n > 1 GPUs). A stage
    without a GPU gets one actor. Explicit numbers are kept.
    """
    gpus = sum(_whole_gpus(n) for n in nodes)
    weights = {s: max(float(gpu_weights.get(s, 0)), 0.0) if gpus else 0.0 for s in STAGES}
    total = sum(weights.values())
    updates: dict[str, dict[str, float | int]] = {}
    for stage in STAGES:
        num_gpus, concurrency = _setting(e, stage, "num_gpus"), _setting(e, stage, "concurrency")
        if num_gpus is None:
            w = weights[stage]  # a tiny share still gets 0.01 of a GPU
            num_gpus = round(max(math.floor(w / total * 100 + TOL) / 100, 0.01), 2) if w else 0.0
            updates.setdefault(stage, {})["num_gpus"] = num_gpus
        if concurrency is None:
            concurrency = max(1, gpus // math.ceil(num_gpus - TOL)) if num_gpus > TOL else 1
            updates.setdefault(stage, {})["concurrency"] = concurrency
    return OmegaConf.merge(e, updates)


def _pool(e: DictConfig, stage: str) -> tuple[float, float, int]:
    """(GPUs, CPUs, actors) of a resolved pool."""
    gpu, concurrency = _setting(e, stage, "num_gpus"), _setting(e, stage, "concurrency")
    if gpu is None or concurrency is None:
        raise ValueError(f"engine.{stage}: num_gpus or concurrency is still auto; call resolve_pools first")
    return gpu, float(e[stage].num_cpus), int(concurrency)


def bundles(e: DictConfig) -> list[dict[str, float]]:
    """What the pipeline asks of the cluster, as resource shapes for an autoscaler
    (`ray.autoscaler.sdk.request_resources`): one per actor, and one decode/encode task."""
    shapes = []
    for stage in STAGES:
        gpu, cpu, actors = _pool(e, stage)
        shapes += [{k: v for k, v in (("CPU", cpu), ("GPU", gpu)) if v > 0}] * actors
    task = max(float(e.decode.num_cpus), float(e.encode.num_cpus))
    return [b for b in shapes if b] + ([{"CPU": task}] if task > 0 else [])


def _place(cpu_free: float, gpus_free: list[float], cpu: float, gpu: float) -> list[int] | None:
    """The GPUs (indices) an actor takes on a node with these free resources; None when it does not fit.
    A fraction of a GPU must fit on one GPU; n >= 1 GPUs take n whole free GPUs."""
    if cpu > cpu_free + TOL:
        return None
    if gpu <= TOL:
        return []
    if gpu < 1 - TOL:
        fits = [i for i, f in enumerate(gpus_free) if f >= gpu - TOL]
        return fits[:1] or None
    whole = [i for i, f in enumerate(gpus_free) if f >= 1 - TOL]
    n = math.ceil(gpu - TOL)
    return whole[:n] if len(whole) >= n else None


def _free(cpus: list[float], gpus: list[list[float]]) -> str:
    def gpu(free: list[float]) -> str:
        if all(abs(f - round(f)) < TOL for f in free):  # whole GPUs free or none: their count
            return _num(sum(free))
        return "+".join(_num(max(f, 0.0)) for f in free)  # fractions: what is left on each GPU

    nodes = zip(cpus, gpus, strict=True)
    return ", ".join(f"node {i} CPU {_num(c)} GPU {gpu(g)}" for i, (c, g) in enumerate(nodes, 1))


def unschedulable(e: DictConfig, nodes: list[dict[str, float]]) -> str | None:
    """None when Ray can place the pipeline on `nodes`, else one line saying what does not fit and why.

    Every actor of the three pools (resolved, see `resolve_pools`) is packed first-fit decreasing (by
    GPUs, then CPUs; nodes in the given order) onto one node with enough free CPUs and its GPU share on
    one physical GPU. Beside them, one decode/encode task and one shard writer must still fit.
    """
    if not nodes:
        return "engine: the Ray cluster has no alive nodes"
    cpus = [float(n.get("CPU", 0)) for n in nodes]
    gpus = [[1.0] * _whole_gpus(n) for n in nodes]
    most, total = max(map(len, gpus)), sum(map(len, gpus))
    cluster = f"cluster: {_count(len(nodes), 'node')}, {_count(sum(cpus), 'CPU')}, {_count(total, 'GPU')}"
    actors = []
    for stage in STAGES:
        gpu, cpu, n = _pool(e, stage)
        if n > 0 and gpu > TOL and math.ceil(gpu - TOL) > most:
            return f"engine.{stage}: one actor asks for {_count(gpu, 'GPU')}; the largest node has {most}"
        if n > 0 and cpu > max(cpus) + TOL:
            return f"engine.{stage}: one actor asks for {_count(cpu, 'CPU')}; the largest node has {_num(max(cpus))}"
        actors += [(stage, i, n, gpu, cpu) for i in range(1, n + 1)]
    for stage, i, n, gpu, cpu in sorted(actors, key=lambda a: (-a[3], -a[4])):  # stable: pools stay in order
        for node in range(len(nodes)):
            taken = _place(cpus[node], gpus[node], cpu, gpu)
            if taken is not None:
                cpus[node] -= cpu
                for g in taken:
                    gpus[node][g] -= min(gpu, 1.0)
                break
        else:
            return (f"engine: {stage} actor {i} of {n} ({_count(gpu, 'GPU')}, {_count(cpu, 'CPU')}) does not fit on "
                    f"any node: free after placing the others: {_free(cpus, gpus)} ({cluster})")  # fmt: skip

    task = max(float(e.decode.num_cpus), float(e.encode.num_cpus))
    write = float(OmegaConf.select(e, "write.num_cpus", default=0) or 0)
    free = list(cpus)  # two tasks: the larger on any node it fits leaves room for the smaller if any way does
    big = next((k for k, c in enumerate(free) if c >= max(task, write) - TOL), None)
    if big is not None:
        free[big] -= max(task, write)
        if any(c >= min(task, write) - TOL for c in free):
            return None
    tasks = f"a decode/encode task ({_count(task, 'CPU')})"
    tasks += f" and a shard writer ({_count(write, 'CPU')})" if write else ""
    left = ", ".join(f"node {k} CPU {_num(c)}" for k, c in enumerate(cpus, 1))
    return (f"engine: beside the actor pools there is no room for {tasks}: free {left} ({cluster}); lower "
            f"engine.*.num_cpus or concurrency")  # fmt: skip


def wait_until_schedulable(
    e: DictConfig,
    get_nodes: Callable[[], list[dict[str, float]]],
    timeout_s: float,
    poll_s: float = 5.0,
    warn: Callable[[str], None] = print,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> list[dict[str, float]]:
    """The nodes from `get_nodes` once the pipeline fits on them, polling every `poll_s` for up to
    `timeout_s` (an autoscaling cluster adds nodes when Ray asks for them); UserError when the time is up.
    `timeout_s` <= 0 (a local cluster, which cannot grow): the reason at once, without waiting."""
    deadline = clock() + timeout_s
    nodes = get_nodes()
    reason = unschedulable(e, nodes)
    if reason is None:
        return nodes
    if timeout_s <= 0:
        raise UserError(reason)
    warn(f"{reason}; waiting up to {_num(timeout_s)}s for nodes to join (an autoscaling cluster adds them on "
         f"demand; engine.wait_for_resources_s sets the wait)")  # fmt: skip
    while (left := deadline - clock()) > 0:
        sleep(min(poll_s, left))
        nodes = get_nodes()
        reason = unschedulable(e, nodes)
        if reason is None:
            return nodes
    raise UserError(f"{reason} (waited {_num(timeout_s)}s for the cluster to grow; engine.wait_for_resources_s)")

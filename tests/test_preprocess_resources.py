"""Fitting the Ray pipeline to the cluster (dynamictrl.preprocess.resources), without Ray: `auto` pool
sizes, per-node and per-GPU packing that cluster totals get wrong, and the wait for an autoscaling
cluster to grow, on a fake clock."""

from __future__ import annotations

import functools

import pytest
from omegaconf import OmegaConf

from dynamictrl import config
from dynamictrl.errors import UserError
from dynamictrl.preprocess.resources import resolve_pools, unschedulable, wait_until_schedulable

AUTO = {s: {"num_gpus": "auto", "concurrency": "auto"} for s in ("pose", "mask", "caption")}
WEIGHTS = {"pose": 1.0, "mask": 1.0, "caption": 2.0}


@functools.cache
def _shipped() -> dict:
    return OmegaConf.to_container(config.load("preprocess", ["engine=ray"]).engine)


def engine(*overlays: dict):
    """conf/engine/ray.yaml with explicit pools (no GPU, one actor each; the shipped ones are `auto`), a
    shard writer of 0 CPUs, and the overlays merged on top."""
    explicit = {s: {"num_gpus": 0, "concurrency": 1} for s in ("pose", "mask", "caption")}
    return OmegaConf.merge(_shipped(), explicit, {"write": {"num_cpus": 0, "concurrency": 1}}, *overlays)


def pools(**stages: tuple[float, float, int]) -> dict:
    """{stage: (num_gpus, num_cpus, concurrency)} as an overlay; unnamed stages keep the shipped pools."""
    return {s: {"num_gpus": g, "num_cpus": c, "concurrency": n} for s, (g, c, n) in stages.items()}


def test_auto_shares_one_gpu_per_set_and_runs_a_set_per_gpu():
    e = resolve_pools(engine(AUTO), [{"CPU": 8.0, "GPU": 2.0}, {"CPU": 4.0, "GPU": 1.0}], WEIGHTS)
    assert [(e[s].num_gpus, e[s].concurrency) for s in ("pose", "mask", "caption")] == [(0.25, 3), (0.25, 3), (0.5, 3)]
    assert unschedulable(e, [{"CPU": 8.0, "GPU": 2.0}, {"CPU": 4.0, "GPU": 1.0}]) is None
    thirds = resolve_pools(engine(AUTO), [{"CPU": 8.0, "GPU": 1.0}], dict.fromkeys(WEIGHTS, 1.0))
    assert [thirds[s].num_gpus for s in ("pose", "mask", "caption")] == [0.33, 0.33, 0.33]  # rounded down: fit one GPU
    twothirds = resolve_pools(engine(AUTO), [{"CPU": 8.0, "GPU": 1.0}], {"pose": 2.0, "mask": 1.0})
    assert (twothirds.pose.num_gpus, twothirds.mask.num_gpus) == (0.66, 0.33)  # down, not to 0.67
    odd = resolve_pools(engine(AUTO), [{"CPU": 8.0, "GPU": 1.0}], {"pose": 0.29, "mask": 0.71})
    assert (odd.pose.num_gpus, odd.mask.num_gpus) == (0.29, 0.71)  # 0.29 * 100 is 28.999...: not 0.28


def test_auto_without_gpus_or_with_a_cpu_stage():
    e = resolve_pools(engine(AUTO), [{"CPU": 8.0}, {"CPU": 4.0, "GPU": 0.5}], WEIGHTS)  # half a GPU is no GPU
    assert all((e[s].num_gpus, e[s].concurrency) == (0, 1) for s in ("pose", "mask", "caption"))
    e = resolve_pools(engine(AUTO), [{"CPU": 8.0, "GPU": 2.0}], {"pose": 0.0, "mask": 1.0, "caption": 3.0})
    assert (e.pose.num_gpus, e.pose.concurrency) == (0, 1)  # e.g. MediaPipe poses on the CPU
    assert (e.mask.num_gpus, e.mask.concurrency, e.caption.num_gpus, e.caption.concurrency) == (0.25, 2, 0.75, 2)
    e = resolve_pools(engine(AUTO), [{"CPU": 8.0, "GPU": 1.0}], {"pose": 1.0, "mask": 1.0})  # no caption model
    assert (e.pose.num_gpus, e.mask.num_gpus, e.caption.num_gpus, e.caption.concurrency) == (0.5, 0.5, 0, 1)


def test_explicit_values_are_kept_and_auto_is_case_insensitive():
    e = engine(AUTO, {"pose": {"num_gpus": 1, "concurrency": 3}, "mask": {"num_gpus": "AUTO", "concurrency": 2},
                      "caption": {"num_gpus": 2, "concurrency": "Auto"}})  # fmt: skip
    r = resolve_pools(e, [{"CPU": 16.0, "GPU": 4.0}], WEIGHTS)
    assert (r.pose.num_gpus, r.pose.concurrency) == (1, 3)
    assert (r.mask.num_gpus, r.mask.concurrency) == (0.25, 2)
    assert (r.caption.num_gpus, r.caption.concurrency) == (2, 2)  # 2 GPUs an actor: 4 GPUs hold 2
    assert e.mask.num_gpus == "AUTO"  # a copy: the input is left alone
    explicit = engine()
    assert resolve_pools(explicit, [{"CPU": 8.0, "GPU": 8.0}], WEIGHTS) == explicit


@pytest.mark.parametrize("key, value", [("num_gpus", "abc"), ("concurrency", "many"), ("num_gpus", None),
                                        ("concurrency", True)])  # fmt: skip
def test_a_value_neither_number_nor_auto_is_refused(key, value):
    with pytest.raises(UserError, match=rf"^engine\.caption\.{key}={value}: a number or auto$"):
        resolve_pools(engine({"caption": {key: value}}), [{"CPU": 8.0, "GPU": 1.0}], WEIGHTS)


def test_per_node_packing_that_cluster_totals_accept():
    two_singles = [{"CPU": 8.0, "GPU": 1.0}, {"CPU": 8.0, "GPU": 1.0}]
    reason = unschedulable(engine(pools(caption=(2, 0.25, 1))), two_singles)
    assert reason == "engine.caption: one actor asks for 2 GPUs; the largest node has 1"
    assert unschedulable(engine(pools(caption=(2, 0.25, 1))), [{"CPU": 8.0, "GPU": 2.0}]) is None

    one_gpu = [{"CPU": 8.0, "GPU": 1.0}]
    assert unschedulable(engine(pools(pose=(0.5, 0.25, 1), mask=(0.5, 0.25, 1))), one_gpu) is None
    reason = unschedulable(engine(pools(pose=(0.75, 0.25, 1), mask=(0.5, 0.25, 1))), one_gpu)
    assert reason.startswith("engine: mask actor 1 of 1 (0.5 GPU, 0.25 CPU) does not fit on any node")
    assert "node 1 CPU 7.75 GPU 0.25 (cluster: 1 node, 8 CPUs, 1 GPU)" in reason
    # 3 x 0.75 on two GPUs: 1.5 GPUs of room in total, but each GPU holds one
    reason = unschedulable(engine(pools(caption=(0.75, 0.25, 3))), [{"CPU": 8.0, "GPU": 2.0}])
    assert "caption actor 3 of 3" in reason and "GPU 0.25+0.25" in reason

    nodes = [{"CPU": 8.0, "GPU": 2.0}, {"CPU": 4.0}]
    reason = unschedulable(engine(pools(pose=(1, 0.25, 1), caption=(1, 0.25, 2))), nodes)
    assert reason == ("engine: caption actor 2 of 2 (1 GPU, 0.25 CPU) does not fit on any node: free after placing "
                      "the others: node 1 CPU 7.5 GPU 0, node 2 CPU 4 GPU 0 (cluster: 2 nodes, 12 CPUs, 2 GPUs)")  # fmt: skip
    reason = unschedulable(engine(pools(pose=(0.5, 0.25, 1))), [{"CPU": 8.0}])
    assert reason == "engine.pose: one actor asks for 0.5 GPU; the largest node has 0"


def test_cpu_packing_across_nodes():
    nodes = [{"CPU": 3.0}, {"CPU": 3.0}]  # 6 CPUs in all
    assert unschedulable(engine(pools(pose=(0, 2, 2), mask=(0, 0.5, 1), caption=(0, 0.5, 1))), nodes) is None
    reason = unschedulable(engine(pools(pose=(0, 2, 3))), nodes)  # 6.5 asked of 6 ...
    assert reason.startswith("engine: pose actor 3 of 3 (0 GPUs, 2 CPUs) does not fit on any node")
    reason = unschedulable(engine(pools(pose=(0, 2, 2), mask=(0, 2, 1))), [{"CPU": 3.0}, {"CPU": 3.0}, {"CPU": 1.0}])
    assert "mask actor 1 of 1" in reason  # ... and 7 CPUs are not enough either: 1 is left on each node
    reason = unschedulable(engine(pools(pose=(0, 4, 1))), nodes)
    assert reason == "engine.pose: one actor asks for 4 CPUs; the largest node has 3"
    assert unschedulable(engine(), []) == "engine: the Ray cluster has no alive nodes"
    # an actor needs its CPUs and its GPU on the same node
    reason = unschedulable(engine(pools(pose=(1, 2, 1))), [{"CPU": 1.0, "GPU": 1.0}, {"CPU": 8.0}])
    assert "pose actor 1 of 1" in reason


def test_a_decode_task_and_a_writer_must_fit_beside_the_actors():
    assert unschedulable(engine(), [{"CPU": 2.0}]) is None  # the shipped pools fit 2 CPUs with a 0-CPU writer
    no_write = OmegaConf.create({k: v for k, v in OmegaConf.to_container(engine()).items() if k != "write"})
    assert unschedulable(no_write, [{"CPU": 2.0}]) is None  # no `write` key: a writer takes no CPUs
    reason = unschedulable(engine({"write": {"num_cpus": 1}}), [{"CPU": 2.0}])  # 0.75 held, 1 + 1 asked
    assert reason == ("engine: beside the actor pools there is no room for a decode/encode task (1 CPU) and a shard "
                      "writer (1 CPU): free node 1 CPU 1.25 (cluster: 1 node, 2 CPUs, 0 GPUs); lower engine.*.num_cpus "
                      "or concurrency")  # fmt: skip
    assert unschedulable(engine({"write": {"num_cpus": 1}}), [{"CPU": 2.0}, {"CPU": 1.0}]) is None  # one on each node
    assert unschedulable(engine({"write": {"num_cpus": 1}}), [{"CPU": 3.0}]) is None  # both on one node
    reason = unschedulable(engine({"encode": {"num_cpus": 2}}), [{"CPU": 2.0}])
    assert "no room for a decode/encode task (2 CPUs):" in reason


class FakeCluster:
    """Nodes that grow on the `grow_on`-th call of get_nodes; a clock that moves only when slept."""

    def __init__(self, grow_on: int | None):
        self.grow_on, self.calls, self.now, self.sleeps, self.warnings = grow_on, 0, 100.0, [], []

    def nodes(self) -> list[dict[str, float]]:
        self.calls += 1
        return [{"CPU": 8.0}] + ([{"CPU": 8.0, "GPU": 1.0}] if self.grow_on and self.calls >= self.grow_on else [])

    def sleep(self, s: float) -> None:
        self.sleeps.append(s)
        self.now += s

    def wait(self, timeout_s: float) -> list[dict[str, float]]:
        return wait_until_schedulable(engine(pools(caption=(1, 0.25, 1))), self.nodes, timeout_s, poll_s=5.0,
                                      warn=self.warnings.append, clock=lambda: self.now, sleep=self.sleep)  # fmt: skip


def test_wait_fails_at_once_when_it_may_not_wait():
    cluster = FakeCluster(grow_on=2)
    with pytest.raises(UserError, match=r"^engine.caption: one actor asks for 1 GPU; the largest node has 0$"):
        cluster.wait(0)
    assert (cluster.calls, cluster.sleeps, cluster.warnings) == (1, [], [])


def test_wait_returns_the_nodes_once_the_cluster_has_grown():
    cluster = FakeCluster(grow_on=3)
    assert cluster.wait(60) == [{"CPU": 8.0}, {"CPU": 8.0, "GPU": 1.0}]
    assert (cluster.calls, cluster.sleeps) == (3, [5.0, 5.0])
    assert cluster.warnings == ["engine.caption: one actor asks for 1 GPU; the largest node has 0; waiting up to 60s "
                                "for nodes to join (an autoscaling cluster adds them on demand; "
                                "engine.wait_for_resources_s sets the wait)"]  # fmt: skip


def test_wait_gives_up_after_the_timeout_with_one_warning():
    cluster = FakeCluster(grow_on=None)
    with pytest.raises(UserError, match=r"has 0 \(waited 12s for the cluster to grow; engine.wait_for_resources_s\)$"):
        cluster.wait(12)
    assert cluster.sleeps == [5.0, 5.0, 2.0] and cluster.now == 112.0 and cluster.calls == 4  # a last look at the end
    assert len(cluster.warnings) == 1


def test_the_autoscaler_is_shown_every_actor_and_a_task():
    from dynamictrl.preprocess.resources import bundles

    e = engine(pools(pose=(0.25, 0.25, 2), mask=(0, 0.5, 1), caption=(1, 0, 1)))
    assert bundles(e) == [{"CPU": 0.25, "GPU": 0.25}] * 2 + [{"CPU": 0.5}, {"GPU": 1.0}, {"CPU": 1.0}]

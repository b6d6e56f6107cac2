"""A multi-node Ray cluster on one machine, started as a cluster user starts one: `ray start --head`,
then `ray start --address=HEAD` for every other node, each from a working directory that is not the
driver's, with per-node resources declared (`--num-gpus` on a machine without GPUs declares fake ones:
Ray schedules on them and sets CUDA_VISIBLE_DEVICES, and the models find no CUDA and run on the CPU).

The preprocessing rehearsal (tests/test_preprocess_cluster.py) and `make bench ARGS=preprocess` run
the driver against it with `engine.address=auto`, as on a cluster. Token authentication (on by default
for `ray start` in the pinned Ray, 2.60) is turned off for the rehearsal cluster and its drivers
(`RAY_AUTH_MODE=disabled`, in `env()`); a real cluster keeps its own setting.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env() -> dict[str, str]:
    """The environment of the cluster's processes and of a driver that joins it."""
    return {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}


class RehearsalCluster:
    """`ray start` processes on this machine, from `workdir`. Use as a context manager; `add_node`
    starts one more node (a new raylet joining the head), e.g. while a driver waits for resources."""

    def __init__(self, workdir: Path, object_store_mb: int = 300):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = _free_port()
        self.object_store = str(object_store_mb * 2**20)
        self.nodes = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _ray(self, *args: str) -> None:
        ray = shutil.which("ray", path=str(Path(sys.executable).parent)) or "ray"
        done = subprocess.run([ray, *args], cwd=self.workdir, env=env(), capture_output=True, text=True, timeout=180)
        if done.returncode != 0:
            raise RuntimeError(f"ray {' '.join(args)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")

    def start_head(self, num_cpus: float, num_gpus: int = 0) -> RehearsalCluster:
        self._ray("start", "--head", f"--port={self.port}", f"--num-cpus={num_cpus:g}", f"--num-gpus={num_gpus}",
                  f"--object-store-memory={self.object_store}", "--include-dashboard=false",
                  "--disable-usage-stats")  # fmt: skip
        self.nodes = 1
        return self

    def add_node(self, num_cpus: float, num_gpus: int = 0) -> None:
        self._ray("start", f"--address={self.address}", f"--num-cpus={num_cpus:g}", f"--num-gpus={num_gpus}",
                  f"--object-store-memory={self.object_store}")  # fmt: skip
        self.nodes += 1

    def wait_for_nodes(self, count: int, timeout: float = 60.0) -> None:
        """Until `count` nodes are alive (asked in a subprocess: this process stays out of Ray)."""
        code = "import ray; ray.init(address='auto', logging_level='ERROR'); print(sum(n['Alive'] for n in ray.nodes()))"
        deadline = time.monotonic() + timeout
        while True:
            out = subprocess.run([sys.executable, "-c", code], cwd=self.workdir, env=env(), capture_output=True,
                                 text=True, timeout=120).stdout.strip()  # fmt: skip
            if out.isdigit() and int(out) >= count:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"the rehearsal cluster has {out or 'no'} alive nodes, {count} expected")
            time.sleep(1.0)

    def stop(self) -> None:
        """`ray stop --force`: ends every Ray process on this machine (a rehearsal owns the machine)."""
        try:
            self._ray("stop", "--force")
        finally:
            self.nodes = 0

    def __enter__(self) -> RehearsalCluster:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

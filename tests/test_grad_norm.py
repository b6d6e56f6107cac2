"""train/grad_norm is the norm of the whole gradient: under FSDP2 each rank holds a shard of every
gradient, and the logged figure is the global norm on every rank, not the norm of that rank's shard."""

import gc
import os
import socket
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn


def two_processes(fn, *args) -> None:
    """Run fn(rank, *args) in 2 gloo processes on the CPU (an exception in either fails the caller)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_init, args=(port, fn, args), nprocs=2, join=True)


def _init(rank: int, port: int, fn, args) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        fn(rank, *args)
        gc.collect()  # FSDP2's and DeepSpeed's finished collectives release their tensors while the interpreter lives
        dist.barrier()  # no rank tears down its process group (and DeepSpeed's CPU comm op) while another still uses it
    finally:
        dist.destroy_process_group()
    # fn passed on this rank. Leave without interpreter finalization: Gloo's worker threads can still own tensors
    # there and abort the process ("terminate called without an active exception", SIGABRT; seen once in CI in
    # the FSDP2 export test, pytorch/pytorch#179291 describes the race). A failure above still raises as before.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def tiny() -> nn.Module:
    torch.manual_seed(0)  # the same weights on every rank
    return nn.Sequential(nn.Linear(6, 10), nn.GELU(), nn.Linear(10, 5), nn.Linear(5, 3))


def _grad_norm_under_fsdp2(rank: int) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from dynamictrl.train.module import DynamiCtrlModule

    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(1))
    full = tiny()
    full(x).square().sum().backward()
    expected = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in full.parameters()]))

    sharded = tiny()
    mesh = init_device_mesh("cpu", (2,))
    for layer in sharded:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(sharded, mesh=mesh)
    sharded(x).square().sum().backward()  # the same batch on both ranks: the averaged gradient is full's
    local = torch.linalg.vector_norm(torch.stack([p.grad.to_local().norm() for p in sharded.parameters()]))
    assert not torch.allclose(local, expected)  # each rank's shard alone is not the whole gradient

    module = DynamiCtrlModule(model_path="unused", optimizer=None)  # the hook as training calls it
    module.transformer = sharded
    logged = {}
    module.log = lambda name, value, **kw: logged.update({name: value})
    module.on_before_optimizer_step(None)
    assert float(logged["train/grad_norm"]) == pytest.approx(float(expected), rel=1e-5)  # on both ranks


def test_the_logged_grad_norm_under_fsdp2_is_the_whole_models():
    two_processes(_grad_norm_under_fsdp2)


def test_an_unsharded_gradient_is_not_reduced():
    """Single process (and DDP, whose gradients are whole on every rank): the plain norm."""
    from dynamictrl.train.module import DynamiCtrlModule

    model = tiny()
    model(torch.randn(4, 6)).square().sum().backward()
    module = DynamiCtrlModule(model_path="unused", optimizer=None)
    module.transformer = model
    logged = {}
    module.log = lambda name, value, **kw: logged.update({name: value})
    module.on_before_optimizer_step(None)
    expected = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])
    torch.testing.assert_close(logged["train/grad_norm"], expected)

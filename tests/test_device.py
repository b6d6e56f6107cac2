"""Each rank of a node takes its own GPU (cuda:LOCAL_RANK) in every stage that picks a device itself."""

import pytest
import torch

from dynamictrl.utils.device import local_device


@pytest.fixture
def four_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    for var in ("LOCAL_RANK", "SLURM_LOCALID"):
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


def test_auto_and_bare_cuda_mean_this_ranks_gpu(four_gpus):
    assert local_device("auto") == "cuda:0"
    four_gpus.setenv("SLURM_LOCALID", "2")
    assert local_device("auto") == "cuda:2"
    four_gpus.setenv("LOCAL_RANK", "3")  # torchrun's wins over SLURM's
    assert local_device("cuda") == "cuda:3" and local_device("cpu") == "cpu" and local_device("cuda:1") == "cuda:1"
    four_gpus.setenv("LOCAL_RANK", "5")
    assert local_device("auto") == "cuda:1"  # more ranks than GPUs: they share, round robin


def test_no_gpu_means_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert local_device("auto") == "cpu"


def test_every_stage_resolves_auto_to_this_ranks_gpu(four_gpus):
    four_gpus.setenv("LOCAL_RANK", "2")
    import onnxruntime
    from omegaconf import OmegaConf

    from dynamictrl.eval.run import metric_device
    from dynamictrl.pose import dwpose_backend
    from dynamictrl.preprocess import caption, masks

    four_gpus.setattr(onnxruntime, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert dwpose_backend._resolve_device("auto") == "cuda:2"  # rtmlib hands 2 to the CUDA provider as device_id
    assert dwpose_backend._resolve_device("cuda") == "cuda:2"
    assert masks._device("auto") == torch.device("cuda:2")  # SAM 2 / SAM
    assert caption._device("auto") == "cuda:2"  # Qwen2-VL
    assert metric_device(OmegaConf.create({})) == "cuda:2"  # eval backbones


def test_dwpose_auto_stays_on_the_cpu_with_the_gpu_build_but_no_gpu(monkeypatch):
    """onnxruntime-gpu lists its CUDA provider on machines without a GPU too (checked: 1.31.1)."""
    import onnxruntime

    from dynamictrl.pose import dwpose_backend

    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert dwpose_backend._resolve_device("auto") == "cpu"


def test_a_ray_actor_takes_the_gpu_ray_gave_it(four_gpus):
    """Ray hands an actor its GPU as CUDA_VISIBLE_DEVICES (one device, index 0 inside the actor), and
    the actor may have inherited a node-level SLURM_LOCALID: the index still lands on a visible GPU."""
    four_gpus.setattr(torch.cuda, "device_count", lambda: 1)
    four_gpus.setenv("CUDA_VISIBLE_DEVICES", "3")
    four_gpus.setenv("SLURM_LOCALID", "5")
    assert local_device("auto") == "cuda:0"

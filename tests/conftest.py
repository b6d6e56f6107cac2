"""Shared fixtures: a tiny embedded model and a small preprocessed dataset, built once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from dynamictrl.utils.warnings import NOISE

os.environ.setdefault("GLOG_minloglevel", "2")
ROOT = Path(__file__).resolve().parents[1]


def pytest_configure(config: pytest.Config) -> None:
    """The apps' named third-party noise is ignored here too, as filterwarnings lines (pytest resets the
    warning filters around every phase); pyproject makes dynamictrl's own warnings errors."""
    for message, category, module in NOISE:
        config.addinivalue_line("filterwarnings", f"ignore:{message}:{category.__name__}:{module}")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """The embedded pipeline built with a 2-step VAE fit (same code and layout, little quality)."""
    from dynamictrl.models import embedded

    return embedded.build(tmp_path_factory.mktemp("model") / "tiny", vae_steps=2, progress=False)


@pytest.fixture(scope="session")
def raw_data(tmp_path_factory) -> Path:
    from dynamictrl.data.synthetic import generate

    return generate(tmp_path_factory.mktemp("raw"), num_train=3, num_test=1, num_frames=20, progress=False)


@pytest.fixture(scope="session")
def shards(raw_data, tmp_path_factory) -> Path:
    from dynamictrl import config
    from dynamictrl.preprocess.run import run

    out = tmp_path_factory.mktemp("shards")
    run(config.load("preprocess", [f"input={raw_data}", f"output={out}", "progress=false"]))
    return out


@pytest.fixture(scope="module")
def clips(shards) -> list[dict]:
    """Three decoded clips of different videos of `shards` (different figures, backgrounds and motion):
    the pose swap's and the pose shift's tests."""
    import webdataset as wds

    from dynamictrl.data.shards import decode_sample, list_shards

    urls = list_shards(str(Path(shards) / "*.tar"))
    samples = [decode_sample(s) for s in wds.WebDataset(urls, shardshuffle=False, empty_check=False)]
    by_video: dict[str, dict] = {}
    for s in samples:
        by_video.setdefault(s["key"].rsplit("-", 1)[0], s)
    assert len(by_video) >= 3
    return list(by_video.values())[:3]


@pytest.fixture(scope="session")
def precomputed(tiny_model, shards, tmp_path_factory) -> Path:
    """The shards precomputed with the tiny model (latents, T5 embeddings, empty_text.npy)."""
    from dynamictrl import config
    from dynamictrl.train.precompute import run as precompute

    out = tmp_path_factory.mktemp("precomputed")
    result = precompute(config.load("precompute", [f"input={shards}/train-*.tar", f"output={out}",
                                                   f"model.path={tiny_model}", "progress=false"]))  # fmt: skip
    assert result["clips"] > 0 and result["rejected"] == 0
    return out


@pytest.fixture
def clip_lengths(monkeypatch) -> list[int]:
    """The pose-clip length of every pipeline call animate makes (the pipeline still runs)."""
    from dynamictrl.models.pipeline import DynamiCtrlPipeline

    lengths: list[int] = []
    real_call = DynamiCtrlPipeline.__call__

    def spy(self, image, pose_video, **kw):
        lengths.append(len(pose_video))
        return real_call(self, image, pose_video, **kw)

    monkeypatch.setattr(DynamiCtrlPipeline, "__call__", spy)
    return lengths

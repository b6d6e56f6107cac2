"""The Qwen2-VL caption backend, built from conf/caption/qwen2vl.yaml, on tiny random-weight models
saved in the real on-disk layout (DESIGN.md §3): batching, padding and decoding leave the model's own
greedy output unchanged."""

from __future__ import annotations

import json
import re

import pytest
import torch

from dynamictrl import config
from dynamictrl.data.synthetic import make_video
from dynamictrl.errors import UserError
from dynamictrl.preprocess.run import build
from dynamictrl.testing import tiny_qwen2vl

NEW_TOKENS = 12
# Small frames keep the tiny model at a few dozen vision tokens per clip.
SMALL = ["caption.min_pixels=784", "caption.max_pixels=12544", f"caption.max_new_tokens={NEW_TOKENS}"]


def captioner(path, *overrides):
    """The backend as the preprocess stage builds it from the config."""
    cfg = config.load("preprocess", ["caption=qwen2vl", f"caption.path={path}", *SMALL, *overrides])
    return build(cfg.caption)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_qwen2vl.build(tmp_path_factory.mktemp("qwen") / "tiny-qwen2-vl")


@pytest.fixture(scope="module")
def backend(tiny):
    b = captioner(tiny, "caption.batch_size=3")
    yield b
    b.close()


@pytest.fixture(scope="module")
def clips():
    """Three clips of different sizes: different vision-token counts, so a batch needs padding."""
    return [make_video(seed, 4, h, w, 8.0)["frames"] for seed, (h, w) in enumerate([(64, 64), (64, 96), (96, 64)])]


def test_config_builds_the_backend_from_the_folder(backend, tiny):
    from transformers import Qwen2VLForConditionalGeneration, __version__

    assert config.load("preprocess", ["caption=qwen2vl"]).caption.name == "qwen2vl"
    assert isinstance(backend.model, Qwen2VLForConditionalGeneration)
    tok, cfg = backend.processor.tokenizer, backend.model.config
    assert (backend.processor.video_token_id, tok.convert_tokens_to_ids("<|vision_start|>")) == (
        cfg.video_token_id, cfg.vision_start_token_id)  # fmt: skip
    assert backend.name == "qwen2-vl" and backend.version == f"transformers-{__version__}+{tiny.name}"
    assert "The person in the image is wearing" in backend.prompt and '"The background' in backend.prompt
    assert backend.device.type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_batched_captions_equal_one_at_a_time(backend, clips, monkeypatch):
    batch = backend.inputs(clips)
    mask = batch["attention_mask"]
    assert (mask == 0).any() and mask[:, -1].all(), "the batch is left-padded"
    batched = backend(clips)
    assert len(batched) == len(clips) and all(isinstance(c, str) for c in batched)
    assert len(set(batched)) > 1, "different videos, different captions: the video reaches the model"
    assert batched == [backend([c])[0] for c in clips]
    monkeypatch.setattr(backend, "batch_size", 2)  # a full batch and a remainder
    assert backend(clips) == batched
    assert backend(clips) == batched, "greedy decoding is deterministic"
    assert backend([]) == []


def test_backend_returns_the_models_own_output(backend, clips):
    """Direct `generate` on the backend's inputs, and the plain qwen-vl-utils recipe on one clip."""
    from PIL import Image
    from qwen_vl_utils import process_vision_info

    batch = backend.inputs(clips)
    with torch.inference_mode():
        out = backend.model.generate(**batch, max_new_tokens=NEW_TOKENS, do_sample=False)
    new = out[:, batch["input_ids"].shape[1] :]
    assert new.shape[1] > 0
    direct = [t.strip() for t in backend.processor.batch_decode(new, skip_special_tokens=True)]
    assert backend(clips) == direct

    clip, p = clips[1], backend.processor
    video = {"type": "video", "video": [Image.fromarray(f) for f in clip], "min_pixels": 784, "max_pixels": 12544}
    chat = [{"role": "user", "content": [video, {"type": "text", "text": backend.prompt}]}]
    _, videos, kwargs = process_vision_info(chat, return_video_kwargs=True, return_video_metadata=True)
    (frames, meta), = videos  # fmt: skip
    inputs = p(text=[p.apply_chat_template(chat, add_generation_prompt=True)], videos=[frames],
               video_metadata=[meta], do_resize=False, return_tensors="pt", **kwargs)  # fmt: skip
    with torch.inference_mode():
        out = backend.model.generate(**inputs.to(backend.device), max_new_tokens=NEW_TOKENS, do_sample=False)
    assert backend([clip]) == [p.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()]


def test_frames_are_sampled_evenly_and_sizes_follow_the_config(backend, tiny):
    long = make_video(7, 20, 64, 64, 8.0)["frames"]
    assert backend.inputs([long])["video_grid_thw"][0, 0] == 8 // 2  # num_frames=8 in 2-frame patches
    assert backend.inputs([long[:1]])["video_grid_thw"][0, 0] == 1  # one frame, repeated to a patch
    sized = captioner(tiny, "caption.resized_size=[56,112]")
    assert sized.inputs([long])["video_grid_thw"][0].tolist() == [4, 56 // 14, 112 // 14]
    with pytest.raises(ValueError, match="T, H, W, 3"):
        backend.inputs([long[..., 0]])


def test_qwen2_5_vl_folder(tmp_path, clips):
    b = captioner(tiny_qwen2vl.build(tmp_path / "tiny-qwen2.5-vl", variant="qwen2_5_vl"), "caption.batch_size=3")
    assert b.name == "qwen2.5-vl"
    assert b(clips) == [b([c])[0] for c in clips]


def user_error(*overrides) -> str:
    """The UserError message building the backend from the config raises (Hydra wraps it)."""
    with pytest.raises(Exception) as info:
        captioner(*overrides)
    err = info.value if isinstance(info.value, UserError) else info.value.__cause__
    assert isinstance(err, UserError), repr(info.value)
    return str(err)


def test_bad_paths_are_user_errors_naming_the_key(tmp_path):
    assert re.fullmatch(r"caption\.path=.*/nowhere: no such folder", user_error(tmp_path / "nowhere"))
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert re.match(r"caption\.path=.*/llama: model_type 'llama' is not Qwen2-VL", user_error(tmp_path / "llama"))
    assert re.match(r"caption\.path=.*: no config\.json", user_error(tmp_path))
    assert user_error(tmp_path / "llama", "caption.dtype=half").startswith("caption.dtype=half: expected one of")
    assert user_error(tmp_path / "llama", "caption.batch_size=0") == "caption.batch_size=0: must be at least 1"
    (tmp_path / "empty-qwen").mkdir()  # a config but no weights or tokenizer
    (tmp_path / "empty-qwen" / "config.json").write_text(json.dumps({"model_type": "qwen2_vl"}))
    assert re.match(r"caption\.path=.*/empty-qwen: cannot load the model: ", user_error(tmp_path / "empty-qwen"))

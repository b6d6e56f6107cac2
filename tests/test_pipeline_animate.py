"""Inference: the pipeline from a saved folder, chained long videos, exact frame counts."""
import json

import numpy as np
import pytest
import torch

from dynamictrl.animate.run import animate, load_pipeline
from dynamictrl.models.pipeline import DynamiCtrlPipeline


@pytest.fixture(scope="module")
def pipe(tiny_model):
    p = DynamiCtrlPipeline.from_pretrained(tiny_model)
    p.set_progress_bar_config(disable=True)
    return p


def poses(n, seed=0):
    return np.random.default_rng(seed).integers(0, 255, (n, 96, 64, 3), dtype=np.uint8)


def test_pipeline_output_frame_count_and_determinism(pipe):
    pose = poses(9)
    a = pipe(pose[0], pose, prompt="a red shirt", num_inference_steps=2, generator=torch.Generator().manual_seed(1)).frames[0]
    b = pipe(pose[0], pose, prompt="a red shirt", num_inference_steps=2, generator=torch.Generator().manual_seed(1)).frames[0]
    c = pipe(pose[0], pose, prompt="a blue shirt", num_inference_steps=2, generator=torch.Generator().manual_seed(1)).frames[0]
    assert a.shape == (9, 96, 64, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)  # different captions, different embeddings, different video


def test_invalid_frame_count_and_resolution_are_one_line_errors(pipe):
    with pytest.raises(ValueError, match=r"num_frames=8 .* \(needs 4k\+1 frames\); nearest valid: 5 or 9"):
        pipe(poses(1)[0], poses(8), prompt="x", num_inference_steps=1)
    with pytest.raises(ValueError, match="not divisible by 8"):
        pipe(poses(1)[0], np.zeros((9, 100, 64, 3), np.uint8), prompt="x", num_inference_steps=1)


@pytest.mark.parametrize("n", [1, 9, 20, 26])
def test_animate_gives_exactly_the_requested_frames(pipe, n):
    out = animate(pipe, poses(1)[0], poses(7), "a person", clip_frames=9, num_frames=n, progress=False,
                  num_inference_steps=1, guidance_scale=1.0)  # fmt: skip
    assert out.shape == (n, 96, 64, 3)


def test_each_clip_starts_from_the_previous_clips_last_frame(pipe, monkeypatch):
    refs, calls = [], []
    real_call = DynamiCtrlPipeline.__call__

    def spy(self, image, pose_video, **kw):
        refs.append(np.asarray(image).copy())
        result = real_call(self, image, pose_video, **kw)
        calls.append(result.frames[0])
        return result

    monkeypatch.setattr(DynamiCtrlPipeline, "__call__", spy)
    out = animate(pipe, poses(1)[0], poses(17), "a person", clip_frames=9, progress=False,
                  num_inference_steps=1, guidance_scale=1.0)  # fmt: skip
    assert len(calls) == 2 and out.shape[0] == 17
    assert np.array_equal(refs[1], calls[0][-1])
    assert np.array_equal(out[:9], calls[0]) and np.array_equal(out[9:], calls[1][1:])


def test_training_output_folder_loads_as_a_pipeline(tiny_model, tmp_path):
    import json

    from dynamictrl.models.transformer import DynamiCtrlTransformer3DModel

    t = DynamiCtrlTransformer3DModel.from_pretrained(tiny_model / "transformer")
    t.save_pretrained(tmp_path / "transformer")
    (tmp_path / "model.json").write_text(json.dumps({"base": str(tiny_model), "transformer": "transformer"}))
    assert isinstance(load_pipeline(tmp_path), DynamiCtrlPipeline)


def test_overlap_cross_fades_and_keeps_the_frame_count(pipe, monkeypatch):
    calls = []
    real_call = DynamiCtrlPipeline.__call__

    def spy(self, image, pose_video, **kw):
        result = real_call(self, image, pose_video, **kw)
        calls.append(result.frames[0].astype(np.float32))
        return result

    monkeypatch.setattr(DynamiCtrlPipeline, "__call__", spy)
    out = animate(pipe, poses(1)[0], poses(15), "a person", clip_frames=9, overlap=2, progress=False,
                  num_inference_steps=1, guidance_scale=1.0)  # fmt: skip
    assert out.shape[0] == 15 and len(calls) == 2  # clips start at 0 and 6
    a, b = calls[0], calls[1]
    expected = (2 / 3) * a[7] + (1 / 3) * b[1]  # frame 7 = second clip's frame 1, weight 1/3
    assert np.abs(out[7].astype(np.float32) - expected).max() <= 0.5 + 1e-3
    assert np.array_equal(out[9:12], b[3:6].round().astype(np.uint8))
    with pytest.raises(ValueError, match="overlap=8 leaves no new frames"):
        animate(pipe, poses(1)[0], poses(15), "x", clip_frames=9, overlap=8, progress=False)


def test_cfg_in_separate_passes_gives_the_same_video(pipe):
    pose = poses(9)
    kw = dict(prompt="a red shirt", num_inference_steps=2, guidance_scale=3.0)
    a = pipe(pose[0], pose, generator=torch.Generator().manual_seed(1), **kw).frames[0]
    b = pipe(pose[0], pose, generator=torch.Generator().manual_seed(1), cfg_separate_passes=True, **kw).frames[0]
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1


def test_training_output_with_a_missing_base_is_a_clear_error(tmp_path):
    import json

    from dynamictrl.errors import UserError

    (tmp_path / "model.json").write_text(json.dumps({"base": "/no/such/base", "transformer": "transformer"}))
    with pytest.raises(UserError, match="its base model /no/such/base is not a pipeline folder"):
        load_pipeline(tmp_path)


def test_loaded_pipelines_use_dpm_with_trailing_timesteps(tiny_model, tmp_path):
    import shutil

    from diffusers import CogVideoXDDIMScheduler

    folder = tmp_path / "ddim"
    shutil.copytree(tiny_model, folder)
    CogVideoXDDIMScheduler(timestep_spacing="leading").save_pretrained(folder / "scheduler")
    cfg = json.loads((folder / "model_index.json").read_text())
    cfg["scheduler"] = ["diffusers", "CogVideoXDDIMScheduler"]
    (folder / "model_index.json").write_text(json.dumps(cfg))
    pipe = load_pipeline(folder)
    assert type(pipe.scheduler).__name__ == "CogVideoXDPMScheduler"
    assert pipe.scheduler.config.timestep_spacing == "trailing"


def test_background_mode_masks_each_chained_clips_own_reference(pipe, monkeypatch):
    """Three chained clips: each clip's reference (the image, then generated frames) is masked with the
    mask of that very reference, not the first one's."""
    calls = []
    real_call = DynamiCtrlPipeline.__call__

    def spy(self, image, pose_video, **kw):
        calls.append((np.asarray(image).copy(), kw.get("reference_mask")))
        return real_call(self, image, pose_video, **kw)

    def person(frame):  # a mask that depends on the picture: its brighter half
        lum = frame.astype(np.float32).mean(-1)
        return lum > np.median(lum)

    monkeypatch.setattr(DynamiCtrlPipeline, "__call__", spy)
    out = animate(pipe, poses(1)[0], poses(25), "a person", clip_frames=9, progress=False, mask_for=person,
                  num_inference_steps=1, guidance_scale=1.0)  # fmt: skip
    assert out.shape[0] == 25 and len(calls) == 3  # clips start at 0, 8 and 16
    assert np.array_equal(calls[1][0], out[8]) and np.array_equal(calls[2][0], out[16])
    for image, mask in calls:
        assert mask is not None and np.array_equal(mask, person(image))
    assert not np.array_equal(calls[1][1], calls[0][1]) and not np.array_equal(calls[2][1], calls[1][1])


def test_the_reference_masker_measures_each_frame_and_keeps_the_last_mask_where_none_is_found():
    from skimage.data import astronaut

    from dynamictrl.animate.run import ReferenceMasker, fit
    from dynamictrl.pose.mediapipe_backend import MediaPipeHolistic

    backend = MediaPipeHolistic()
    img = fit(astronaut(), 256, 256)
    kpts, mask = backend(img)
    masker = ReferenceMasker(backend)
    first = masker.start(img, kpts, mask)
    assert first is not None and first.shape == (256, 256) and masker(img) is first
    shifted = np.roll(img, 60, axis=1)  # the person moved: her own mask, not the first one
    moved = masker(shifted)
    assert moved is not None and (moved != first).mean() > 0.05
    assert np.abs(np.roll(first, 60, axis=1).astype(int) - moved).mean() < (first != moved).mean()
    blank = np.full_like(img, 127)
    assert masker(blank) is moved  # nobody found: the last mask found is kept
    masker.close()
    backend.close()

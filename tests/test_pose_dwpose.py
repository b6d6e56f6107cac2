"""The DWPose backend (rtmlib + onnxruntime) on tiny random-weight graphs with the real signatures,
built through Hydra from conf/pose/dwpose.yaml as a user's run builds it."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import skimage.data
from hydra.utils import instantiate

from dynamictrl import config
from dynamictrl.errors import UserError
from dynamictrl.pose import layout as L
from dynamictrl.pose.dwpose_backend import DWPose
from dynamictrl.testing import tiny_dwpose

# Planted detector boxes (cx, cy, w, h, score[, COCO class]) on the 640 canvas: a confident tall person
# whose padded crop runs past the bottom of the frame, a small doubtful person, and a confident car.
# The astronaut photo is 512x512, letterboxed to 640 at ratio 1.25.
BOXES = ((320.0, 340.0, 220.0, 560.0, 0.95), (528.0, 176.0, 80.0, 160.0, 0.4),
         (112.0, 560.0, 120.0, 80.0, 0.9, 2))  # fmt: skip


@pytest.fixture(scope="module")
def graphs(tmp_path_factory):
    """{"fixed": folder, "dynamic": folder}: the same weights with a batch-1 and a dynamic batch axis."""
    root = tmp_path_factory.mktemp("dwpose")
    for kind in ("fixed", "dynamic"):
        tiny_dwpose.build(root / kind, dynamic_batch=kind == "dynamic", boxes=BOXES)
    return {"fixed": root / "fixed", "dynamic": root / "dynamic"}


@pytest.fixture(scope="module")
def frames():
    """(6, 512, 512, 3) uint8: the photo, mirrored, shifted, and the photo again (frames 0, 3, 5 equal)."""
    img = skimage.data.astronaut()
    return np.stack([img, img[:, ::-1], np.roll(img, 48, axis=1), img, np.roll(img, -32, axis=0), img])


def build(folder, *overrides: str) -> DWPose:
    paths = [f"pose.det_model={folder}/yolox_l.onnx", f"pose.pose_model={folder}/dw-ll_ucoco_384.onnx"]
    return instantiate(config.load("preprocess", ["pose=dwpose", *paths, *overrides]).pose)


def build_default() -> DWPose:
    return instantiate(config.load("preprocess", ["pose=dwpose"]).pose)


def reference(folder, frame: np.ndarray) -> np.ndarray:
    """rtmlib's own Wholebody solution on the same files, tall person's pose mapped to our layout -> (134, 3).
    It keeps boxes over 0.7 of any class, class by class: the tall person first, then the car."""
    from rtmlib import Wholebody

    solution = Wholebody(det=str(folder / "yolox_l.onnx"), pose=str(folder / "dw-ll_ucoco_384.onnx"),
                         backend="onnxruntime", device="cpu")  # fmt: skip
    points, scores = solution(frame)
    assert points.shape == (2, 133, 2)
    h, w = frame.shape[:2]
    k = L.from_coco_wholebody(points[0], scores[0], w, h)
    k[((k[:, :2] < 0) | (k[:, :2] > 1)).any(1)] = 0.0
    return k


def test_track_meets_the_contract_and_matches_rtmlib(graphs, frames):
    backend = build(graphs["fixed"], "pose.device=cpu")
    track = backend.detect_video(frames)
    assert track.kpts.shape == (6, L.NUM_KEYPOINTS, 3) and track.kpts.dtype == np.float32
    assert track.people.shape == (6,) and track.masks is None
    k = track.kpts
    assert k.min() >= 0.0 and k.max() <= 1.0
    assert (k[k[..., 2] == 0, :2] == 0).all()  # undetected points carry no coordinates
    assert (k[..., 2] > 0.3).mean() > 0.2
    # the pose is a function of the pixels: equal frames agree, different frames differ
    np.testing.assert_array_equal(k[0], k[3])
    assert np.abs(k[0] - k[1]).mean() > 1e-3 and np.abs(k[0] - k[2]).mean() > 1e-3
    for i in (0, 2):  # the same numbers as rtmlib's pipeline, main person picked out of two
        np.testing.assert_allclose(k[i], reference(graphs["fixed"], frames[i]), atol=1e-5)
    # frame-by-frame use (the animate stage): reset, then one frame at a time
    backend.reset()
    single, mask = backend(frames[2])
    assert mask is None
    np.testing.assert_allclose(single, k[2], atol=1e-6)
    assert backend.name == "dwpose-rtmlib"
    assert "rtmlib 0.0.16" in backend.version and "dw-ll_ucoco_384.onnx sha256:" in backend.version
    backend.close()
    with pytest.raises(RuntimeError, match="closed"):
        backend.detect_video(frames[:1])


def test_people_counts_the_confident_person_boxes(graphs, frames, tmp_path):
    strict = build(graphs["fixed"], "pose.det_score_threshold=0.5").detect_video(frames)
    lenient = build(graphs["fixed"], "pose.det_score_threshold=0.3").detect_video(frames)
    np.testing.assert_array_equal(strict.people, 1)
    np.testing.assert_array_equal(lenient.people, 2)
    # the main person is the largest box, whichever threshold lets the small one in
    np.testing.assert_allclose(strict.kpts, lenient.kpts, atol=1e-6)
    box = L.person_box(strict.kpts[0], threshold=0.0)
    assert box[3] - box[1] > 0.5  # the tall person's crop (420 / 640 of the frame, padded), not the small one
    # a detector that sees nobody: no people, nothing detected
    tiny_dwpose.build_detector(tmp_path / "yolox_l.onnx", boxes=())
    tiny_dwpose.build_pose(tmp_path / "dw-ll_ucoco_384.onnx")
    empty = build(tmp_path).detect_video(frames[:2])
    np.testing.assert_array_equal(empty.people, 0)
    assert not empty.kpts.any()


def test_batched_and_unbatched_graphs_agree(graphs, frames):
    looped = build(graphs["fixed"], "pose.batch_size=4")
    batched = build(graphs["dynamic"], "pose.batch_size=4")
    assert (looped.pose_batch_size, batched.pose_batch_size) == (1, 4)
    assert (looped.det_batch_size, batched.det_batch_size) == (1, 4)
    calls = {}
    for label, backend in (("looped", looped), ("batched", batched)):
        session, run = backend._pose.session, backend._pose.session.run
        calls[label] = []

        def counted(names, feed, *args, _run=run, _calls=calls[label]):
            _calls.append(len(next(iter(feed.values()))))
            return _run(names, feed, *args)

        session.run = counted
    a, b = looped.detect_video(frames), batched.detect_video(frames)
    assert calls == {"looped": [1] * 6, "batched": [4, 2]}
    np.testing.assert_array_equal(a.people, b.people)
    np.testing.assert_allclose(a.kpts, b.kpts, atol=1e-5)


def test_configuration_errors_name_the_key(graphs, tmp_path, monkeypatch, caplog):
    def user_error(*overrides: str) -> str:
        with pytest.raises(Exception) as info:
            build(graphs["fixed"], *overrides)
        err = info.value if isinstance(info.value, UserError) else info.value.__cause__  # Hydra wraps it
        assert isinstance(err, UserError), repr(info.value)
        return str(err)

    # the shipped defaults: both files under $DWPOSE_DIR, else /models/dwpose
    monkeypatch.setenv("DWPOSE_DIR", str(graphs["fixed"]))
    assert build_default().pose_path == graphs["fixed"] / "dw-ll_ucoco_384.onnx"
    monkeypatch.delenv("DWPOSE_DIR")
    if not Path("/models/dwpose/yolox_l.onnx").exists():
        with pytest.raises(Exception, match="pose.det_model=/models/dwpose/yolox_l.onnx: no such file"):
            build_default()
    missing = tmp_path / "nowhere.onnx"
    assert user_error(f"pose.det_model={missing}") == f"pose.det_model={missing}: no such file"
    assert user_error(f"pose.pose_model={missing}") == f"pose.pose_model={missing}: no such file"
    assert user_error("pose.pose_input_size=[192,256]").startswith("pose.pose_model=")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a graph")
    assert user_error(f"pose.det_model={bad}").startswith(f"pose.det_model={bad}: cannot load")
    assert user_error("pose.device=tpu").startswith("pose.device=tpu:")
    # this onnxruntime has no CUDA provider: asked for CUDA, stop; a visible GPU left unused, warn loudly
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        assert "onnxruntime-gpu" in user_error("pose.device=cuda")
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
        with pytest.warns(RuntimeWarning, match="runs on the CPU"), caplog.at_level(logging.WARNING):
            assert build(graphs["fixed"]).device == "cpu"
        assert "runs on the CPU" in caplog.text

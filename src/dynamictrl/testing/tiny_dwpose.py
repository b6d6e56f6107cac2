"""Tiny random-weight stand-ins for DWPose's two ONNX files, with the real files' signatures.

- detector, like `yolox_l.onnx`: `images` (N, 3, 640, 640) float pixels 0-255 -> `output` (N, 8400, 85):
  raw YOLOX predictions per anchor (strides 8, 16, 32): x/y offsets in cells and log w/h (decoded by
  rtmlib with grids and strides), then objectness and 80 class scores already through a sigmoid.
- pose, like `dw-ll_ucoco_384.onnx`: `input` (N, 3, 384, 288) normalised RGB -> `simcc_x` (N, 133, 576),
  `simcc_y` (N, 133, 768): SimCC logits at split ratio 2.

Both are small conv nets (a strided conv backbone, 1x1 conv heads; the pose head flattens and projects
to the SimCC bins as RTMPose's head does) built with `onnx.helper`, so a dynamic-batch and a batch-1
graph of the same seed hold the same weights. N is 1 unless `dynamic_batch`.

The detector's heads add a per-anchor bias map (an ordinary graph input-independent term, as a learned
positional bias would be) that plants person boxes: the anchors named in `boxes` predict those boxes
with the given confidence on any image, every other anchor is near zero. Small random head weights keep
the outputs a real function of the image.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET, IR_VERSION = 17, 8  # ir 8: loadable by every onnxruntime of the last few years
NUM_CLASSES = 80  # COCO; person is class 0
STRIDES = (8, 16, 32)
# (cx, cy, w, h, score) in detector-input pixels (the 640x640 letterboxed canvas): one tall person.
DEFAULT_BOXES = ((320.0, 320.0, 200.0, 420.0, 0.95),)


def _logit(p: float) -> float:
    return float(np.log(p / (1.0 - p)))


def _save(nodes, inputs, outputs, weights: dict[str, np.ndarray], path: Path, name: str) -> Path:
    inits = [numpy_helper.from_array(v.astype(np.float32) if v.dtype.kind == "f" else v, k)
             for k, v in weights.items()]  # fmt: skip
    graph = helper.make_graph(nodes, name, inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="tiny")
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def build_detector(path: str | Path, boxes: Sequence[Sequence[float]] = DEFAULT_BOXES,
                   input_size: tuple[int, int] = (640, 640), dynamic_batch: bool = False,
                   seed: int = 0) -> Path:  # fmt: skip
    """Write a tiny YOLOX detector to `path`.

    Args:
        boxes: boxes to plant, each (cx, cy, w, h, score) or (cx, cy, w, h, score, coco_class) in
            input-canvas pixels, class 0 (person) by default; each is predicted by the stride-32 anchor
            whose cell holds its centre (one box per cell).
        input_size: (H, W), multiples of 32.
    """
    rng = np.random.default_rng(seed)
    h, w = input_size
    batch = "batch" if dynamic_batch else 1
    c = 8
    weights: dict[str, np.ndarray] = {
        "scale": np.array(1 / 255, np.float32),
        "w8": rng.normal(0, 1 / np.sqrt(3 * 64), (c, 3, 8, 8)),
        "w16": rng.normal(0, 1 / np.sqrt(c * 4), (c, c, 2, 2)),
        "w32": rng.normal(0, 1 / np.sqrt(c * 4), (c, c, 2, 2)),
        "flat": np.array([0, 5 + NUM_CLASSES, -1], np.int64),
        "split": np.array([4, 1 + NUM_CLASSES], np.int64),
    }
    nodes = [
        helper.make_node("Mul", ["images", "scale"], ["x"]),
        helper.make_node("Conv", ["x", "w8"], ["c8"], strides=[8, 8]),
        helper.make_node("Relu", ["c8"], ["f8"]),
        helper.make_node("Conv", ["f8", "w16"], ["c16"], strides=[2, 2]),
        helper.make_node("Relu", ["c16"], ["f16"]),
        helper.make_node("Conv", ["f16", "w32"], ["c32"], strides=[2, 2]),
        helper.make_node("Relu", ["c32"], ["f32"]),
    ]
    levels = []
    for s in STRIDES:
        gh, gw = h // s, w // s
        # (85, gh, gw): boxes of one cell, objectness and classes near zero after the sigmoid.
        bias = np.zeros((5 + NUM_CLASSES, gh, gw), np.float32)
        bias[2:4] = np.log(2.0)
        bias[4:] = -10.0
        if s == STRIDES[-1]:
            for cx, cy, bw, bh, score, *cls in boxes:
                gx, gy = int(cx // s), int(cy // s)
                bias[:, gy, gx] = -10.0
                bias[:4, gy, gx] = (cx / s - gx, cy / s - gy, np.log(bw / s), np.log(bh / s))
                # score = objectness x class probability; split it evenly between the two.
                bias[4, gy, gx] = bias[5 + (cls[0] if cls else 0), gy, gx] = _logit(np.sqrt(score))
        weights[f"head{s}"] = rng.normal(0, 0.01, (5 + NUM_CLASSES, c, 1, 1))
        weights[f"bias{s}"] = bias[None]
        nodes += [
            helper.make_node("Conv", [f"f{s}", f"head{s}"], [f"h{s}"]),
            helper.make_node("Add", [f"h{s}", f"bias{s}"], [f"p{s}"]),  # (N, 85, gh, gw)
            helper.make_node("Reshape", [f"p{s}", "flat"], [f"l{s}"]),  # (N, 85, gh*gw)
        ]
        levels.append(f"l{s}")
    nodes += [
        helper.make_node("Concat", levels, ["cat"], axis=2),  # (N, 85, 8400)
        helper.make_node("Transpose", ["cat"], ["pred"], perm=[0, 2, 1]),  # (N, 8400, 85)
        helper.make_node("Split", ["pred", "split"], ["reg", "logits"], axis=2),
        helper.make_node("Sigmoid", ["logits"], ["probs"]),
        helper.make_node("Concat", ["reg", "probs"], ["output"], axis=2),
    ]
    anchors = sum((h // s) * (w // s) for s in STRIDES)
    inputs = [helper.make_tensor_value_info("images", TensorProto.FLOAT, [batch, 3, h, w])]
    outputs = [helper.make_tensor_value_info("output", TensorProto.FLOAT, [batch, anchors, 5 + NUM_CLASSES])]
    return _save(nodes, inputs, outputs, weights, path, "tiny_yolox")


def build_pose(path: str | Path, input_size: tuple[int, int] = (288, 384), num_keypoints: int = 133,
               simcc_split_ratio: float = 2.0, dynamic_batch: bool = False,
               seed: int = 0) -> Path:  # fmt: skip
    """Write a tiny DWPose (RTMPose SimCC) whole-body model to `path`.

    Args:
        input_size: (W, H), as rtmlib and the model's name give it; multiples of 32.
    """
    rng = np.random.default_rng(seed)
    w, h = input_size
    batch = "batch" if dynamic_batch else 1
    c, cells = 16, (h // 32) * (w // 32)
    bins_x, bins_y = int(w * simcc_split_ratio), int(h * simcc_split_ratio)
    weights = {
        "wb": rng.normal(0, 1 / np.sqrt(3 * 32 * 32), (c, 3, 32, 32)),
        "wk": rng.normal(0, 1 / np.sqrt(c), (num_keypoints, c, 1, 1)),
        "flat": np.array([0, num_keypoints, -1], np.int64),
        # scaled so that each point's best bin lands around 0.5-1, like a trained model's confident points
        "wx": rng.normal(0, 0.1 / np.sqrt(cells), (cells, bins_x)),
        "bx": rng.normal(0, 0.02, (bins_x,)),
        "wy": rng.normal(0, 0.1 / np.sqrt(cells), (cells, bins_y)),
        "by": rng.normal(0, 0.02, (bins_y,)),
    }
    nodes = [
        helper.make_node("Conv", ["input", "wb"], ["cb"], strides=[32, 32]),
        helper.make_node("Relu", ["cb"], ["feat"]),  # (N, 16, H/32, W/32)
        helper.make_node("Conv", ["feat", "wk"], ["kmap"]),  # (N, K, H/32, W/32)
        helper.make_node("Reshape", ["kmap", "flat"], ["kvec"]),  # (N, K, cells)
        helper.make_node("MatMul", ["kvec", "wx"], ["mx"]),
        helper.make_node("Add", ["mx", "bx"], ["simcc_x"]),  # (N, K, 2W)
        helper.make_node("MatMul", ["kvec", "wy"], ["my"]),
        helper.make_node("Add", ["my", "by"], ["simcc_y"]),  # (N, K, 2H)
    ]
    inputs = [helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, 3, h, w])]
    outputs = [
        helper.make_tensor_value_info("simcc_x", TensorProto.FLOAT, [batch, num_keypoints, bins_x]),
        helper.make_tensor_value_info("simcc_y", TensorProto.FLOAT, [batch, num_keypoints, bins_y]),
    ]
    return _save(nodes, inputs, outputs, weights, path, "tiny_dwpose")


def build(folder: str | Path, dynamic_batch: bool = False, boxes: Sequence[Sequence[float]] = DEFAULT_BOXES,
          seed: int = 0) -> tuple[Path, Path]:  # fmt: skip
    """Both graphs under the real file names in `folder`: (yolox_l.onnx, dw-ll_ucoco_384.onnx)."""
    folder = Path(folder)
    det = build_detector(folder / "yolox_l.onnx", boxes=boxes, dynamic_batch=dynamic_batch, seed=seed)
    pose = build_pose(folder / "dw-ll_ucoco_384.onnx", dynamic_batch=dynamic_batch, seed=seed)
    return det, pose

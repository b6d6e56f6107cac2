"""FID, FID-VID and FVD through their weight-file loaders, and eval's generate-then-score mode."""

import json

import numpy as np
import pytest
import torch

from dynamictrl import config
from dynamictrl.errors import UserError
from dynamictrl.eval import backbones as B
from dynamictrl.eval import distribution as D
from dynamictrl.eval.metrics import video_metrics
from dynamictrl.eval.run import run, score
from dynamictrl.utils.video import read_frames_dir, read_video, write_video


@pytest.fixture(scope="module")
def weight_files(tmp_path_factory):
    """Random-init backbones saved in the formats of the published weight files."""
    folder = tmp_path_factory.mktemp("weights")
    torch.manual_seed(0)
    r3d = B.ResNet3D50().state_dict()
    torch.save({"state_dict": {f"module.{k}": v for k, v in r3d.items()}, "arch": "resnet-50"}, folder / "resnet-50-kinetics.pth")
    torch.save(B.InceptionI3D().state_dict(), folder / "i3d_pretrained_400.pt")
    torch.save(B.random_inception_state(), folder / "pt_inception-2015-12-05-6726825d.pth")
    return {"fid_vid": folder / "resnet-50-kinetics.pth", "fvd": folder / "i3d_pretrained_400.pt",
            "fid": folder / "pt_inception-2015-12-05-6726825d.pth"}  # fmt: skip


@pytest.fixture(scope="module")
def nets(weight_files):
    return {"fid": B.build_inception(weight_files["fid"]), "fid_vid": B.build_resnet3d(weight_files["fid_vid"]),
            "fvd": B.build_i3d(weight_files["fvd"])}  # fmt: skip


def test_loaded_backbones_give_the_published_feature_sizes_and_are_the_saved_networks(nets, weight_files):
    clip = torch.randn(1, 3, 16, 112, 112)
    assert nets["fid_vid"](clip).shape == (1, 2048)
    assert nets["fvd"](torch.randn(1, 3, 16, 224, 224)).shape == (1, 400)
    assert nets["fid"](torch.rand(2, 3, 64, 48)).shape == (2, 2048)
    # the loader really put the file's tensors in place (a fresh random net would differ)
    saved = torch.load(weight_files["fvd"], weights_only=True)
    assert torch.equal(nets["fvd"].state_dict()["Mixed_4b.b1b.conv3d.weight"], saved["Mixed_4b.b1b.conv3d.weight"])
    # the published I3D has 12.7 M parameters; the architecture must match to load the real file
    assert sum(p.numel() for p in nets["fvd"].parameters()) == 12_697_264


def test_wrong_or_missing_weight_files_are_one_line_errors(tmp_path, weight_files):
    with pytest.raises(UserError, match="no such file"):
        B.build_i3d(tmp_path / "nope.pt")
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(UserError, match="keys do not match"):
        B.build_resnet3d(tmp_path / "other.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="not a tensor checkpoint"):
        B.build_inception(tmp_path / "junk.pt")


def test_clip_protocols():
    assert D.clip_starts(20, 1) == [0, 1, 2, 3, 4]  # disco: every frame with 15 successors starts a clip
    assert D.clip_starts(20, 1, drop_last=True) == [0, 1, 2, 3]  # disco-gif: its script's range(0, T - 16)
    assert D.clip_starts(16, 1) == [0] and D.clip_starts(16, 1, drop_last=True) == []
    assert D.clip_starts(40, 16, pad_short=True) == [0, 16]  # clean: no overlap
    assert D.clip_starts(9, 1) == [] and D.clip_starts(9, 1, drop_last=True) == []  # disco: a short video, no clip
    assert D.clip_starts(9, 16, pad_short=True) == [0]  # clean: one clip, padded
    frames = np.zeros((2, 40, 80, 3), np.uint8)
    frames[:, :, 20:60] = 255  # a white square in the middle of a black frame
    squashed, cropped = D.resize_frames(frames, 16, crop=False), D.resize_frames(frames, 16, crop=True)
    assert squashed.shape == cropped.shape == (2, 16, 16, 3)
    assert cropped.mean() > 250 and 100 < squashed.mean() < 160  # the crop keeps the square, the squash does not


def _videos(folder, seed, shift=0, frames=16):
    rng = np.random.default_rng(seed)
    for name in ("a", "b"):
        base = rng.integers(0, 256, (1, 24, 20, 3)).repeat(frames, 0)
        motion = np.cumsum(rng.integers(-20, 21, (frames, 1, 1, 3)), 0)
        write_video(folder / f"{name}.mp4", np.clip(base + motion + shift, 0, 255).astype(np.uint8), 8, crf=0)


def test_a_set_against_itself_scores_zero_and_a_changed_set_does_not(tmp_path, nets):
    _videos(tmp_path / "ref", 0)
    _videos(tmp_path / "same", 0)
    _videos(tmp_path / "other", 1, shift=60)
    same = score(tmp_path / "same", tmp_path / "ref", progress=False, backbones=nets)
    other = score(tmp_path / "other", tmp_path / "ref", progress=False, backbones=nets)
    for k in ("fid", "fid_vid", "fvd"):
        assert isinstance(same[k], float) and isinstance(other[k], float), (k, same[k])
        assert abs(same[k]) < 1e-3 * other[k], (k, same[k], other[k])
    assert same["protocol"]["fvd"].startswith("I3D-400 logits, 16-frame clips at stride 1")


def test_eval_app_loads_the_configured_weights(tmp_path, weight_files):
    _videos(tmp_path / "ref", 0)
    _videos(tmp_path / "gen", 1)
    cfg = config.load("eval", [f"generated={tmp_path / 'gen'}", f"reference={tmp_path / 'ref'}", f"output={tmp_path / 'out'}",
                               f"metrics.fid_vid_weights={weight_files['fid_vid']}", "progress=false", "side_by_side=false"])  # fmt: skip
    result = run(cfg)
    assert isinstance(result["fid_vid"], float) and result["fid_vid"] > 0
    assert result["fid"].startswith("not computed") and result["fvd"].startswith("not computed")
    assert "| fid_vid |" in (tmp_path / "out" / "report.md").read_text()


def test_dataset_mode_generates_resumes_and_scores(tmp_path, raw_data, tiny_model):
    args = ["dataset=tiktok", f"data_root={raw_data}", f"model={tiny_model}", f"output={tmp_path / 'out'}",
            "progress=false", "animate_overrides=['steps=2']"]  # fmt: skip
    # rank 1 of 2 gets no video (there is one test video) and does not score
    assert run(config.load("eval", [*args, "rank=1", "world_size=2"])) == {"generated": str(tmp_path / "out" / "generated"),
                                                                            "scored": False}  # fmt: skip
    assert not (tmp_path / "out" / "generated").exists()
    result = run(config.load("eval", args))
    name = "synth0003"
    gen = tmp_path / "out" / "generated" / name  # lossless PNG frames, scored as they are
    assert sorted(p.name for p in gen.iterdir()) == [f"{i:05d}.png" for i in range(20)]
    assert not list((tmp_path / "out" / "generated").rglob("*.mp4"))
    assert (tmp_path / "out" / "animate" / f"{name}.mp4").is_file()  # the mp4, for viewing only
    assert (tmp_path / "out" / "reference" / name / "images").is_dir()
    assert result["videos"] == 1 and result["frames"] == 20  # exactly the ground truth's frame count
    assert json.loads(gen.with_suffix(".json").read_text())["prompt_used"].startswith("The person")
    # the scores are those of the PNG frames against the ground truth, not of the H.264 copy
    truth = read_frames_dir(tmp_path / "out" / "reference" / name / "images")
    protocol = result["protocol"]["name"]
    l1 = np.mean(video_metrics(read_frames_dir(gen), truth, protocol)["l1"])
    assert result["l1"] == pytest.approx(l1, rel=1e-6)
    decoded, _ = read_video(tmp_path / "out" / "animate" / f"{name}.mp4")
    assert np.mean(video_metrics(decoded, truth, protocol)["l1"]) != pytest.approx(l1, rel=1e-6)
    stamp = (gen / "00000.png").stat().st_mtime_ns
    again = run(config.load("eval", args))  # resumable: the finished video is not generated again
    assert (gen / "00000.png").stat().st_mtime_ns == stamp and again["l1"] == pytest.approx(result["l1"])


def test_tiktok_layout_selects_the_test_videos(tmp_path):
    from PIL import Image

    from dynamictrl.eval.datasets import test_videos

    for i in (1, 335, 336, 337, 338, 339):
        (tmp_path / f"{i:05d}" / "images").mkdir(parents=True)
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / f"{i:05d}" / "images" / "0000.png")
    assert [v.name for v in test_videos("tiktok", tmp_path)] == ["00335", "00336", "00337", "00338", "00339"]
    assert [v.name for v in test_videos("tiktok", tmp_path, [1])] == ["00001"]
    with pytest.raises(UserError, match=r"TikTok test videos \[340\] not found"):
        test_videos("tiktok", tmp_path, [339, 340])
    with pytest.raises(UserError, match="no video files"):
        test_videos("unseen100", tmp_path)

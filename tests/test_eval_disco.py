"""FID-VID / FVD input under `disco` and `disco-gif` against independent computations of DisCo's definitions.

Written here from the definitions (Wangt-CN/DisCo, tool/metrics and tool/video), not from its code:
- frame-folder clips: a clip starts at every frame whose next 15 frames exist, so a video of T frames
  gives T-15 clips and one shorter than 16 frames none;
- resize: each channel a float32 image (PIL mode "F"), bicubic to 112 or 224, not rounded or clipped;
  a generated frame goes straight from its own size to the backbone's;
- FID-VID: minus the Kinetics pixel mean; FVD: x/127.5-1; a Fréchet distance over all clips;
- the June-2023 GIF script: for start in range(0, T - 16), 16 frames written with imageio.mimsave as a
  GIF, decoded again by ffmpeg (PyAV here) before the above.
"""

import json

import av
import imageio
import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from dynamictrl import config
from dynamictrl.eval import backbones as B
from dynamictrl.eval import distribution as D
from dynamictrl.eval import published
from dynamictrl.eval.run import run, score

CLIP = 16
KINETICS_MEAN = np.array([114.7748, 107.7354, 99.4750], np.float32)
SIZE = {"fid_vid": 112, "fvd": 224}
REF_SIZE, GEN_SIZE = (67, 45), (69, 47)  # (W, H): odd, and generated differs from its reference


# --- DisCo's definitions, computed independently -----------------------------------------------


def disco_resize(frame: np.ndarray, size: int) -> np.ndarray:
    """(H, W, 3) uint8 -> (size, size, 3) float32, one float image per channel."""
    out = []
    for c in range(3):
        channel = frame[:, :, c].astype(np.float32)
        img = Image.frombytes("F", (channel.shape[1], channel.shape[0]), channel.tobytes())
        out.append(np.asarray(img.resize((size, size), resample=Image.BICUBIC), np.float32))
    return np.stack(out, axis=2)


def read(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def folder_clips(folder) -> list[np.ndarray]:
    """DisCo's frame-folder dataset: each frame whose 15 successors (by the number in the name) exist."""
    clips = []
    for first in sorted(folder.glob("*.png")):
        paths = [folder / f"{int(first.stem) + i:04d}.png" for i in range(CLIP)]
        if all(p.exists() for p in paths):
            clips.append(np.stack([read(p) for p in paths]))
    return clips


def gif_clips(folder, scratch) -> list[np.ndarray]:
    """DisCo's June-2023 GIF script (the union of its runs): range(0, T - 16) starts, GIFs read back by ffmpeg."""
    frames = sorted(folder.glob("*.png"))
    clips = []
    for start in range(0, len(frames) - CLIP):
        path = scratch / f"{folder.name}_{start:04d}.gif"
        imageio.v2.mimsave(path, [imageio.v2.imread(p) for p in frames[start : start + CLIP]], duration=1000 / 3)
        with av.open(str(path)) as container:
            clip = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
        assert clip.shape[0] == CLIP
        clips.append(clip)
    return clips


def clip_input(clip: np.ndarray, metric: str) -> torch.Tensor:
    x = np.stack([disco_resize(f, SIZE[metric]) for f in clip])  # (16, S, S, 3), unrounded
    x = x - KINETICS_MEAN if metric == "fid_vid" else x / 127.5 - 1
    return torch.from_numpy(np.ascontiguousarray(x.transpose(3, 0, 1, 2), np.float32))  # (3, 16, S, S)


@torch.no_grad()
def disco_features(net: nn.Module, clips: list[np.ndarray], metric: str) -> np.ndarray:
    return np.stack([net(clip_input(c, metric)[None])[0].double().numpy() for c in clips])


def frechet(a: np.ndarray, b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + Tr(Sa) + Tr(Sb) - 2 Tr((Sa Sb)^1/2), with Tr((Sa Sb)^1/2) the sum of the singular
    values of Ca Cb^T / sqrt((na-1)(nb-1)) for the centred features Ca, Cb (exact for rank-deficient Sa, Sb)."""
    ca, cb = a - a.mean(0), b - b.mean(0)
    na, nb = len(a) - 1, len(b) - 1
    diff = a.mean(0) - b.mean(0)
    root = np.linalg.svd(ca @ cb.T, compute_uv=False).sum() / np.sqrt(na * nb)
    return float(diff @ diff + (ca**2).sum() / na + (cb**2).sum() / nb - 2 * root)


# --- data and networks ---------------------------------------------------------------------------


def frame_folders(root, lengths: dict[str, int], seed: int = 0):
    """Reference videos of REF_SIZE and generated ones of GEN_SIZE (a blurred, shifted, noisier copy) as
    frame folders NAME/0000.png ..."""
    rng = np.random.default_rng(seed)
    for name, frames in lengths.items():
        base = rng.integers(0, 256, (REF_SIZE[1], REF_SIZE[0], 3)).astype(float)
        for i in range(frames):
            ref = np.clip(np.roll(base, 2 * i, axis=1) + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
            gen = np.asarray(Image.fromarray(ref).resize(GEN_SIZE, Image.BILINEAR)).astype(float)
            gen = np.clip(gen + 25 + rng.normal(0, 30, gen.shape), 0, 255).astype(np.uint8)
            for kind, img in (("ref", ref), ("gen", gen)):
                (root / kind / name).mkdir(parents=True, exist_ok=True)
                Image.fromarray(img).save(root / kind / name / f"{i:04d}.png")


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """Random-init FID-VID and FVD backbones saved as the published weight files."""
    folder = tmp_path_factory.mktemp("weights")
    torch.manual_seed(1)
    state = {f"module.{k}": v for k, v in B.ResNet3D50().state_dict().items()}
    torch.save({"state_dict": state}, folder / "resnet-50-kinetics.pth")
    torch.save(B.InceptionI3D().state_dict(), folder / "i3d_pretrained_400.pt")
    return {"fid_vid": folder / "resnet-50-kinetics.pth", "fvd": folder / "i3d_pretrained_400.pt"}


def saved_net(metric: str, path) -> nn.Module:
    """The network with the saved tensors, loaded here without the eval's loaders."""
    state = torch.load(path, weights_only=True)
    net = B.ResNet3D50() if metric == "fid_vid" else B.InceptionI3D()
    net.load_state_dict({k.removeprefix("module."): v for k, v in state.get("state_dict", state).items()})
    return net.eval()


def eval_args(root, weights, protocol, metrics):
    return [f"generated={root / 'gen'}", f"reference={root / 'ref'}", f"output={root / 'out'}", f"protocol={protocol}",
            "progress=false", "side_by_side=false", *(f"metrics.{m}_weights={weights[m]}" for m in metrics)]  # fmt: skip


class Recorder(nn.Module):
    """A stand-in backbone that keeps its inputs and returns a few of their values as features."""

    def __init__(self):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1))  # where the eval finds the device
        self.inputs = []

    def forward(self, x):
        self.inputs.append(x.clone())
        return x.flatten(1)[:, :8] + self.anchor


# --- the three differences, one at a time -------------------------------------------------------


def test_disco_resize_is_per_channel_float_bicubic_unrounded():
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (2, REF_SIZE[1], REF_SIZE[0], 3), dtype=np.uint8)
    frames[:, :, :30] = 0  # a hard edge: bicubic overshoots on both sides
    frames[:, :, 30:] = 255
    for size in (112, 224):
        ours = D.resize_frames(frames, size, float_resize=True)
        expected = np.stack([disco_resize(f, size) for f in frames])
        assert ours.dtype == np.float32 and np.array_equal(ours, expected)
        assert ours.min() < -1 and ours.max() > 256  # kept, not clipped to 0-255
        assert not np.array_equal(D.resize_frames(frames, size), np.round(expected))  # the 8-bit path differs


@pytest.mark.parametrize("protocol", ["disco", "disco-gif"])
def test_a_10_frame_video_gives_no_disco_clip_and_one_padded_clean_clip(protocol):
    frames = np.random.default_rng(0).integers(0, 256, (10, 45, 67, 3), dtype=np.uint8)
    never = Recorder()
    never.forward = lambda x: pytest.fail("a backbone ran on a video without clips")
    for metric in SIZE:
        assert D.clip_features(never, frames, D.clip_protocol(metric, protocol)).shape[0] == 0
    rec = Recorder()
    assert D.clip_features(rec, frames, D.clip_protocol("fvd", "clean")).shape[0] == 1  # clean: its own rule
    assert torch.equal(rec.inputs[0][0, :, 9], rec.inputs[0][0, :, 15])  # padded with the last frame


def test_clip_count_is_disco_frame_folder_rule(tmp_path):
    for frames in (1, 10, 15, 16, 17, 18, 40):
        folder = tmp_path / f"v{frames}"
        folder.mkdir()
        for i in range(frames):  # the rule looks at names only
            Image.fromarray(np.full((2, 2, 3), i, np.uint8)).save(folder / f"{i:04d}.png")
        clips = folder_clips(folder)
        assert D.clip_starts(frames, D.clip_protocol("fvd", "disco").stride) == [int(c[0, 0, 0, 0]) for c in clips]
        assert len(D.clip_starts(frames, 1, drop_last=True)) == max(frames - CLIP, 0)  # disco-gif: range(0, T-16)


@pytest.mark.parametrize("protocol", ["disco", "clean"])
def test_generated_frames_reach_the_backbones_resized_once_under_disco(tmp_path, protocol):
    frame_folders(tmp_path, {"a": 17, "short": 10})
    nets = {"fid": Recorder(), "fid_vid": Recorder(), "fvd": Recorder()}
    result = score(tmp_path / "gen", tmp_path / "ref", progress=False, protocol=protocol, backbones=nets)
    gen = np.stack([read(p) for p in sorted((tmp_path / "gen" / "a").glob("*.png"))])
    if protocol == "disco":
        # FID: the generated frames as they are (pytorch-fid resizes them itself); clips: one resize each
        fid_in = torch.from_numpy(gen).permute(0, 3, 1, 2).float() / 255
        assert torch.equal(nets["fid"].inputs[0], fid_in)
        for metric in SIZE:
            first = nets[metric].inputs[0]  # video a, generated: clips 0 and 1
            assert first.shape[0] == 2 and torch.allclose(first[1], clip_input(gen[1:17], metric), rtol=0, atol=1e-5)
        counts = {"generated": 2, "reference": 2}  # the 10-frame video adds none
        assert result["feature_vectors"] == {"fid": {"generated": 27, "reference": 27}, "fid_vid": counts, "fvd": counts}
    else:  # clean keeps its rules: matched to the reference size first, one padded clip for the short video
        assert nets["fid"].inputs[0].shape[-2:] == (min(REF_SIZE), min(REF_SIZE))
        assert result["feature_vectors"]["fvd"] == {"generated": 2, "reference": 2}


def test_gif_quantisation_is_a_gif_written_by_imageio_and_read_by_ffmpeg(tmp_path):
    frame_folders(tmp_path, {"a": CLIP + 1})
    (clip,) = gif_clips(tmp_path / "gen" / "a", tmp_path)
    frames = np.stack([read(p) for p in sorted((tmp_path / "gen" / "a").glob("*.png"))])
    assert np.array_equal(D.gif_quantize(frames[:CLIP]), clip)
    assert not np.array_equal(frames[:CLIP], clip)  # a GIF does lose colours


# --- end to end: make eval against DisCo's computation ------------------------------------------


@pytest.mark.slow
def test_make_eval_disco_equals_disco_frame_folder_fvd_and_fid_vid(tmp_path, weights):
    """Odd sizes, generated frames of another size than their reference, a video shorter than 16 frames."""
    frame_folders(tmp_path, {"a": 17, "b": 16, "short": 10})
    result = run(config.load("eval", eval_args(tmp_path, weights, "disco", SIZE)))
    for metric in SIZE:
        net = saved_net(metric, weights[metric])
        feats = {k: np.concatenate([disco_features(net, folder_clips(tmp_path / k / n), metric)
                                    for n in ("a", "b", "short") if folder_clips(tmp_path / k / n)])
                 for k in ("gen", "ref")}  # fmt: skip
        assert len(feats["gen"]) == len(feats["ref"]) == 3  # 2 + 1 + 0
        expected = frechet(feats["gen"], feats["ref"])
        assert result[metric] == pytest.approx(expected, rel=1e-4), metric
    saved = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert saved["protocol"]["name"] == "disco" and saved["feature_vectors"]["fvd"] == {"generated": 3, "reference": 3}


@pytest.mark.slow
def test_disco_gif_equals_the_published_gif_pipeline_and_is_recorded(tmp_path, weights):
    frame_folders(tmp_path, {"a": 18, "b": 17, "short": 10}, seed=1)
    result = run(config.load("eval", eval_args(tmp_path, weights, "disco-gif", ["fid_vid"])))
    net = saved_net("fid_vid", weights["fid_vid"])
    feats = {}
    for k in ("gen", "ref"):
        clips = [c for n in ("a", "b", "short") for c in gif_clips(tmp_path / k / n, tmp_path)]
        assert len(clips) == 3  # 2 + 1 + 0: T-16 per video
        feats[k] = disco_features(net, clips, "fid_vid")
    assert result["fid_vid"] == pytest.approx(frechet(feats["gen"], feats["ref"]), rel=1e-4)
    saved = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert saved["protocol"]["name"] == "disco-gif" and "GIF" in saved["protocol"]["fid_vid"]
    assert saved["feature_vectors"]["fid_vid"] == {"generated": 3, "reference": 3}
    lines = (tmp_path / "out" / "report.md").read_text().splitlines()
    start = lines.index("| method | protocol | L1 (E-04) | SSIM | PSNR | PSNR* | LPIPS | FID-VID | FVD |") + 2
    table = lines[start : lines.index("", start)]
    marks = {r.split(" | ")[0][2:]: r.split(" | ")[1] for r in table}
    assert marks == {**dict.fromkeys(published.TABLE2, "disco-gif"), "this run": "disco-gif"}


def test_unknown_protocol_is_one_line(tmp_path):
    from dynamictrl.errors import UserError

    frame_folders(tmp_path, {"a": 2})
    with pytest.raises(UserError, match="protocol=gif: choose one of"):
        score(tmp_path / "gen", tmp_path / "ref", progress=False, protocol="gif")

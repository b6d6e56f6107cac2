"""Eval beyond the frame metrics: Fréchet distance, LPIPS, pose accuracy, clean protocol, report."""

import json

import numpy as np
import pytest
import scipy.linalg
import torch

from dynamictrl.eval.frechet import frechet_from_features
from dynamictrl.eval.metrics import frame_metrics
from dynamictrl.eval.pose_accuracy import pck
from dynamictrl.eval.run import score, write_report
from dynamictrl.utils.video import write_video


def scipy_frechet(a, b):
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


@pytest.mark.parametrize("seed", [0, 1])
def test_frechet_distance_matches_scipy_and_is_zero_for_a_set_against_itself(seed):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(400, 32))
    b = rng.normal(0.3, 1.2, size=(300, 32)) @ rng.normal(size=(32, 32)) * 0.3
    assert frechet_from_features(a, b) == pytest.approx(scipy_frechet(a, b), rel=1e-6)
    assert abs(frechet_from_features(a, a)) < 1e-8


def test_lpips_loads_a_local_backbone_and_matches_the_package(tmp_path):
    import lpips
    from torchvision.models import vgg16

    from dynamictrl.eval.lpips_metric import build, lpips_frames

    torch.manual_seed(0)
    state = vgg16().state_dict()  # random weights, saved as torchvision would ship them
    torch.save(state, tmp_path / "vgg16.pth")
    ours = build("vgg", tmp_path / "vgg16.pth")
    assert torch.equal(ours.net.slice1[0].weight, state["features.0.weight"])
    assert torch.equal(getattr(ours.net.slice5, "28").weight, state["features.28.weight"])
    ref = lpips.LPIPS(net="vgg", pnet_rand=True, verbose=False).eval()
    ref.net.load_state_dict(ours.net.state_dict())
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    b = np.clip(a.astype(int) + rng.integers(-40, 40, a.shape), 0, 255).astype(np.uint8)
    got = lpips_frames(ours, a, b, normalize=False)
    with torch.no_grad():
        ta, tb = (torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255 for x in (a, b))
        want = ref(ta, tb).flatten().tolist()
    assert got == pytest.approx(want, rel=1e-5)
    with pytest.raises(ValueError, match="no weights"):
        build("vgg")


def test_pck_is_one_for_own_poses_and_drops_with_perturbation():
    from dynamictrl.data.synthetic import make_video

    k = make_video(1, 8, 96, 64, 8.0)["kpts"]
    assert pck(k, k)["pck"] == 1.0 and pck(k, k)["mean_distance"] == 0.0
    rng = np.random.default_rng(0)
    small, large = k.copy(), k.copy()
    small[..., :2] += rng.normal(0, 0.05, k[..., :2].shape)
    large[..., :2] += rng.normal(0, 0.2, k[..., :2].shape)
    assert 1.0 > pck(small, k)["pck"] > pck(large, k)["pck"]
    missed = k.copy()
    missed[:, :9, 2] = 0  # the backend lost half the body
    visible = k[:, :18, 2] > 0.3  # the figure may step partly out of the frame
    assert pck(missed, k)["pck"] == pytest.approx(visible[:, 9:].sum() / visible.sum())


def test_clean_protocol_against_independent_computation():
    from skimage.metrics import structural_similarity

    rng = np.random.default_rng(3)
    real = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
    gen = np.clip(real + rng.normal(0, 20, real.shape), 0, 255).astype(np.uint8)
    m = frame_metrics(gen, real, "clean")
    diff = gen.astype(float) - real.astype(float)
    assert m["l1"] == pytest.approx(np.abs(diff).mean() / 255, rel=1e-6)
    assert m["psnr"] == pytest.approx(10 * np.log10(255**2 / (diff**2).mean()), rel=1e-6)
    ssim = np.mean([structural_similarity(gen[..., c], real[..., c], gaussian_weights=True, sigma=1.5,
                                          use_sample_covariance=False, data_range=255) for c in range(3)])  # fmt: skip
    assert m["ssim"] == pytest.approx(ssim, rel=1e-6)


def test_report_says_not_computed_for_exactly_the_backbone_metrics_and_renders(tmp_path):
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        real = rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
        write_video(tmp_path / "ref" / f"{name}.mp4", real, 8)
        write_video(tmp_path / "gen" / f"{name}.mp4", np.clip(real.astype(int) + 30, 0, 255).astype(np.uint8), 8)
    result = score(tmp_path / "gen", tmp_path / "ref", progress=False, side_by_side=tmp_path / "out" / "sbs")
    not_computed = {k for k, v in result.items() if isinstance(v, str) and v.startswith("not computed")}
    assert not_computed == {"lpips", "fid", "fid_vid", "fvd", "clip_consistency", "clip_alignment"}
    assert all(isinstance(result[k], float) for k in ("l1", "ssim", "psnr", "psnr_star"))
    write_report(result, tmp_path / "out")
    report = (tmp_path / "out" / "report.md").read_text()
    assert "DynamiCtrl (paper)" in report and "| this run | disco |" in report
    assert (tmp_path / "out" / "per_video.png").stat().st_size > 1000
    assert (tmp_path / "out" / "per_frame.png").stat().st_size > 1000
    assert (tmp_path / "out" / "sbs" / "a.mp4").is_file()
    saved = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert list(saved)[0] == "l1" and len(saved["per_video"]["a"]["per_frame"]["psnr_star"]) == 6


def tiny_clip(folder):
    """A random CLIP in the real transformers layout: model, BPE tokenizer, image processor."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    chars = "abcdefghijklmnopqrstuvwxyz"
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in chars:
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    tok = CLIPTokenizer(vocab=vocab, merges=[])
    proc = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                            crop_size={"height": 32, "width": 32}), tokenizer=tok)  # fmt: skip
    cfg = CLIPConfig(text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=2, max_position_embeddings=64, eos_token_id=1, bos_token_id=0),
                     vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=2, num_attention_heads=2), projection_dim=16)  # fmt: skip
    torch.manual_seed(0)
    CLIPModel(cfg).save_pretrained(folder)
    proc.save_pretrained(folder)
    return folder


def test_clip_metrics_through_a_saved_clip(tmp_path):
    from dynamictrl.eval.clip_metrics import ClipScorer, alignment, consistency

    scorer = ClipScorer(tiny_clip(tmp_path / "clip"))
    rng = np.random.default_rng(0)
    still = np.repeat(rng.integers(0, 256, (1, 48, 48, 3), dtype=np.uint8), 4, axis=0)
    noisy = rng.integers(0, 256, (4, 48, 48, 3), dtype=np.uint8)
    e_still, e_noisy = scorer.image_embeds(still), scorer.image_embeds(noisy)
    assert consistency(e_still) == pytest.approx(1.0, abs=1e-5)
    assert consistency(e_noisy) < consistency(e_still)
    t = scorer.text_embed("a dancer")
    assert alignment(e_still, t) == pytest.approx(float(e_still[0] @ t), abs=1e-6)
    assert abs(alignment(e_still, t) - alignment(e_still, scorer.text_embed("zzz"))) > 1e-6
    write_video(tmp_path / "gen" / "v.mp4", noisy, 8)
    write_video(tmp_path / "ref" / "v.mp4", still, 8)
    (tmp_path / "gen" / "v.json").write_text(json.dumps({"prompt_used": "a dancer"}))
    result = score(tmp_path / "gen", tmp_path / "ref", progress=False, clip_scorer=scorer)
    assert isinstance(result["clip_consistency"], float) and isinstance(result["clip_alignment"], float)


def test_pose_accuracy_of_a_real_video_against_its_own_poses_is_one(tmp_path):
    from skimage.data import astronaut

    from dynamictrl.pose.mediapipe_backend import MediaPipeHolistic

    img = astronaut()[::2, ::2]
    frames = np.stack([np.roll(img, 4 * i, axis=1) for i in range(5)])
    write_video(tmp_path / "gen" / "v.mp4", frames, 8)
    write_video(tmp_path / "ref" / "v.mp4", frames, 8)
    result = score(tmp_path / "gen", tmp_path / "ref", progress=False, pose_backend=MediaPipeHolistic())
    assert result["pose_pck"] == 1.0 and result["per_video"]["v"]["pose_pck"] == 1.0
    write_report(result, tmp_path / "out")
    rows = {r.split(" | ")[0]: r for r in (tmp_path / "out" / "report.md").read_text().splitlines()}
    assert rows["| pose_pck"].startswith("| pose_pck | 1 | body keypoints re-extracted")
    assert "| pose_mean_distance | 0 | mean distance" in rows["| pose_mean_distance"]

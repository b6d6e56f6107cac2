"""make eval ARGS="generated=DIR reference=DIR protocol=disco|disco-gif|clean output=DIR": score videos.

Both folders hold videos (or frame folders) with matching names. Frame metrics (L1, SSIM, PSNR, PSNR*)
always; LPIPS when its backbone weights are configured; pose accuracy (PCK against the poses of the
reference video, re-extracted from the generated one) when asked. Metrics whose backbones are not
available are reported as "not computed: ..." and never made up. Writes metrics.json (overall figures
at the top, then per video with per-frame values), metrics.csv, report.md beside the paper's Table 2,
plots, and a side-by-side video (generated | reference) per pair.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig
from tqdm.auto import tqdm

from dynamictrl.errors import UserError
from dynamictrl.eval import published
from dynamictrl.eval.distribution import one_resize
from dynamictrl.eval.metrics import FIGURE, PROTOCOLS, _match, figure_metrics, figure_region, video_metrics
from dynamictrl.utils.video import IMAGE_SUFFIXES, VIDEO_SUFFIXES, read_any, write_video

METRICS = ("l1", "ssim", "psnr", "psnr_star")
SCORED = ("l1", "ssim", "psnr", "psnr_star", "figure_psnr", "figure_ssim")  # the per-frame metrics, when computed
NOT_COMPUTED = {
    "fid": "not computed: no weights for pt_inception (metrics.fid_weights)",
    "fid_vid": "not computed: no weights for the 3D ResNet-50 Kinetics backbone (metrics.fid_vid_weights)",
    "fvd": "not computed: no weights for I3D-400 (metrics.fvd_weights)",
    "clip_consistency": "not computed: no CLIP weights configured (metrics.clip)",
    "clip_alignment": "not computed: no CLIP weights configured (metrics.clip)",
}
DISTRIBUTION = ("fid", "fid_vid", "fvd")
# Metrics whose definition does not depend on the protocol.
DEFINITIONS = FIGURE | {
    "pose_pck": "body keypoints re-extracted from the generated video within 0.1 x the driving person's box "
                "of the driving pose (visibility > 0.3; a missed keypoint is wrong)",
    "pose_mean_distance": "mean distance of the keypoints found in both, in units of the driving person's box",
    "clip_consistency": "mean cosine similarity of CLIP image embeddings of consecutive generated frames",
    "clip_alignment": "mean cosine similarity of each generated frame's CLIP embedding with the prompt's",
}

def entries(folder: Path) -> dict[str, Path]:
    """name -> path for each video file or frame folder in `folder`."""
    if not folder.is_dir():
        raise UserError(f"{folder}: no such folder")
    found = {}
    for p in sorted(folder.iterdir()):
        if p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES:
            found[p.stem] = p
        elif p.is_dir():
            images = p / "images" if (p / "images").is_dir() else p
            if any(q.suffix.lower() in IMAGE_SUFFIXES for q in images.iterdir()):
                found[p.name] = p
    if not found:
        raise UserError(f"{folder}: no videos or frame folders")
    return found


def pair(generated: Path, reference: Path) -> list[tuple[str, Path, Path]]:
    gen, ref = entries(generated), entries(reference)
    only_gen, only_ref = sorted(set(gen) - set(ref)), sorted(set(ref) - set(gen))
    if only_gen or only_ref:
        raise UserError(
            f"names differ between generated and reference: only in generated {only_gen[:5]}, "
            f"only in reference {only_ref[:5]}"
        )
    return [(name, gen[name], ref[name]) for name in sorted(gen)]


def reference_rule(first: int) -> str:
    """What the scores say about the reference frame (frame 0), for reports."""
    if first == 0:
        return "every frame scored, the reference frame 0 included (the published protocols' rule)"
    return f"frames {first}+ scored: the reference frame 0 is given to the model, not generated, and is not scored"


def score(generated: str | Path, reference: str | Path, progress: bool = True, protocol: str = "disco",
          lpips_model=None, pose_backend=None, side_by_side: Path | None = None,
          clip_scorer=None, backbones: dict | None = None, first: int = 0,
          masks: dict[str, np.ndarray] | None = None) -> dict[str, Any]:  # fmt: skip
    """Per-video and overall (mean over all frames) metrics; FID, FID-VID and FVD over the whole set
    for each backbone in `backbones` ({"fid"|"fid_vid"|"fvd": network}, see `dynamictrl.eval.backbones`).
    Frames before `first` are not scored (`first=1`: the reference frame is left out; the published
    protocols score every frame). `masks` (name -> the ground truth's (T, H, W) person masks, every
    video) adds the figure-region scores `figure_psnr` and `figure_ssim` (`metrics.figure_metrics`)."""
    if protocol not in PROTOCOLS:
        raise UserError(f"protocol={protocol}: choose one of {sorted(PROTOCOLS)}")
    names = list(METRICS) + (["lpips"] if lpips_model is not None else []) + (list(FIGURE) if masks is not None else [])
    per_video, all_frames = {}, {k: [] for k in names}
    pose_hits = {"pck": [], "mean_distance": [], "keypoints": 0}
    backbones = backbones or {}
    feats: dict[str, tuple[list, list]] = {k: ([], []) for k in backbones}
    for name, g, r in tqdm(pair(Path(generated), Path(reference)), desc="eval", disable=not progress):
        gen, _ = read_any(g)
        ref, fps = read_any(r)
        if len(gen) != len(ref):
            raise UserError(f"{name}: {len(gen)} generated frames but {len(ref)} reference frames")
        if len(ref) <= first:
            raise UserError(f"{name}: {len(ref)} frames, none left to score after the first {first}")
        region = None
        if masks is not None:
            if name not in masks:
                raise UserError(f"{name}: no person masks given for its figure-region scores")
            region = figure_region(masks[name])
        gen, ref = gen[first:], ref[first:]
        m = video_metrics(gen, ref, protocol)
        if region is not None:
            m |= figure_metrics(gen, ref, region)
        matched = np.stack([_match(a, b) for a, b in zip(gen, ref, strict=True)])  # generated at the real size
        if lpips_model is not None:
            from dynamictrl.eval.lpips_metric import lpips_frames

            m["lpips"] = lpips_frames(lpips_model, matched, ref, normalize=protocol == "clean")
        per_video[name] = {k: _mean(v) for k, v in m.items()} | {"frames": len(gen), "per_frame": m}
        if pose_backend is not None:
            from dynamictrl.animate.run import extract_poses
            from dynamictrl.eval.pose_accuracy import pck

            target = extract_poses(ref, pose_backend, desc=f"poses {name} (reference)", progress=False)
            found = extract_poses(matched, pose_backend, desc=f"poses {name} (generated)", progress=False)
            acc = pck(found, target)
            per_video[name] |= {"pose_pck": acc["pck"], "pose_mean_distance": acc["mean_distance"]}
            pose_hits["pck"].append(acc["pck"] * acc["keypoints"])
            pose_hits["mean_distance"].append(acc["mean_distance"])
            pose_hits["keypoints"] += acc["keypoints"]
        if clip_scorer is not None:
            from dynamictrl.eval import clip_metrics

            emb = clip_scorer.image_embeds(gen)
            per_video[name]["clip_consistency"] = clip_metrics.consistency(emb)
            prompt = clip_metrics.prompt_for(g)
            if prompt:
                per_video[name]["clip_alignment"] = clip_metrics.alignment(emb, clip_scorer.text_embed(prompt))
        for k, net in backbones.items():
            feats[k][0].append(_features(k, net, gen if one_resize(protocol) else matched, protocol))
            feats[k][1].append(_features(k, net, ref, protocol))
        for k in names:
            all_frames[k] += m[k]
        if side_by_side is not None:
            from dynamictrl.animate.run import side_by_side as stack

            write_video(side_by_side / f"{name}.mp4", stack(matched, ref), fps or 8)
    overall: dict[str, Any] = {k: _mean(v) for k, v in all_frames.items()}
    if lpips_model is None:
        overall["lpips"] = "not computed: no weights for the LPIPS VGG backbone (metrics.lpips_backbone_weights)"
    if pose_backend is not None:
        overall["pose_pck"] = sum(pose_hits["pck"]) / max(pose_hits["keypoints"], 1)
        found = [d for d in pose_hits["mean_distance"] if not np.isnan(d)]  # NaN: no keypoint found in a video
        overall["pose_mean_distance"] = float(np.mean(found)) if found else float("nan")
    overall |= {k: v for k, v in NOT_COMPUTED.items() if k not in backbones}
    counts = {}
    for k, (gen_feats, ref_feats) in feats.items():
        gen_feats, ref_feats = _stack(gen_feats), _stack(ref_feats)
        overall[k] = _frechet(gen_feats, ref_feats)
        counts[k] = {"generated": len(gen_feats), "reference": len(ref_feats)}
    if clip_scorer is not None:
        for k in ("clip_consistency", "clip_alignment"):
            vals = [v[k] for v in per_video.values() if k in v]
            overall[k] = float(np.mean(vals)) if vals else "not computed: no prompts (NAME.json or NAME.txt) beside the videos"
    return {**overall, "protocol": PROTOCOLS[protocol], "feature_vectors": counts, "videos": len(per_video),
            "frames": len(all_frames["l1"]), "first_frame": first, "reference_frame": reference_rule(first),
            "per_video": per_video}  # fmt: skip


def _mean(values: list[float]) -> float:
    """The mean of the values that are not NaN (a figure score is NaN for a clip without a person); NaN if none."""
    v = np.asarray(values, dtype=float)
    v = v[~np.isnan(v)]
    return float(v.mean()) if len(v) else float("nan")


def _features(metric: str, net, frames: np.ndarray, protocol: str) -> np.ndarray:
    from dynamictrl.eval import distribution as D

    if metric == "fid":
        return D.frame_features(net, frames, crop=protocol == "clean")
    return D.clip_features(net, frames, D.clip_protocol(metric, protocol))


def _stack(parts: list[np.ndarray]) -> np.ndarray:
    """The feature vectors of all videos; videos without a clip give none."""
    parts = [p for p in parts if len(p)]
    return np.concatenate(parts) if parts else np.zeros((0, 0))


def _frechet(gen: np.ndarray, ref: np.ndarray) -> float | str:
    from dynamictrl.eval.frechet import frechet_from_features

    if min(len(gen), len(ref)) < 2:
        return f"not computed: {min(len(gen), len(ref))} feature vector(s), a Fréchet distance needs at least 2"
    return frechet_from_features(gen, ref)


def _fmt(v: Any) -> str:
    text = f"{v:.4g}" if isinstance(v, float) else ("—" if v is None else str(v))
    return text.replace("|", "\\|")  # a literal | would split a markdown table cell


def write_plots(result: dict[str, Any], out: Path) -> list[str]:
    """per_video.png (a bar per video for each metric) and per_frame.png (curves per video)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["per_video"])
    metrics = [k for k in (*SCORED, "lpips", "pose_pck", "clip_consistency", "clip_alignment")
               if isinstance(result.get(k), float)]  # fmt: skip
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics), 3.2), squeeze=False)
    for ax, k in zip(axes[0], metrics, strict=True):
        ax.bar(range(len(names)), [result["per_video"][n].get(k, np.nan) for n in names], color="tab:blue")
        ax.axhline(result[k], color="tab:red", lw=1, label="overall")
        ax.set_title(k)
        ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=6)
    fig.tight_layout()
    fig.savefig(out / "per_video.png", dpi=110)
    plt.close(fig)
    curves = [k for k in (*SCORED, "lpips") if isinstance(result.get(k), float)]
    fig, axes = plt.subplots(1, len(curves), figsize=(3.2 * len(curves), 3.0), squeeze=False)
    for ax, k in zip(axes[0], curves, strict=True):
        for n in names:
            ax.plot(result["per_video"][n]["per_frame"][k], lw=0.8, label=n)
        ax.set_title(f"{k} per frame")
        ax.set_xlabel("frame")
    if len(names) <= 12:
        axes[0][-1].legend(fontsize=5)
    fig.tight_layout()
    fig.savefig(out / "per_frame.png", dpi=110)
    plt.close(fig)
    return ["per_video.png", "per_frame.png"]


def write_report(result: dict[str, Any], out: Path, title: str = "Evaluation", dataset: str = "tiktok") -> None:
    """metrics.json, metrics.csv, report.md and the plots in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(result, indent=1))
    cols = [k for k in (*SCORED, "lpips", "pose_pck", "pose_mean_distance", "clip_consistency", "clip_alignment")
            if isinstance(result.get(k), float)]  # fmt: skip
    with open(out / "metrics.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["video", *cols, "frames"])
        for name, m in result["per_video"].items():
            w.writerow([name, *(f"{m.get(k, float('nan')):.6g}" for k in cols), m["frames"]])
    proto = result["protocol"]
    rule = result.get("reference_frame", reference_rule(0))
    lines = [f"# {title}", "", f"{result['videos']} videos, {result['frames']} frames, protocol `{proto['name']}`; {rule}.",
             "", "| metric | value | definition |", "|---|---|---|"]  # fmt: skip
    for k in (*SCORED, "lpips", "pose_pck", "pose_mean_distance", "fid", "fid_vid", "fvd", "clip_consistency",
              "clip_alignment"):  # fmt: skip
        if k in result:
            lines.append(f"| {k} | {_fmt(result[k])} | {_fmt(proto.get(k) or DEFINITIONS.get(k, 'see dynamictrl.eval'))} |")
    lines += ["", "Pairing: " + proto["pairing"] + "."]
    if result.get("pose_swap"):
        lines += ["", "Pose-swap gain (each video generated again driven by another test video, same reference, "
                  "prompt and seed; score with its own poses minus with the swapped ones, per video): mean and 95% "
                  "bootstrap interval over videos.", "", "| metric | gain | 95% interval | videos |", "|---|---|---|---|"]
        for k, g in result["pose_swap"].items():
            ci = "—" if g["ci95"] is None else f"[{g['ci95'][0]:.4g}, {g['ci95'][1]:.4g}]"
            lines.append(f"| {k} | {_fmt(g['gain'])} | {ci} | {g['clips']} |")
    if result.get("feature_vectors"):
        lines += ["", "Feature vectors (generated / reference): " + ", ".join(
            f"{k} {n['generated']} / {n['reference']}" for k, n in result["feature_vectors"].items()) + "."]  # fmt: skip
    lines += ["", f"Comparable with: {proto.get('comparable_with', 'see dynamictrl.eval.metrics')}.", "",
              f"## Beside the paper's Table 2 ({dataset})", "",
              "L1 in E-04 units as published. Only figures computed under the same protocol are comparable: "
              f"the published rows are `{published.PROTOCOL}` ({published.PROTOCOL_NOTE}).", "",
              "| method | protocol | L1 (E-04) | SSIM | PSNR | PSNR* | LPIPS | FID-VID | FVD |",
              "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    ours = {k: result.get(k) for k in published.METRICS}
    ours["l1"] = ours["l1"] * 1e4 if proto["name"] != "clean" and isinstance(ours["l1"], float) else ours["l1"]
    for method, row in [*published.rows(dataset), ("this run", ours)]:
        tag = published.PROTOCOL if method != "this run" else proto["name"]
        vals = [(_fmt(row[k]) if isinstance(row[k], float) or row[k] is None else "n/c") for k in published.METRICS]
        lines.append(f"| {method} | {tag} | " + " | ".join(vals) + " |")
    plots = write_plots(result, out) if result["per_video"] else []
    lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    if (out / "side_by_side").is_dir():
        lines += ["", "Side by side (generated | reference), one video per pair: `side_by_side/NAME.mp4`."]
    lines += ["", "## Per video", "", "| video | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, m in result["per_video"].items():
        lines.append(f"| {name} | " + " | ".join(_fmt(m.get(k)) for k in cols) + " |")
    (out / "report.md").write_text("\n".join(lines) + "\n")


def metric_device(metrics: DictConfig) -> str:
    """`metrics.device`, else this rank's GPU when there is one: every network metric runs batched there."""
    from dynamictrl.utils.device import local_device

    return local_device(metrics.get("device") or "auto")


def load_backbones(metrics: DictConfig) -> dict[str, Any]:
    """The FID / FID-VID / FVD networks whose weight files are configured, on the GPU when there is one."""

    from dynamictrl.eval import backbones as B

    builders = {"fid": (B.build_inception, "fid_weights"), "fid_vid": (B.build_resnet3d, "fid_vid_weights"),
                "fvd": (B.build_i3d, "fvd_weights")}  # fmt: skip
    device = metric_device(metrics)
    return {k: build(metrics[key]).to(device) for k, (build, key) in builders.items() if metrics.get(key)}


def generate_dataset(cfg: DictConfig) -> tuple[Path, Path, bool]:
    """Dataset mode: animate this rank's test videos; returns (generated, reference, score now?)."""
    from dynamictrl.eval import datasets

    if not cfg.get("data_root"):
        raise UserError(f'data_root is not set: make eval ARGS="dataset={cfg.dataset} data_root=DIR output=DIR"')
    out = Path(cfg.output)
    videos = datasets.test_videos(cfg.dataset, cfg.data_root, list(cfg.videos) if cfg.get("videos") else None)
    for v in videos:
        datasets.link_reference(v, out / "reference")
    for swap in (False, True) if cfg.get("pose_swap") else (False,):
        stats = datasets.generate(cfg, videos, out, swap=swap)
        print(f"eval: {stats['generated']} generated, {stats['done_before']} done before, "
              f"{stats['this_rank']} of {stats['videos']} test videos on this rank -> "
              f"{out / ('generated_swapped' if swap else 'generated')}")  # fmt: skip
    _, world = datasets.rank_and_world(cfg)
    ready = cfg.get("score") if cfg.get("score") is not None else world == 1
    return out / "generated", out / "reference", bool(ready)


def swap_gains(own: dict[str, Any], swapped: Path, reference: Path, cfg: DictConfig) -> dict[str, Any]:
    """Dataset mode, `pose_swap=true`: the swapped generations scored like the own ones (frame metrics
    only) and the per-video gains (`eval/pose_swap.py`); no person masks here, so no figure region."""
    from dynamictrl.eval import pose_swap

    result = score(swapped, reference, cfg.get("progress", True), own["protocol"]["name"], first=own["first_frame"])
    gains = pose_swap.gains(own["per_video"], result["per_video"])
    print(f"eval: pose-swap gain (own poses - another test video's): {pose_swap.describe(gains)}")
    return gains


def run(cfg: DictConfig) -> dict[str, Any]:
    if not cfg.get("output"):
        raise UserError('output is not set: make eval ARGS="generated=DIR reference=DIR output=DIR"')
    generated, reference = cfg.get("generated"), cfg.get("reference")
    if cfg.get("dataset"):
        generated, reference, ready = generate_dataset(cfg)
        if not ready:
            print("eval: generation split across ranks; score once all ranks are done: the same command "
                  "without rank/world_size (finished videos are skipped)")  # fmt: skip
            return {"generated": str(generated), "scored": False}
    for key, value in (("generated", generated), ("reference", reference)):
        if not value:
            raise UserError(f'{key} is not set: make eval ARGS="generated=DIR reference=DIR output=DIR" '
                            f'or ARGS="dataset=tiktok|unseen100 data_root=DIR output=DIR"')  # fmt: skip
    lpips_model = None
    if cfg.metrics.get("lpips_backbone_weights"):
        from dynamictrl.eval.lpips_metric import build

        path = Path(cfg.metrics.lpips_backbone_weights)
        if not path.is_file():
            raise UserError(f"metrics.lpips_backbone_weights={path}: no such file")
        lpips_model = build(cfg.metrics.get("lpips_net", "vgg"), path).to(metric_device(cfg.metrics))
    scorer = None
    if cfg.metrics.get("clip"):
        from dynamictrl.eval.clip_metrics import ClipScorer

        if not (Path(cfg.metrics.clip) / "config.json").is_file():
            raise UserError(f"metrics.clip={cfg.metrics.clip}: not a CLIP model folder (no config.json)")
        scorer = ClipScorer(cfg.metrics.clip, device=metric_device(cfg.metrics))
    backend = None
    if cfg.metrics.get("pose_accuracy"):
        from hydra.utils import instantiate

        backend = instantiate(cfg.pose_backend)
    out = Path(cfg.output)
    result = score(generated, reference, cfg.get("progress", True), cfg.get("protocol") or cfg.metrics.protocol, lpips_model,
                   backend, out / "side_by_side" if cfg.get("side_by_side", True) else None, scorer,
                   load_backbones(cfg.metrics))  # fmt: skip
    if cfg.get("dataset") and cfg.get("pose_swap"):
        result["pose_swap"] = swap_gains(result, out / "generated_swapped", reference, cfg)
    write_report(result, out, dataset=cfg.get("dataset_name") or cfg.get("dataset") or "tiktok")
    print(f"eval: L1 {result['l1']:.3e}  SSIM {result['ssim']:.3f}  PSNR {result['psnr']:.2f}  "
          f"PSNR* {result['psnr_star']:.2f} (protocol {result['protocol']['name']}) -> {out}/report.md")
    return result

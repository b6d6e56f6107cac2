"""`make ablation`: the paper's Tables 3 and 4 in miniature, on the demo's synthetic data.

Every variant (pose through PadaLN, UVT or cross-attention; PadaLN with the text dropped in training
and inference) trains the embedded tiny model from the same checkpoint, on the same shards, for the
same steps, once per seed; each trained model animates the same held-out clips, which are scored with
the demo's metrics (L1, SSIM, PSNR*, pose PCK by MediaPipe). The report gives the mean and the spread
over seeds, the measured step time and the pose branch's parameter overhead (tiny model and 5B),
beside the paper's rows, and a plot. Whichever way the orderings fall is what the report says.
"""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from dynamictrl import config
from dynamictrl.demo import FIRST, generate_all, held_out, masks_of, prepare, swap_gains
from dynamictrl.eval import pose_swap
from dynamictrl.eval.run import reference_rule, score
from dynamictrl.utils.video import write_frames

METRICS = ("l1", "ssim", "psnr_star", "figure_psnr", "figure_ssim", "pose_pck")
GAINS = tuple(f"swap_{k}" for k in pose_swap.KEYS)  # the pose-swap gains, per run
# Table 3 (pose control structures) and Table 4 (text in training), TikTok, from the paper.
PAPER = {
    "uvt": {"table": 3, "ssim": 0.613, "psnr_star": 17.25, "lpips": 0.267, "fvd": 508.25},
    "cross_attn": {"table": 3, "ssim": 0.586, "psnr_star": 16.20, "lpips": 0.279, "fvd": 518.90},
    "padaln": {"table": "3, 4", "ssim": 0.766, "psnr_star": 20.41, "lpips": 0.166, "fvd": 152.31},
    "padaln_no_text": {"table": 4, "ssim": 0.723, "psnr_star": 18.93, "lpips": 0.198, "fvd": 221.10},
}


def step_seconds(metrics_csv: Path, skip: int = 20) -> float:
    """Median `perf/step_s` of a training run, leaving out the first `skip` steps (warm-up)."""
    with open(metrics_csv) as f:
        rows = [r for r in csv.DictReader(f) if r.get("perf/step_s")]
    values = [float(r["perf/step_s"]) for r in rows if int(r["step"]) >= skip] or [float(r["perf/step_s"]) for r in rows]
    return float(np.median(values)) if values else float("nan")


def overheads(trained: Path, control: str) -> dict[str, float]:
    """The pose branch's parameters over the base transformer's: this tiny model and CogVideoX1.5-5B."""
    from dynamictrl.models.inspect import model_configs, part_counts, table
    from dynamictrl.models.transformer import DynamiCtrlTransformer3DModel

    tiny = part_counts(DynamiCtrlTransformer3DModel.from_pretrained(trained))
    big = {r["control"]: r["overhead"] for r in table("5b", model_configs()["cogvideox1.5-5b-i2v"])}
    return {"params": float(sum(tiny.values())), "overhead": (sum(tiny.values()) - tiny["base"]) / tiny["base"],
            "overhead_5b": big[control]}  # fmt: skip


def run_variant(name: str, variant: DictConfig, seed: int, cfg: DictConfig, samples: list[dict], reference: Path,
                poses, base_overrides: list[str]) -> dict[str, Any]:  # fmt: skip
    """Train one variant with one seed, animate the held-out clips, score them."""
    from dynamictrl.train.run import run as train

    out = Path(cfg.output) / "runs" / f"{name}-seed{seed}"
    overrides = [*base_overrides, f"output={out / 'train'}", f"model.control={variant.control}", f"seed={seed}",
                 "samples.every_n_steps=0",
                 "logger=csv", *([] if variant.text else ["module.text_drop=1.0"]), *cfg.train_overrides]  # fmt: skip
    if not (out / "scores.json").is_file():  # finished runs are kept: a re-run only does what is missing
        trained = train(config.load("train", overrides))
        prompt = None if variant.text else ""
        generate_all(out / "train", samples, out / "generated", cfg.animate, name, prompt=prompt)
        scores = score(out / "generated", reference, pose_backend=poses, progress=False, first=FIRST,
                       masks=masks_of(samples))  # fmt: skip
        result = {k: scores[k] for k in (*METRICS, "pose_mean_distance")}
        swap = swap_gains(out / "train", samples, out / "swapped", reference, cfg.animate, name, scores, prompt)
        result |= {f"swap_{k}": g["gain"] for k, g in swap.items()} | {"pose_swap": swap}
        result |= {"steps": trained["steps"], "step_s": step_seconds(Path(trained["metrics_csv"]))}
        result |= overheads(out / "train" / "transformer", variant.control)
        (out / "scores.json").write_text(json.dumps(result, indent=1))
    return json.loads((out / "scores.json").read_text())


def summarise(runs: dict[str, list[dict]]) -> dict[str, dict[str, Any]]:
    """Mean, standard deviation and range over seeds of every figure, per variant."""
    out = {}
    for name, results in runs.items():
        row: dict[str, Any] = {"seeds": len(results)}
        for k in (*METRICS, *GAINS, "step_s"):
            v = np.array([r[k] for r in results], dtype=float)
            row[k] = {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
                      "min": float(v.min()), "max": float(v.max()), "values": v.tolist()}  # fmt: skip
        row |= {k: results[0][k] for k in ("steps", "params", "overhead", "overhead_5b")}
        out[name] = row
    return out


def separated(summary: dict, a: str, b: str, metric: str) -> bool:
    """Whether two variants' seed ranges do not overlap on a metric (a difference larger than the noise)."""
    ra, rb = summary[a][metric], summary[b][metric]
    return ra["min"] > rb["max"] or rb["min"] > ra["max"]


def write_report(summary: dict, cfg: DictConfig, out: Path, seconds: float) -> None:
    names = list(summary)
    ref = summary["padaln"]["step_s"]["mean"]

    def cell(row: dict, k: str, fmt: str) -> str:
        return f"{row[k]['mean']:{fmt}} ± {row[k]['std']:{fmt}}"

    lines = [
        "# Ablation: pose control structures and text, in miniature",
        "",
        f"The embedded tiny model trained from one checkpoint on the demo's synthetic clips "
        f"({cfg.data.num_train} training videos), {summary[names[0]]['seeds']} seeds per variant "
        f"({', '.join(map(str, cfg.seeds))}), the same {summary[names[0]]['steps']} steps and recipe for all; each trained model animated "
        f"{cfg.eval_clips} held-out clips ({cfg.animate.steps} steps, CFG {cfg.animate.guidance_scale}; the no-text "
        f"variant with an empty prompt), {reference_rule(FIRST)}. Figures are mean ± standard deviation over seeds "
        f"(protocol `disco`; figure PSNR/SSIM: inside the union over the clip of the ground truth's person masks; "
        f"pose PCK: MediaPipe on generated vs ground-truth frames). Pose-swap gain: each clip generated again "
        f"driven by another clip's poses (same reference, prompt, seed), score with its own poses minus score "
        f"with the swapped ones, mean over clips (per run: 95% bootstrap intervals over clips in `ablation.json`); "
        f"a model that ignores the pose gains 0. Step time: median training step of each run, "
        f"relative to PadaLN's, all measured in this one `make ablation` run. Wall time: {seconds / 60:.1f} min.",
        "",
        "| variant | L1 | SSIM | PSNR* | figure PSNR | figure SSIM | pose PCK | swap gain PSNR* | swap gain figure PSNR "
        "| swap gain SSIM | step time | pose branch params (tiny) | (5B) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for n in names:
        r = summary[n]
        lines.append(f"| {n} | {cell(r, 'l1', '.2e')} | {cell(r, 'ssim', '.3f')} | {cell(r, 'psnr_star', '.2f')} | "
                     f"{cell(r, 'figure_psnr', '.2f')} | {cell(r, 'figure_ssim', '.3f')} | "
                     f"{cell(r, 'pose_pck', '.3f')} | {cell(r, 'swap_psnr_star', '.2f')} | {cell(r, 'swap_figure_psnr', '.2f')} | "
                     f"{cell(r, 'swap_ssim', '.3f')} | {r['step_s']['mean'] / ref:.2f}x | {100 * r['overhead']:.1f}% | "
                     f"{100 * r['overhead_5b']:.1f}% |")  # fmt: skip
    lines += ["", "The paper (TikTok, Tables 3 and 4; LPIPS and FVD need backbone weights we do not have here):", "",
              "| variant | table | SSIM | PSNR* | LPIPS | FVD |", "|---|---|---|---|---|---|"]  # fmt: skip
    for n in names:
        p = PAPER[n]
        lines.append(f"| {n} | {p['table']} | {p['ssim']:.3f} | {p['psnr_star']:.2f} | {p['lpips']:.3f} | {p['fvd']:.2f} |")
    lines += ["", "## Orderings", ""]
    for metric, label, higher in (("psnr_star", "PSNR*", True), ("ssim", "SSIM", True), ("figure_psnr", "figure PSNR", True),
                                  ("swap_figure_psnr", "pose-swap gain on figure PSNR", True), ("pose_pck", "pose PCK", True)):
        if len({summary[n][metric]["mean"] for n in names}) == 1:
            lines.append(f"- {label}: all variants equal ({summary[names[0]][metric]['mean']:.3f}); no ordering.")
            continue
        order = sorted(names, key=lambda n: summary[n][metric]["mean"], reverse=higher)
        paper = sorted(names, key=lambda n: PAPER[n].get(metric, float("nan")), reverse=higher) if metric in PAPER["uvt"] else None
        gaps = [f"{a} vs {b}: {'apart' if separated(summary, a, b, metric) else 'within the seed spread'}"
                for a, b in zip(order, order[1:], strict=False)]  # fmt: skip
        lines.append(f"- {label}: here {' > '.join(order)}" + (f"; paper {' > '.join(paper)}" if paper else "")
                     + f". Neighbours: {'; '.join(gaps)}.")  # fmt: skip
    lines += ["", "Per seed values are in `ablation.json`; `ablation.png` plots them.", "", "![ablation](ablation.png)", ""]
    (out / "report.md").write_text("\n".join(lines))


def plot(summary: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary)
    panels = (("psnr_star", "PSNR* (dB)"), ("figure_psnr", "figure PSNR (dB)"), ("swap_figure_psnr", "pose-swap gain, figure PSNR (dB)"),
              ("ssim", "SSIM"), ("pose_pck", "pose PCK"), ("step_s", "step time (s)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.6))
    for ax, (k, title) in zip(axes, panels, strict=True):
        means = [summary[n][k]["mean"] for n in names]
        ax.bar(range(len(names)), means, color="#9db4d3")
        for i, n in enumerate(names):
            ax.scatter([i] * len(summary[n][k]["values"]), summary[n][k]["values"], color="k", s=12, zorder=3)
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
        ax.set_title(title)
    fig.suptitle("Ablation in miniature: bars = mean over seeds, dots = seeds")
    fig.tight_layout()
    fig.savefig(out / "ablation.png", dpi=120)
    plt.close(fig)


def run(cfg: DictConfig) -> dict[str, Any]:
    start = time.perf_counter()
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    shards, _, base_overrides = prepare(cfg)
    samples = held_out(shards, cfg.eval_clips)
    reference = out / "reference"
    for s in samples:  # lossless, as the demo's
        write_frames(reference / s["key"], s["frames"])
    from dynamictrl.pose.mediapipe_backend import MediaPipeHolistic

    poses = MediaPipeHolistic()
    runs: dict[str, list[dict]] = {name: [] for name in cfg.variants}
    for seed in cfg.seeds:  # seed-major: an interrupted run still has every variant at the first seed
        for name, variant in cfg.variants.items():
            print(f"ablation: {name}, seed {seed}")
            runs[name].append(run_variant(name, variant, seed, cfg, samples, reference, poses, base_overrides))
    summary = summarise(runs)
    seconds = time.perf_counter() - start
    (out / "ablation.json").write_text(json.dumps({"summary": summary, "paper": PAPER, "seconds": seconds,
                                                   "config": OmegaConf.to_container(cfg)}, indent=1))  # fmt: skip
    plot(summary, out)
    write_report(summary, cfg, out, seconds)
    print((out / "report.md").read_text())
    return {"summary": summary, "seconds": seconds, "report": str(out / "report.md")}

"""python -m dynamictrl.models.inspect NAME_OR_PATH: parameter counts per part, and a loading report.

NAME is a config in conf/model/ with a `transformer:` section (or `all`); the model is built on the
meta device, so the 5B table costs no memory. PATH is a transformer folder (or a pipeline folder
with transformer/); it is loaded and its missing and unexpected keys are printed.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf

from dynamictrl.models.transformer import CONTROL_MODES, DynamiCtrlTransformer3DModel


def part_counts(model: DynamiCtrlTransformer3DModel) -> dict[str, int]:
    """Parameters of the base CogVideoX transformer and of each pose branch."""
    counts = {"base": 0, "padaln": 0, "cross_attn": 0, "uvt": 0}
    for name, p in model.named_parameters():
        if ".control_norm1." in name:
            counts["padaln"] += p.numel()
        elif ".attn2." in name or ".norm_cross." in name:
            counts["cross_attn"] += p.numel()
        elif name == "patch_embed.proj.weight" and model.config.control == "uvt":
            base = p.shape[0] * model._base_proj_width() if p.dim() == 2 else p[:, : model.config.in_channels].numel()
            counts["base"] += base
            counts["uvt"] += p.numel() - base
        else:
            counts["base"] += p.numel()
    return counts


def table(name: str, arch: dict) -> list[dict]:
    rows = []
    for control in CONTROL_MODES:
        with torch.device("meta"):
            model = DynamiCtrlTransformer3DModel(**arch, control=control)
        c = part_counts(model)
        extra = sum(v for k, v in c.items() if k != "base")
        rows.append({"model": name, "control": control, **c, "overhead": extra / c["base"]})
    return rows


def format_rows(rows: list[dict]) -> str:
    lines = ["| base model | control | base | PadaLN | cross-attention | UVT | overhead |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['control']} | {r['base'] / 1e9:.3f} B | {r['padaln'] / 1e6:.1f} M | "
                     f"{r['cross_attn'] / 1e6:.1f} M | {r['uvt'] / 1e6:.3f} M | {100 * r['overhead']:.2f}% |")  # fmt: skip
    return "\n".join(lines)


def model_configs() -> dict[str, dict]:
    from dynamictrl.config import conf_dir

    out = {}
    for f in sorted((conf_dir() / "model").glob("*.yaml")):
        cfg = OmegaConf.load(f)
        if "transformer" in cfg:
            out[f.stem] = OmegaConf.to_container(cfg.transformer)
    return out


def loading_report(path: Path) -> str:
    folder = path / "transformer" if (path / "transformer" / "config.json").is_file() else path
    model = DynamiCtrlTransformer3DModel.from_pretrained(folder)
    rep = model.loading_report
    c = part_counts(model)
    lines = [f"{folder}: control={model.config.control}, pose_init={model.config.pose_init}",
             f"parameters: base {c['base'] / 1e6:.2f} M, pose branch {(sum(c.values()) - c['base']) / 1e6:.2f} M",
             f"missing keys ({len(rep.get('missing_keys', []))}): {rep.get('missing_keys', [])[:8]}",
             f"unexpected keys ({len(rep.get('unexpected_keys', []))}): {rep.get('unexpected_keys', [])[:8]}"]  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__.strip().splitlines()[0], file=sys.stderr)
        return 2
    target = argv[0]
    configs = model_configs()
    if target == "all" or target in configs:
        names = list(configs) if target == "all" else [target]
        print(format_rows([r for n in names for r in table(n, configs[n])]))
        return 0
    path = Path(target)
    if not path.exists():
        print(f"inspect: error: {target}: neither a model config ({', '.join(configs)}, all) nor a folder", file=sys.stderr)
        return 2
    print(loading_report(path))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

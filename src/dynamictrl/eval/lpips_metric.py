"""LPIPS through the `lpips` package, with the backbone read from a local file (no download).

The `lpips` wheel ships its linear heads; the VGG16 / AlexNet backbone it would fetch from torchvision
is loaded instead from a torchvision state dict the user names (`vgg16-397923af.pth`,
`alexnet-owt-7be5be79.pth`). Without that file the metric is "not computed".
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def build(net: str = "vgg", backbone_weights: str | Path | None = None, random_backbone: bool = False):
    """An `lpips.LPIPS` model. `backbone_weights`: a torchvision state dict for the backbone.
    `random_backbone=True` keeps a random backbone (tests only)."""
    import lpips

    model = lpips.LPIPS(net=net, pretrained=True, pnet_rand=True, verbose=False).eval()
    if backbone_weights is not None:
        load_backbone(model, backbone_weights)
    elif not random_backbone:
        raise ValueError(f"no weights for the LPIPS {net} backbone")
    return model


@torch.no_grad()
def load_backbone(model, path: str | Path) -> None:
    """Copy torchvision `features.N.*` weights into lpips' sliced backbone (`sliceK.N.*`)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    slices = {}
    for name, module in model.net.named_modules():
        if name.startswith("slice") and "." in name:
            slices[name.split(".", 1)[1]] = module
    loaded = 0
    for key, value in state.items():
        if not key.startswith("features."):
            continue
        idx, param = key.split(".")[1:3]
        if idx in slices:
            getattr(slices[idx], param).copy_(value)
            loaded += 1
    if loaded == 0:
        raise ValueError(f"{path}: no torchvision 'features.N' weights for the LPIPS backbone")


@torch.no_grad()
def lpips_frames(model, gen: np.ndarray, real: np.ndarray, normalize: bool, batch: int = 16) -> list[float]:
    """Per-frame LPIPS of (T, H, W, 3) uint8 videos.

    normalize=False feeds [0, 1] images as they are (DisCo's quirk: LPIPS expects [-1, 1]);
    normalize=True maps them to [-1, 1] first (the package's intended use).
    """
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(gen), batch):
        a = torch.from_numpy(gen[i : i + batch]).permute(0, 3, 1, 2).float().div(255).to(device)
        b = torch.from_numpy(real[i : i + batch]).permute(0, 3, 1, 2).float().div(255).to(device)
        out += model(a, b, normalize=normalize).flatten().tolist()
    return out

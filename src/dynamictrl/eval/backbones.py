"""Feature backbones of the distribution metrics, loaded from local weight files.

- FID: pytorch-fid's InceptionV3 (the TF-ported "pt_inception" graph), 2048-d pool features. Its
  weights file is `pt_inception-2015-12-05-6726825d.pth`.
- FID-VID: a 3D ResNet-50 (Kinetics-400, Hara et al.'s layout, shortcut B), 2048-d pooled
  features of 16-frame clips at 112x112. Weights file `resnet-50-kinetics.pth`: a dict with
  `state_dict` whose keys carry DataParallel's `module.` prefix.
- FVD: an Inflated 3D ConvNet (I3D, Kinetics-400), 400 logits of 16-frame clips at 224x224,
  averaged over the remaining time steps. Weights file `i3d_pretrained_400.pt`: a plain state dict.

The two video networks are written here, in the layout of those published weight files (module
names are what make a state dict load); every file is read with `torch.load(weights_only=True)`.
Tests save random-init networks in the same formats and load them through the same functions.
"""

from __future__ import annotations

from pathlib import Path
from unittest import mock

import torch
import torch.nn.functional as F
from torch import nn

from dynamictrl.errors import UserError


def load_weights(path: str | Path, what: str) -> dict[str, torch.Tensor]:
    """A state dict from a local file, tensors only (no pickle of arbitrary objects)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} weights {path}: no such file")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file is the user's input problem
        raise UserError(f"{what} weights {path}: not a tensor checkpoint ({type(err).__name__})") from None
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise UserError(f"{what} weights {path}: not a state dict")
    return {k.removeprefix("module."): v for k, v in data.items()}


def _load_into(model: nn.Module, state: dict[str, torch.Tensor], path: str | Path, what: str) -> nn.Module:
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise UserError(f"{what} weights {path}: keys do not match the network "
                        f"(missing {missing[:3]}, unexpected {unexpected[:3]})")  # fmt: skip
    return model.eval().requires_grad_(False)


# --- FID: pytorch-fid's InceptionV3 ------------------------------------------------------------


def build_inception(weights: str | Path) -> nn.Module:
    """pytorch-fid's InceptionV3 (pool3, 2048-d) with the FID weights read from `weights`.

    pytorch-fid fetches its weights from a URL while it builds the network; we hand it the local
    state dict at that point instead, so its own architecture code is used unchanged.
    Input: (N, 3, H, W) in [0, 1]; it resizes to 299x299 (bilinear) and scales to [-1, 1] itself.
    Output: (N, 2048).
    """
    try:
        return _fid_inception(load_weights(weights, "FID Inception"))
    except RuntimeError as err:  # load_state_dict's missing/unexpected keys
        raise UserError(f"FID Inception weights {weights}: keys or shapes do not match pytorch-fid's "
                        f"pt_inception network ({str(err).splitlines()[1].strip()[:120]})") from None


def _fid_inception(state: dict[str, torch.Tensor]) -> nn.Module:
    from pytorch_fid import inception

    with mock.patch.object(inception, "load_state_dict_from_url", lambda *a, **k: state):
        net = inception.InceptionV3([inception.InceptionV3.BLOCK_INDEX_BY_DIM[2048]], use_fid_inception=True)
    return _PooledInception(net.eval().requires_grad_(False))


class _PooledInception(nn.Module):
    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)[0].flatten(1)


def random_inception_state() -> dict[str, torch.Tensor]:
    """A random-init state dict of the FID Inception graph, in the weights file's layout (tests)."""
    from pytorch_fid import inception

    net = inception._inception_v3(num_classes=1008, aux_logits=False, weights=None)
    net.Mixed_5b = inception.FIDInceptionA(192, pool_features=32)
    net.Mixed_5c = inception.FIDInceptionA(256, pool_features=64)
    net.Mixed_5d = inception.FIDInceptionA(288, pool_features=64)
    net.Mixed_6b = inception.FIDInceptionC(768, channels_7x7=128)
    net.Mixed_6c = inception.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6d = inception.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6e = inception.FIDInceptionC(768, channels_7x7=192)
    net.Mixed_7b = inception.FIDInceptionE_1(1280)
    net.Mixed_7c = inception.FIDInceptionE_2(2048)
    return net.state_dict()


def random_inception() -> nn.Module:
    """The FID Inception with random weights (benchmarks): same graph, same cost."""
    return _fid_inception(random_inception_state())


# --- FID-VID: 3D ResNet-50 ---------------------------------------------------------------------


class _Bottleneck3D(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv3d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm3d(planes)
        self.conv2 = nn.Conv3d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm3d(planes)
        self.conv3 = nn.Conv3d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm3d(planes * 4)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class ResNet3D50(nn.Module):
    """3D ResNet-50 with full 3x3x3 convolutions and projection shortcuts ("B").

    Input (N, 3, T, H, W) in the 0-255 range minus the Kinetics mean; output (N, 2048): the
    global average of the last stage (for 16x112x112 clips exactly the published AvgPool3d).
    `fc` (400 classes) is kept so the weight file loads whole; it is not used for features.
    """

    def __init__(self, layers: tuple[int, ...] = (3, 4, 6, 3), num_classes: int = 400):
        super().__init__()
        self.conv1 = nn.Conv3d(3, 64, 7, stride=(1, 2, 2), padding=3, bias=False)
        self.bn1 = nn.BatchNorm3d(64)
        self.maxpool = nn.MaxPool3d(3, stride=2, padding=1)
        self.inplanes = 64
        self.layer1 = self._stage(64, layers[0], 1)
        self.layer2 = self._stage(128, layers[1], 2)
        self.layer3 = self._stage(256, layers[2], 2)
        self.layer4 = self._stage(512, layers[3], 2)
        self.fc = nn.Linear(2048, num_classes)

    def _stage(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        down = None
        if stride != 1 or self.inplanes != planes * 4:
            down = nn.Sequential(nn.Conv3d(self.inplanes, planes * 4, 1, stride=stride, bias=False),
                                 nn.BatchNorm3d(planes * 4))  # fmt: skip
        mods = [_Bottleneck3D(self.inplanes, planes, stride, down)]
        self.inplanes = planes * 4
        mods += [_Bottleneck3D(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*mods)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return x.mean(dim=(2, 3, 4))  # (N, 2048)


def build_resnet3d(weights: str | Path) -> nn.Module:
    return _load_into(ResNet3D50(), load_weights(weights, "FID-VID 3D ResNet-50"), weights, "FID-VID 3D ResNet-50")


# --- FVD: I3D -------------------------------------------------------------------------------------


def _same_pad(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow "SAME" padding of one dimension: (before, after)."""
    total = max(kernel - stride, 0) if size % stride == 0 else max(kernel - size % stride, 0)
    return total // 2, total - total // 2


def _pad_same(x: torch.Tensor, kernel: tuple[int, int, int], stride: tuple[int, int, int]) -> torch.Tensor:
    t, h, w = x.shape[2:]
    (t0, t1), (h0, h1), (w0, w1) = (_same_pad(n, k, s) for n, k, s in zip((t, h, w), kernel, stride, strict=True))
    return F.pad(x, (w0, w1, h0, h1, t0, t1))


class _Unit3D(nn.Module):
    """Conv3d with "SAME" padding, then batch norm (eps 1e-3) and ReLU, as in the I3D graph."""

    def __init__(self, cin: int, cout: int, kernel=(1, 1, 1), stride=(1, 1, 1), bn: bool = True, relu: bool = True):
        super().__init__()
        self.kernel, self.stride, self.relu = tuple(kernel), tuple(stride), relu
        self.conv3d = nn.Conv3d(cin, cout, self.kernel, self.stride, bias=not bn)
        self.bn = nn.BatchNorm3d(cout, eps=1e-3, momentum=0.01) if bn else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv3d(_pad_same(x, self.kernel, self.stride))
        if self.bn is not None:
            x = self.bn(x)
        return F.relu(x) if self.relu else x


class _MaxPoolSame(nn.Module):
    def __init__(self, kernel: tuple[int, int, int], stride: tuple[int, int, int]):
        super().__init__()
        self.kernel, self.stride = kernel, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.max_pool3d(_pad_same(x, self.kernel, self.stride), self.kernel, self.stride)


class _Mixed(nn.Module):
    """Inception block: 1x1 | 1x1->3x3 | 1x1->3x3 | maxpool->1x1, concatenated on channels."""

    def __init__(self, cin: int, c: tuple[int, int, int, int, int, int]):
        super().__init__()
        self.b0 = _Unit3D(cin, c[0])
        self.b1a, self.b1b = _Unit3D(cin, c[1]), _Unit3D(c[1], c[2], (3, 3, 3))
        self.b2a, self.b2b = _Unit3D(cin, c[3]), _Unit3D(c[3], c[4], (3, 3, 3))
        self.b3a, self.b3b = _MaxPoolSame((3, 3, 3), (1, 1, 1)), _Unit3D(cin, c[5])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.b0(x), self.b1b(self.b1a(x)), self.b2b(self.b2a(x)), self.b3b(self.b3a(x))], 1)


_I3D_MIXED = {  # name: (input channels, branch widths)
    "Mixed_3b": (192, (64, 96, 128, 16, 32, 32)), "Mixed_3c": (256, (128, 128, 192, 32, 96, 64)),
    "Mixed_4b": (480, (192, 96, 208, 16, 48, 64)), "Mixed_4c": (512, (160, 112, 224, 24, 64, 64)),
    "Mixed_4d": (512, (128, 128, 256, 24, 64, 64)), "Mixed_4e": (512, (112, 144, 288, 32, 64, 64)),
    "Mixed_4f": (528, (256, 160, 320, 32, 128, 128)), "Mixed_5b": (832, (256, 160, 320, 32, 128, 128)),
    "Mixed_5c": (832, (384, 192, 384, 48, 128, 128)),
}  # fmt: skip


class InceptionI3D(nn.Module):
    """Inflated Inception-v1 (Carreira & Zisserman), Kinetics-400 head.

    Input (N, 3, T, H, W) in [-1, 1], 16x224x224 in the FVD protocols; output (N, 400): the logits
    averaged over the time steps left after the final 2x7x7 average pool.
    """

    def __init__(self, num_classes: int = 400):
        super().__init__()
        self.Conv3d_1a_7x7 = _Unit3D(3, 64, (7, 7, 7), (2, 2, 2))
        self.MaxPool3d_2a_3x3 = _MaxPoolSame((1, 3, 3), (1, 2, 2))
        self.Conv3d_2b_1x1 = _Unit3D(64, 64)
        self.Conv3d_2c_3x3 = _Unit3D(64, 192, (3, 3, 3))
        self.MaxPool3d_3a_3x3 = _MaxPoolSame((1, 3, 3), (1, 2, 2))
        self.MaxPool3d_4a_3x3 = _MaxPoolSame((3, 3, 3), (2, 2, 2))
        self.MaxPool3d_5a_2x2 = _MaxPoolSame((2, 2, 2), (2, 2, 2))
        for name, (cin, widths) in _I3D_MIXED.items():
            setattr(self, name, _Mixed(cin, widths))
        self.logits = _Unit3D(1024, num_classes, bn=False, relu=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.Conv3d_1a_7x7(x)
        x = self.Conv3d_2c_3x3(self.Conv3d_2b_1x1(self.MaxPool3d_2a_3x3(x)))
        x = self.Mixed_3c(self.Mixed_3b(self.MaxPool3d_3a_3x3(x)))
        x = self.MaxPool3d_4a_3x3(x)
        for name in ("Mixed_4b", "Mixed_4c", "Mixed_4d", "Mixed_4e", "Mixed_4f"):
            x = getattr(self, name)(x)
        x = self.Mixed_5c(self.Mixed_5b(self.MaxPool3d_5a_2x2(x)))
        x = F.avg_pool3d(x, (min(2, x.shape[2]), 7, 7), stride=1)  # (N, 1024, T', 1, 1) at 224x224
        return self.logits(x).flatten(2).mean(2)  # (N, 400)


def build_i3d(weights: str | Path) -> nn.Module:
    return _load_into(InceptionI3D(), load_weights(weights, "FVD I3D"), weights, "FVD I3D")


"""A differentiable ArcFace (insightface arcface_torch's IResNet) for the ID losses, loaded from safetensors.

Parameter names equal arcface_torch's ``backbone.pth`` (``conv1``, ``bn1``, ``prelu``, ``layer{1..4}.{i}.
{bn1,conv1,bn2,prelu,conv2,bn3,downsample.{0,1}}``, ``bn2``, ``fc``, ``features``). Convert a released
``backbone.pth`` once (tensors only, ``weights_only=True`` refuses code)::

    python -c "import torch, safetensors.torch as st; st.save_file({k: v.contiguous() for k, v in torch.load('backbone.pth', map_location='cpu', weights_only=True).items()}, 'glintr100.safetensors')"

The glint360k r100 backbone is the network of insightface's antelopev2 ``glintr100.onnx``, whose
embeddings the MultiID-2M labels and negative pool hold.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from withanyone.errors import WithAnyoneError

__all__ = ["ARCHS", "IResNet", "ArcFaceWeightsError", "iresnet", "load_arcface"]

#: Blocks per stage of the arcface_torch architectures.
ARCHS: dict[str, tuple[int, int, int, int]] = {
    "r18": (2, 2, 2, 2), "r34": (3, 4, 6, 3), "r50": (3, 4, 14, 3), "r100": (3, 13, 30, 3), "r200": (6, 26, 60, 6),
}


class ArcFaceWeightsError(WithAnyoneError, ValueError):
    """ArcFace weights are missing, not safetensors, or do not fit the architecture."""


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


class IBasicBlock(nn.Module):
    """IResNet basic block: BN → conv3×3 → BN → PReLU → conv3×3 (stride) → BN, plus the shortcut."""

    def __init__(self, cin: int, cout: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin, eps=1e-5)
        self.conv1 = _conv3x3(cin, cout)
        self.bn2 = nn.BatchNorm2d(cout, eps=1e-5)
        self.prelu = nn.PReLU(cout)
        self.conv2 = _conv3x3(cout, cout, stride)
        self.bn3 = nn.BatchNorm2d(cout, eps=1e-5)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        return out + (self.downsample(x) if self.downsample is not None else x)


class IResNet(nn.Module):
    """arcface_torch's IResNet: 112×112 RGB in [0, 255] → ``num_features``-d embedding (not normalised)."""

    def __init__(self, layers: Sequence[int] = ARCHS["r100"], widths: Sequence[int] = (64, 128, 256, 512),
                 num_features: int = 512, stem_width: int | None = None, input_size: int = 112):
        super().__init__()
        if len(layers) != 4 or len(widths) != 4:
            raise ValueError(f"IResNet needs 4 stages, got layers={list(layers)} widths={list(widths)}")
        self.input_size = input_size
        cin = stem_width or widths[0]
        self.conv1 = nn.Conv2d(3, cin, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cin, eps=1e-5)
        self.prelu = nn.PReLU(cin)
        for s, (n, w) in enumerate(zip(layers, widths, strict=True), start=1):
            # every stage starts with stride 2, so its first block always has a projected shortcut
            down = nn.Sequential(nn.Conv2d(cin, w, 1, stride=2, bias=False), nn.BatchNorm2d(w, eps=1e-5))
            blocks = [IBasicBlock(cin, w, 2, down)] + [IBasicBlock(w, w) for _ in range(n - 1)]
            setattr(self, f"layer{s}", nn.Sequential(*blocks))
            cin = w
        side = input_size // 16
        self.bn2 = nn.BatchNorm2d(cin, eps=1e-5)
        self.dropout = nn.Dropout(0.0)
        self.fc = nn.Linear(cin * side * side, num_features)
        self.features = nn.BatchNorm1d(num_features, eps=1e-5)
        nn.init.constant_(self.features.weight, 1.0)
        self.features.weight.requires_grad = False

    @property
    def embedding_dim(self) -> int:
        """Width of the output embedding."""
        return self.fc.out_features

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """Embeddings [N, D] of aligned faces [N, 3, 112, 112], RGB in [0, 255] (normalised here)."""
        if pixels.shape[-2:] != (self.input_size, self.input_size):
            raise ValueError(f"ArcFace expects {self.input_size}×{self.input_size} faces, got {tuple(pixels.shape)}")
        x = (pixels / 255.0 - 0.5) / 0.5
        x = x.to(self.conv1.weight.dtype)
        x = self.prelu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.dropout(torch.flatten(self.bn2(x), 1))
        return self.features(self.fc(x))


def iresnet(arch: str = "r100", num_features: int = 512) -> IResNet:
    """An arcface_torch architecture by name (``r18``, ``r34``, ``r50``, ``r100``, ``r200``), random weights."""
    if arch not in ARCHS:
        raise ValueError(f"unknown ArcFace architecture {arch!r}; choose one of {', '.join(ARCHS)}")
    return IResNet(ARCHS[arch], num_features=num_features)


def load_arcface(path: str | Path, arch: str | None = None, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32) -> IResNet:
    """A frozen, eval-mode IResNet from a safetensors file of arcface_torch keys (pickles are refused).

    Block counts and widths are read from the file's keys and shapes (so tiny test networks load too);
    ``arch`` (a name from :data:`ARCHS`), when given, must match them.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise ArcFaceWeightsError(f"{path}: ArcFace weights not found")
    if path.suffix in (".pth", ".pt", ".bin", ".pkl", ".ckpt"):
        raise ArcFaceWeightsError(f"{path}: pickled weights are not loaded; convert once to safetensors "
                                  "(see withanyone.train.arcface's docstring)")
    try:
        sd = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ArcFaceWeightsError(f"{path}: not a safetensors file ({exc})") from exc
    try:
        layers = tuple(len({k.split(".")[1] for k in sd if k.startswith(f"layer{s}.")}) for s in range(1, 5))
        widths = tuple(int(sd[f"layer{s}.0.conv1.weight"].shape[0]) for s in range(1, 5))
        stem, features = int(sd["conv1.weight"].shape[0]), int(sd["fc.weight"].shape[0])
        side = int(round((sd["fc.weight"].shape[1] / widths[-1]) ** 0.5))
    except KeyError as exc:
        raise ArcFaceWeightsError(f"{path}: no {exc.args[0]!r} (not an arcface_torch IResNet backbone?)") from exc
    if arch is not None and ARCHS.get(arch) != layers:
        raise ArcFaceWeightsError(f"{path}: holds an IResNet with blocks {list(layers)}, not {arch!r}")
    with torch.device("meta"):
        model = IResNet(layers, widths, features, stem_width=stem, input_size=side * 16)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    bad = [k for k in expected if k in sd and tuple(sd[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or bad:
        raise ArcFaceWeightsError(f"{path}: weights do not fit IResNet{list(layers)}: missing {missing[:5]}, "
                                  f"unexpected {unexpected[:5]}, wrong shapes {bad[:5]}")
    model.load_state_dict(sd, assign=True)
    model = model.to(device=device, dtype=dtype).eval()
    model.requires_grad_(False)
    return model

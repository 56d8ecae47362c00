"""A differentiable ArcFace (insightface arcface_torch's IResNet) for the ID losses, loaded from safetensors.

Parameter names equal arcface_torch's ``backbone.pth`` (``conv1``, ``bn1``, ``prelu``, ``layer{1..4}.{i}.
{bn1,conv1,bn2,prelu,conv2,bn3,downsample.{0,1}}``, ``bn2``, ``fc``, ``features``). Convert a released
``backbone.pth`` once (tensors only, ``weights_only=True`` refuses code)::

    python -c "import torch, safetensors.torch as st; st.save_file({k: v.contiguous() for k, v in torch.load('backbone.pth', map_location='cpu', weights_only=True).items()}, 'glintr100.safetensors')"

The glint360k r100 backbone is the network of insightface's antelopev2 ``glintr100.onnx``, whose
embeddings the MultiID-2M labels and negative pool hold. :func:`load_arcface_onnx` reads that file (or
buffalo_l's ``w600k_r50.onnx``, or a pack folder) directly: the graph's initializers are mapped onto the
IResNet by walking its nodes (no onnx2torch step, nothing unpickled). Those exports fold every BatchNorm that
follows a convolution into the convolution's weights and bias; the loaded network holds the folded
convolution and an affine BatchNorm that adds the bias, so it computes the same function as the ONNX file.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from withanyone.errors import WithAnyoneError

__all__ = ["ARCHS", "IResNet", "ArcFaceWeightsError", "iresnet", "load_arcface", "load_arcface_onnx"]

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
    """A frozen, eval-mode IResNet from a safetensors file of arcface_torch keys (pickles are refused), or from
    an insightface ONNX recognizer / pack folder (see :func:`load_arcface_onnx`).

    Block counts and widths are read from the file's keys and shapes (so tiny test networks load too);
    ``arch`` (a name from :data:`ARCHS`), when given, must match them.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if path.is_dir() or path.suffix == ".onnx":
        return load_arcface_onnx(path, arch, device=device, dtype=dtype)
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


# ----------------------------------------------------------------------------- insightface ONNX recognizers

#: Recognizer files of the insightface packs whose network is an arcface_torch IResNet, preferred in this order.
ONNX_RECOGNIZERS = ("glintr100.onnx", "w600k_r50.onnx")
_PASS_THROUGH = ("Identity", "Unsqueeze", "Reshape", "Squeeze", "Cast")


class _OnnxGraph:
    """Initializers, constants and consumers of an ONNX graph, for walking an exported IResNet."""

    def __init__(self, path: Path):
        import onnx
        from onnx import numpy_helper

        self.path = path
        try:
            model = onnx.load(str(path))
        except Exception as exc:  # noqa: BLE001 — onnx raises DecodeError and friends
            raise ArcFaceWeightsError(f"{path}: not a readable ONNX file ({exc})") from exc
        graph = model.graph
        self.values = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
        self.producer: dict[str, Any] = {}
        self.consumers: dict[str, list[Any]] = {}
        for node in graph.node:
            if node.op_type == "Constant":
                attr = next((a for a in node.attribute if a.name == "value"), None)
                if attr is not None:
                    self.values[node.output[0]] = numpy_helper.to_array(attr.t)
                continue
            for out in node.output:
                self.producer[out] = node
        for node in graph.node:
            if node.op_type == "Constant":
                continue
            for name in node.input:
                if name and not self.is_const(name):
                    self.consumers.setdefault(name, []).append(node)
        inputs = [i.name for i in graph.input if i.name not in self.values]
        if len(inputs) != 1:
            raise ArcFaceWeightsError(f"{path}: an ArcFace recognizer has one input, this graph has {inputs}")
        self.input = inputs[0]
        self.outputs = [o.name for o in graph.output]

    def is_const(self, name: str) -> bool:
        """Whether a tensor is an initializer, a Constant, or a reshaped/cast copy of one."""
        if name in self.values:
            return True
        node = self.producer.get(name)
        return node is not None and node.op_type in _PASS_THROUGH and self.is_const(node.input[0])

    def const(self, name: str) -> np.ndarray:
        """A constant's values as float32 (shape as stored; pass-through nodes are followed)."""
        if name in self.values:
            return np.asarray(self.values[name], dtype=np.float32)
        node = self.producer.get(name)
        if node is None or node.op_type not in _PASS_THROUGH:
            raise ArcFaceWeightsError(f"{self.path}: expected a constant for {name!r}")
        return self.const(node.input[0])

    def next_nodes(self, tensor: str) -> list[Any]:
        """The non-constant nodes that read ``tensor``, skipping Identity nodes."""
        out = []
        for node in self.consumers.get(tensor, []):
            out.extend(self.next_nodes(node.output[0]) if node.op_type == "Identity" else [node])
        return out

    def only_next(self, tensor: str, ops: tuple[str, ...]) -> Any:
        """The single node reading ``tensor``; an error naming the file unless its op is one of ``ops``."""
        nodes = self.next_nodes(tensor)
        if len(nodes) != 1 or nodes[0].op_type not in ops:
            found = [n.op_type for n in nodes]
            raise ArcFaceWeightsError(f"{self.path}: not an IResNet export: after {tensor!r} expected "
                                      f"{' or '.join(ops)}, found {found or 'nothing'}")
        return nodes[0]


def _attr(node: Any, name: str, default: Any = None) -> Any:
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _conv(g: _OnnxGraph, node: Any, kernel: int, stride: int | None = None) -> dict[str, Any]:
    """Weight, bias, stride and the BatchNorm that may follow (folded exports have none) of one Conv."""
    w = g.const(node.input[1])
    pad = (kernel - 1) // 2
    strides = list(_attr(node, "strides", [1, 1]))
    pads = list(_attr(node, "pads", [0, 0, 0, 0]))
    if (w.ndim != 4 or w.shape[2:] != (kernel, kernel) or int(_attr(node, "group", 1)) != 1
            or pads != [pad] * 4 or len(set(strides)) != 1 or (stride is not None and strides[0] != stride)):
        raise ArcFaceWeightsError(f"{g.path}: Conv {node.name or node.output[0]!r} (weight {list(w.shape)}, "
                                  f"strides {strides}, pads {pads}) is not an IResNet {kernel}×{kernel} convolution")
    bias = g.const(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    out = node.output[0]
    nxt = g.next_nodes(out)
    bn = None
    if len(nxt) == 1 and nxt[0].op_type == "BatchNormalization":
        bn = _bn(g, nxt[0])
        out = nxt[0].output[0]
    return {"weight": w, "bias": bias, "bn": bn, "stride": int(strides[0]), "out": out}


def _bn(g: _OnnxGraph, node: Any) -> dict[str, Any]:
    scale, shift, mean, var = (g.const(n) for n in node.input[1:5])
    return {"scale": scale, "shift": shift, "mean": mean, "var": var, "eps": float(_attr(node, "epsilon", 1e-5))}


def _affine(bias: np.ndarray | None, bn: dict[str, Any] | None, channels: int, eps: float = 1e-5) -> dict:
    """BatchNorm state (eps ``eps``) computing ``bn(x + bias)``; identity plus ``bias`` when ``bn`` is None."""
    b = np.zeros(channels, np.float64) if bias is None else bias.reshape(-1).astype(np.float64)
    if bn is None:
        return {"weight": np.full(channels, np.sqrt(1.0 + eps)), "bias": np.zeros(channels), "running_mean": -b,
                "running_var": np.ones(channels)}
    return {"weight": bn["scale"], "bias": bn["shift"], "running_mean": bn["mean"].astype(np.float64) - b,
            "running_var": bn["var"].astype(np.float64) + bn["eps"] - eps}


def _t(values: Any) -> torch.Tensor:
    return torch.from_numpy(np.array(values, dtype=np.float32, copy=True))


def _put(sd: dict[str, torch.Tensor], prefix: str, values: dict[str, Any]) -> None:
    for k, v in values.items():
        sd[f"{prefix}.{k}"] = _t(v)


def _onnx_file(path: Path) -> Path:
    """The recognizer of a pack folder (glintr100 / w600k_r50 first, else the only recognition model)."""
    if not path.is_dir():
        if not path.is_file():
            raise ArcFaceWeightsError(f"{path}: ArcFace weights not found")
        return path
    from withanyone.faces.packs import find_pack, route_models

    folder = find_pack(path, hub=False)
    for name in ONNX_RECOGNIZERS:
        if (folder / name).is_file():
            return folder / name
    recs = [m.path for m in route_models(folder) if m.role == "recognition"]
    if len(recs) != 1:
        raise ArcFaceWeightsError(f"{path}: no {' / '.join(ONNX_RECOGNIZERS)} and {len(recs)} other recognizers "
                                  f"in this pack; pass the ONNX file itself")
    return recs[0]


def load_arcface_onnx(path: str | Path, arch: str | None = None, device: str | torch.device = "cpu",
                      dtype: torch.dtype = torch.float32) -> IResNet:
    """A frozen IResNet equal to an insightface ONNX recognizer (``glintr100.onnx``, ``w600k_r50.onnx``) or pack.

    The graph must be an arcface_torch IResNet export (input normalised by the caller with 127.5 / 127.5, as
    insightface does for these models): Conv [BN] PRelu, then blocks BN → Conv [BN] → PRelu → Conv [BN] (+ a
    1×1 stride-2 Conv [BN] shortcut opening each stage) → Add, then BN → Flatten → Gemm [BN]. Block counts,
    widths and input size come from the graph; ``arch`` (e.g. ``"r100"``), when given, must match.
    """
    file = _onnx_file(Path(path))
    g = _OnnxGraph(file)
    sd: dict[str, torch.Tensor] = {}
    node = g.only_next(g.input, ("Conv",))
    stem = _conv(g, node, 3, 1)
    width = stem["weight"].shape[0]
    sd["conv1.weight"] = _t(stem["weight"])
    _put(sd, "bn1", _affine(stem["bias"], stem["bn"], width))
    prelu = g.only_next(stem["out"], ("PRelu",))
    sd["prelu.weight"] = _t(g.const(prelu.input[1]).reshape(-1))
    cur = prelu.output[0]
    stages: list[list[dict]] = []
    while True:
        nxt = g.next_nodes(cur)
        if len(nxt) == 1 and nxt[0].op_type == "BatchNormalization":
            after = g.next_nodes(nxt[0].output[0])
            if len(after) == 1 and after[0].op_type in ("Flatten", "Reshape"):
                break  # the final bn2
        down = [n for n in nxt if n.op_type == "Conv" and g.const(n.input[1]).shape[2:] == (1, 1)]
        main = [n for n in nxt if n not in down and n.op_type in ("BatchNormalization", "Conv")]
        if len(main) != 1 or len(down) > 1:
            raise ArcFaceWeightsError(f"{file}: not an IResNet export: {[n.op_type for n in nxt]} read {cur!r}")
        block: dict[str, Any] = {"bn1": None}
        node = main[0]
        if node.op_type == "BatchNormalization":
            block["bn1"] = _bn(g, node)
            node = g.only_next(node.output[0], ("Conv",))
        block["conv1"] = _conv(g, node, 3, 1)
        prelu = g.only_next(block["conv1"]["out"], ("PRelu",))
        block["prelu"] = g.const(prelu.input[1]).reshape(-1)
        block["conv2"] = _conv(g, g.only_next(prelu.output[0], ("Conv",)), 3)
        shortcut = cur
        if down:
            block["down"] = _conv(g, down[0], 1, block["conv2"]["stride"])
            shortcut = block["down"]["out"]
        add = g.only_next(block["conv2"]["out"], ("Add",))
        if sorted(add.input) != sorted([block["conv2"]["out"], shortcut]):
            raise ArcFaceWeightsError(f"{file}: not an IResNet export: {add.name or add.output[0]!r} adds "
                                      f"{list(add.input)}, expected the block's output and its shortcut")
        if down:
            stages.append([])
        elif not stages or block["conv2"]["stride"] != 1:
            raise ArcFaceWeightsError(f"{file}: not an IResNet export: a stage does not open with a strided "
                                      f"block and a projected shortcut (at {cur!r})")
        stages[-1].append(block)
        cur = add.output[0]
    if len(stages) != 4:
        raise ArcFaceWeightsError(f"{file}: an IResNet has 4 stages, this graph has {len(stages)}")
    layers = tuple(len(s) for s in stages)
    widths = tuple(int(s[0]["conv1"]["weight"].shape[0]) for s in stages)
    if arch is not None and ARCHS.get(arch) != layers:
        raise ArcFaceWeightsError(f"{file}: holds an IResNet with blocks {list(layers)}, not {arch!r}")
    for s, blocks in enumerate(stages, start=1):
        for i, b in enumerate(blocks):
            p = f"layer{s}.{i}"
            cin = b["conv1"]["weight"].shape[1]
            cout = b["conv1"]["weight"].shape[0]
            if b["bn1"] is None:
                _put(sd, f"{p}.bn1", _affine(None, None, cin))
            else:
                _put(sd, f"{p}.bn1", _affine(None, b["bn1"], cin))
            sd[f"{p}.conv1.weight"] = _t(b["conv1"]["weight"])
            _put(sd, f"{p}.bn2", _affine(b["conv1"]["bias"], b["conv1"]["bn"], cout))
            sd[f"{p}.prelu.weight"] = _t(b["prelu"])
            sd[f"{p}.conv2.weight"] = _t(b["conv2"]["weight"])
            _put(sd, f"{p}.bn3", _affine(b["conv2"]["bias"], b["conv2"]["bn"], cout))
            if "down" in b:
                sd[f"{p}.downsample.0.weight"] = _t(b["down"]["weight"])
                _put(sd, f"{p}.downsample.1", _affine(b["down"]["bias"], b["down"]["bn"], cout))
    bn2 = g.next_nodes(cur)[0]
    _put(sd, "bn2", _affine(None, _bn(g, bn2), widths[-1]))
    flat = g.next_nodes(bn2.output[0])[0]
    fc = g.only_next(flat.output[0], ("Gemm", "MatMul"))
    w = g.const(fc.input[1])
    if fc.op_type == "Gemm":
        w = (w if _attr(fc, "transB", 0) else w.T) * np.float32(_attr(fc, "alpha", 1.0))
        bias = g.const(fc.input[2]) * np.float32(_attr(fc, "beta", 1.0)) if len(fc.input) > 2 else None
        out = fc.output[0]
    else:
        w = w.T
        add = g.only_next(fc.output[0], ("Add",))
        bias = g.const(next(n for n in add.input if n != fc.output[0]))
        out = add.output[0]
    features = int(w.shape[0])
    sd["fc.weight"] = _t(w)
    sd["fc.bias"] = _t(np.zeros(features) if bias is None else bias.reshape(-1))
    tail = g.next_nodes(out)
    final_bn = _bn(g, tail[0]) if len(tail) == 1 and tail[0].op_type == "BatchNormalization" else None
    _put(sd, "features", _affine(None, final_bn, features))
    side = int(round((w.shape[1] / widths[-1]) ** 0.5))
    if widths[-1] * side * side != w.shape[1]:
        raise ArcFaceWeightsError(f"{file}: fc input {w.shape[1]} is not {widths[-1]}·s² for the last stage")
    with torch.device("meta"):
        model = IResNet(layers, widths, features, stem_width=width, input_size=side * 16)
    expected = model.state_dict()
    for k, v in expected.items():
        if k.endswith("num_batches_tracked"):
            sd[k] = torch.zeros((), dtype=torch.long)
        elif k not in sd or tuple(sd[k].shape) != tuple(v.shape):
            got = tuple(sd[k].shape) if k in sd else None
            raise ArcFaceWeightsError(f"{file}: {k} has shape {got}, IResNet{list(layers)} needs {tuple(v.shape)}")
    model.load_state_dict(sd, assign=True)
    model = model.to(device=device, dtype=dtype).eval()
    model.requires_grad_(False)
    return model

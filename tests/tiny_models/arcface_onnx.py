"""A tiny IResNet exported to ONNX in the op layout of insightface's glintr100.onnx / w600k_r50.onnx.

Those files are arcface_torch backbones exported by torch's TorchScript ONNX exporter in eval mode: the
exporter folds each BatchNorm that follows a convolution into that convolution (Conv with a bias), keeps the
pre-activation BatchNorm that opens each block, the final ``bn2`` and the ``features`` BatchNorm after the
``Gemm``; no input normalisation inside the graph (callers feed ``(pixel − 127.5) / 127.5``), input
``input.1`` [None, 3, 112, 112]. :func:`export_tiny_iresnet` runs that same exporter on a tiny IResNet with
random weights *and random BatchNorm statistics* (so folding changes the numbers) and, like the released
files, without the exporter's ``Identity`` aliases unless ``keep_identity``.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import torch
from torch import nn

from withanyone.train.arcface import IResNet


class _Backbone(nn.Module):
    """arcface_torch's IResNet.forward without the pixel normalisation (the released ONNX graphs have none)."""

    def __init__(self, net: IResNet):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = self.net
        x = n.prelu(n.bn1(n.conv1(x)))
        x = n.layer4(n.layer3(n.layer2(n.layer1(x))))
        return n.features(n.fc(torch.flatten(n.bn2(x), 1)))


def tiny_iresnet(layers=(1, 2, 1, 1), widths=(8, 16, 16, 32), num_features: int = 512, seed: int = 0) -> IResNet:
    """A random IResNet whose BatchNorms have random statistics and affine parameters (eval mode)."""
    torch.manual_seed(seed)
    net = IResNet(layers, widths, num_features=num_features)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
            elif isinstance(m, nn.PReLU):
                m.weight.uniform_(0.1, 0.4)
    return net.eval()


def export_tiny_iresnet(path: str | Path, net: IResNet | None = None, *, keep_identity: bool = False) -> IResNet:
    """Export ``net`` (default :func:`tiny_iresnet`) to ``path`` in the released layout; returns the network."""
    import onnx

    net = net or tiny_iresnet()
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(_Backbone(net).eval(), torch.zeros(1, 3, net.input_size, net.input_size), buf,
                          dynamo=False, opset_version=11, do_constant_folding=True,
                          dynamic_axes={"input.1": {0: "None"}}, input_names=["input.1"])
    model = onnx.load_from_string(buf.getvalue())
    graph = model.graph
    if not keep_identity:
        alias = {n.output[0]: n.input[0] for n in graph.node if n.op_type == "Identity"}
        keep = [n for n in graph.node if n.op_type != "Identity"]
        for n in keep:
            for i, name in enumerate(n.input):
                if name in alias:
                    n.input[i] = alias[name]
        del graph.node[:]
        graph.node.extend(keep)
    onnx.save(model, str(path))
    return net

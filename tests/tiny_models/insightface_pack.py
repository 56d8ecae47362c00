"""A tiny insightface-format model pack whose outputs are known exactly, for tests.

``build_tiny_pack(folder)`` writes ``det_10g.onnx`` (SCRFD-shaped detector: input ``input.1`` [1, 3, ?, ?],
9 outputs named like the real det_10g: scores / boxes / keypoints for strides 8, 16, 32, each [H/s·W/s·2, C])
and ``glintr100.onnx`` (ArcFace-shaped recognizer: ``input.1`` [N, 3, 112, 112] → [N, 512]), optionally plus
ignored extras (``2d106det.onnx``, ``genderage.onnx``), and returns a :class:`TinyPack` describing them.

How the detector "sees" a face: at stride ``s`` it average-pools the normalised input over s×s cells and
scores each cell ``sigmoid(gain · (k − o₁ − o₂) + bias − a · anchor_penalty)``, where ``k`` is the cell's key
channel (red at stride 8, green at 16, blue at 32), ``o₁, o₂`` the other two and ``a`` the anchor index.
Only a cell filled with the pure key colour (:data:`KEY_COLOURS`) scores above 0.5, natural photos score ≈ 0.
Box distances and keypoint offsets are constants per anchor (:data:`BOX_DIST`, :data:`KPS_OFFSETS`, in
stride units), so a hot cell at grid (x, y) decodes to ``centre = (x·s, y·s)``, box ``centre ∓ dist·s`` and
keypoints ``centre + offset·s``: see :meth:`TinyPack.expected`. Paint a key-coloured square with
:func:`paint_key` to plant a "face" in any image.

The recognizer is linear: 8×8 average pooling of the normalised crop (→ 3×14×14), flatten, ``@ W + b``;
:meth:`TinyPack.expected_embedding` computes the same with numpy. ``style="torch"`` expects the caller to
normalise with 127.5/127.5; ``style="mxnet"`` starts with ``_minusscalar0`` (Sub) and ``_mulscalar0`` (Mul)
nodes that normalise raw pixels inside the graph (so callers must feed mean 0 / std 1), as real
mxnet-converted ArcFace models do.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

#: Real det_10g output names, in graph order: scores s8/s16/s32, boxes s8/s16/s32, keypoints s8/s16/s32.
DET_OUTPUT_NAMES = ("448", "471", "494", "451", "474", "497", "454", "477", "500")
STRIDES = (8, 16, 32)
#: Pure colour that makes the tiny detector fire, per stride.
KEY_COLOURS = {8: (255, 0, 0), 16: (0, 255, 0), 32: (0, 0, 255)}
#: (left, top, right, bottom) distances in stride units, per anchor (anchor 1's box lies inside anchor 0's).
BOX_DIST = np.array([[1.0, 1.5, 2.0, 2.5], [0.75, 1.0, 1.5, 2.0]], dtype=np.float32)
#: Five keypoints (ArcFace order) relative to the anchor centre, in stride units, per anchor.
KPS_OFFSETS = np.array(
    [[[-0.1, 0.0], [1.1, 0.0], [0.5, 0.6], [0.0, 1.3], [1.0, 1.3]],
     [[-0.075, 0.0], [0.825, 0.0], [0.375, 0.45], [0.0, 0.975], [0.75, 0.975]]], dtype=np.float32)
#: Value of a fully saturated channel after SCRFD normalisation: (255 − 127.5) / 128.
SATURATED = np.float32((255 - 127.5) / 128)


@dataclass
class TinyPack:
    """Paths and every constant of a tiny pack, with the numpy expectations of its outputs."""

    folder: Path
    detector: Path
    recognizer: Path
    num_anchors: int = 2
    score_gain: float = 40.0
    score_bias: float = -112.0
    anchor_penalty: float = 1.0
    rec_style: str = "torch"
    rec_weight: np.ndarray = field(default_factory=lambda: np.zeros((588, 512), np.float32))
    rec_bias: np.ndarray = field(default_factory=lambda: np.zeros(512, np.float32))
    rec_pool: int = 8
    extras: tuple[Path, ...] = ()

    @property
    def embedding_dim(self) -> int:
        """Width of the recognizer's output."""
        return int(self.rec_weight.shape[1])

    def score(self, anchor: int = 0, key: float = 3 * float(SATURATED)) -> float:
        """Detector score of a cell whose pooled key value (k − o₁ − o₂) is ``key`` (default: pure key colour)."""
        logit = np.float32(self.score_gain) * np.float32(key) + np.float32(self.score_bias - anchor * self.anchor_penalty)
        return float(1.0 / (1.0 + np.exp(-np.float64(logit))))

    def expected(self, stride: int, cell_x: int, cell_y: int, anchor: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Box (4,) and keypoints (5, 2), in detector-canvas pixels, of a hot cell at grid (cell_x, cell_y)."""
        cx, cy = np.float64(cell_x * stride), np.float64(cell_y * stride)
        d = BOX_DIST[anchor].astype(np.float64) * stride
        box = np.array([cx - d[0], cy - d[1], cx + d[2], cy + d[3]])
        kps = KPS_OFFSETS[anchor].astype(np.float64) * stride + [cx, cy]
        return box, kps

    @property
    def rec_normalisation(self) -> tuple[float, float]:
        """(mean, std) a caller must apply before feeding the recognizer: (0, 1) for mxnet, else (127.5, 127.5)."""
        return (0.0, 1.0) if self.rec_style == "mxnet" else (127.5, 127.5)

    def expected_embedding(self, crops: np.ndarray, input_mean: float | None = None,
                           input_std: float | None = None) -> np.ndarray:
        """Unit-norm embeddings of aligned RGB uint8 crops (N, 112, 112, 3), computed with numpy, when the
        graph is fed ``(crop − input_mean) / input_std`` (default: the normalisation this model expects)."""
        mean, std = self.rec_normalisation if input_mean is None else (input_mean, input_std)
        x = (np.asarray(crops, dtype=np.float32).transpose(0, 3, 1, 2) - np.float32(mean)) / np.float32(std)
        if self.rec_style == "mxnet":
            x = (x - np.float32(127.5)) * np.float32(1 / 128)
        n, c, h, w = x.shape
        p = self.rec_pool
        pooled = x.reshape(n, c, h // p, p, w // p, p).mean(axis=(3, 5), dtype=np.float64)
        emb = pooled.reshape(n, -1) @ self.rec_weight.astype(np.float64) + self.rec_bias
        return (emb / np.linalg.norm(emb, axis=1, keepdims=True)).astype(np.float32)


def paint_key(image: np.ndarray, x1: int, y1: int, x2: int, y2: int, stride: int = 32) -> np.ndarray:
    """A copy of ``image`` with the box filled by the key colour of ``stride`` (plants a tiny-pack "face")."""
    out = np.array(image, dtype=np.uint8, copy=True)
    out[y1:y2, x1:x2] = KEY_COLOURS[stride]
    return out


def build_tiny_pack(folder: str | Path, *, num_anchors: int = 2, rec_style: str = "torch",
                    embedding_dim: int = 512, with_kps: bool = True, batched: bool = False,
                    input_size: tuple[int, int] | None = None, extras: bool = True, seed: int = 0,
                    detector_name: str = "det_10g.onnx", recognizer_name: str = "glintr100.onnx") -> TinyPack:
    """Write a tiny pack into ``folder`` (created if needed) and describe it.

    ``num_anchors`` anchors per location (1 or 2); ``rec_style`` "torch" or "mxnet" (see module doc);
    ``with_kps=False`` writes a 6-output detector without keypoints; ``batched`` gives outputs a leading
    batch axis [1, N, C]; ``input_size`` (w, h) fixes the detector's input size (default dynamic);
    ``extras`` also writes a landmark and an attribute model that a pack loader must ignore.
    """
    if num_anchors not in (1, 2):
        raise ValueError(f"num_anchors must be 1 or 2, got {num_anchors}")
    if rec_style not in ("torch", "mxnet"):
        raise ValueError(f"rec_style must be 'torch' or 'mxnet', got {rec_style!r}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    pack = TinyPack(folder=folder, detector=folder / detector_name, recognizer=folder / recognizer_name,
                    num_anchors=num_anchors, rec_style=rec_style,
                    rec_weight=(rng.standard_normal((588, embedding_dim)) * 0.05).astype(np.float32),
                    rec_bias=(rng.standard_normal(embedding_dim) * 0.1).astype(np.float32))
    _write_detector(pack, with_kps=with_kps, batched=batched, input_size=input_size)
    _write_recognizer(pack)
    if extras:
        pack.extras = (_write_probe(folder / "2d106det.onnx", 192, 212, rng),
                       _write_probe(folder / "genderage.onnx", 96, 3, rng))
    return pack


def _write_detector(pack: TinyPack, *, with_kps: bool, batched: bool, input_size: tuple[int, int] | None) -> None:
    from onnx import TensorProto, helper, numpy_helper, save

    a = pack.num_anchors
    h, w = ("?", "?") if input_size is None else (input_size[1], input_size[0])
    inp = helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, h, w])
    nodes, inits, outs = [], [], {}
    last = [1, -1] if batched else [-1]
    for idx, s in enumerate(STRIDES):
        key = -np.ones(3, np.float32)
        key[idx] = 1.0
        heads = {
            "score": (np.tile(key * pack.score_gain, (a, 1)),
                      np.array([pack.score_bias - i * pack.anchor_penalty for i in range(a)], np.float32), 1),
            "box": (np.zeros((a * 4, 3), np.float32), BOX_DIST[:a].reshape(-1), 4),
            "kps": (np.zeros((a * 10, 3), np.float32), KPS_OFFSETS[:a].reshape(-1), 10),
        }
        pooled = f"pool{s}"
        nodes.append(helper.make_node("AveragePool", ["input.1"], [pooled], name=f"AveragePool_{s}",
                                      kernel_shape=[s, s], strides=[s, s]))
        for head, (weight, bias, width) in heads.items():
            wn, bn = f"{head}{s}.w", f"{head}{s}.b"
            inits += [numpy_helper.from_array(weight.reshape(-1, 3, 1, 1).astype(np.float32), wn),
                      numpy_helper.from_array(bias.astype(np.float32), bn)]
            conv = f"{head}{s}.conv"
            nodes.append(helper.make_node("Conv", [pooled, wn, bn], [conv], name=f"Conv_{head}{s}"))
            if head == "score":
                nodes.append(helper.make_node("Sigmoid", [conv], [conv + ".sig"], name=f"Sigmoid_{s}"))
                conv += ".sig"
            nodes.append(helper.make_node("Transpose", [conv], [conv + ".t"], perm=[0, 2, 3, 1],
                                          name=f"Transpose_{head}{s}"))
            shape = f"{head}{s}.shape"
            inits.append(numpy_helper.from_array(np.array(last + [width], np.int64), shape))
            slot = {"score": 0, "box": 3, "kps": 6}[head] + idx
            name = DET_OUTPUT_NAMES[slot]
            nodes.append(helper.make_node("Reshape", [conv + ".t", shape], [name], name=f"Reshape_{head}{s}"))
            dims = (["1", f"n{s}"] if batched else [f"n{s}"]) + [width]
            outs[slot] = helper.make_tensor_value_info(name, TensorProto.FLOAT, dims)
    n_out = 9 if with_kps else 6
    if not with_kps:
        nodes = [n for n in nodes if "kps" not in n.name]
        inits = [t for t in inits if not t.name.startswith("kps")]
    graph = helper.make_graph(nodes, "tiny_scrfd", [inp], [outs[i] for i in range(n_out)], inits)
    save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8), str(pack.detector))


def _write_recognizer(pack: TinyPack) -> None:
    from onnx import TensorProto, helper, numpy_helper, save

    d = pack.embedding_dim
    inp = helper.make_tensor_value_info("input.1", TensorProto.FLOAT, ["None", 3, 112, 112])
    out = helper.make_tensor_value_info("1333", TensorProto.FLOAT, ["None", d])
    nodes, inits, x = [], [], "input.1"
    if pack.rec_style == "mxnet":
        inits += [numpy_helper.from_array(np.array(127.5, np.float32), "mean"),
                  numpy_helper.from_array(np.array(1 / 128, np.float32), "scale")]
        nodes += [helper.make_node("Sub", [x, "mean"], ["minus"], name="_minusscalar0"),
                  helper.make_node("Mul", ["minus", "scale"], ["scaled"], name="_mulscalar0")]
        x = "scaled"
    p = pack.rec_pool
    inits += [numpy_helper.from_array(pack.rec_weight, "fc.w"), numpy_helper.from_array(pack.rec_bias, "fc.b")]
    nodes += [helper.make_node("AveragePool", [x], ["pooled"], kernel_shape=[p, p], strides=[p, p], name="AveragePool_0"),
              helper.make_node("Flatten", ["pooled"], ["flat"], axis=1, name="Flatten_1"),
              helper.make_node("MatMul", ["flat", "fc.w"], ["mm"], name="MatMul_2"),
              helper.make_node("Add", ["mm", "fc.b"], ["1333"], name="Add_3")]
    graph = helper.make_graph(nodes, "tiny_arcface", [inp], [out], inits)
    save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8), str(pack.recognizer))


def _write_probe(path: Path, size: int, width: int, rng: np.random.Generator) -> Path:
    """A stand-in for a landmark (192×192) or attribute (96×96) model: pooled colour → linear."""
    from onnx import TensorProto, helper, numpy_helper, save

    inp = helper.make_tensor_value_info("data", TensorProto.FLOAT, [1, 3, size, size])
    out = helper.make_tensor_value_info("fc1", TensorProto.FLOAT, [1, width])
    w = numpy_helper.from_array(rng.standard_normal((3, width)).astype(np.float32), "w")
    nodes = [helper.make_node("GlobalAveragePool", ["data"], ["g"]),
             helper.make_node("Flatten", ["g"], ["f"], axis=1),
             helper.make_node("MatMul", ["f", "w"], ["fc1"])]
    graph = helper.make_graph(nodes, path.stem, [inp], [out], [w])
    save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8), str(path))
    return path

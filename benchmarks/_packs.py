"""A random-weight insightface-format pack with roughly realistic compute, for timing the ONNX backend.

``build_benchmark_pack(folder)`` writes:

- ``det_10g.onnx`` — an SCRFD-shaped detector with a fixed 640×640 input (``input.1``) and the 9 outputs of
  the real det_10g (scores / boxes / keypoints at strides 8, 16, 32, 2 anchors per location): a plain conv
  backbone down to stride 32, 1×1 laterals and two 3×3 head convs per level, ≈ 7 G multiply-adds and ≈ 4 M
  parameters (det_10g: ≈ 10 GFLOPs at 640×480, 4.2 M parameters). The score logits carry a fixed bias that
  makes every image yield exactly two detections in the canvas's top-left 272 px (so embedding time per face
  can be measured); box and keypoint heads add a small input-dependent term to face-shaped constants.
- ``w600k_r50.onnx`` — an IResNet-50-shaped ArcFace recognizer: 112×112 input, stages (3, 4, 14, 3) of
  64/128/256/512 channels with PReLU, then FC 512·7·7 → 512; ≈ 6.3 G multiply-adds and ≈ 43 M parameters
  (≈ 175 MB), like the real w600k_r50 (glintr100, the antelopev2 recognizer, is ≈ 4× the compute).

Figures measured with this pack are for random weights of approximately those sizes: they time the
compute, not accuracy. BatchNorm layers are left out (real exports fold most of them into the convs).
"""

from __future__ import annotations

import json
import math
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DET_OUTPUT_NAMES = ("448", "471", "494", "451", "474", "497", "454", "477", "500")
#: Hot cells (stride, x, y) where the detector fires, anchor 0 only.
HOT_CELLS = ((32, 5, 5), (16, 6, 14))
_BOX = np.array([2.0, 2.5, 2.0, 3.0], np.float32)
_KPS = np.array([[-0.7, -0.5], [0.7, -0.5], [0.0, 0.3], [-0.6, 1.1], [0.6, 1.1]], np.float32)


@dataclass
class BenchmarkPack:
    """Where the pack was written and how big its two models are."""

    folder: Path
    detector: Path
    recognizer: Path
    detector_gmacs: float
    detector_params_m: float
    recognizer_gmacs: float
    recognizer_params_m: float


class _Graph:
    """A tiny ONNX graph writer that counts multiply-adds and parameters."""

    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.nodes: list = []
        self.inits: list = []
        self.macs = 0
        self.params = 0
        self._n = 0

    def name(self, kind: str) -> str:
        self._n += 1
        return f"{kind}_{self._n}"

    def const(self, value: np.ndarray, kind: str = "const") -> str:
        from onnx import numpy_helper

        name = self.name(kind)
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
        self.params += int(np.asarray(value).size)
        return name

    def op(self, op_type: str, inputs: list[str], **attrs) -> str:
        from onnx import helper

        out = self.name(op_type)
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=out, **attrs))
        return out

    def conv(self, x: str, cin: int, cout: int, k: int, stride: int, out_hw: tuple[int, int],
             gain: float = 1.0, bias: np.ndarray | None = None) -> str:
        std = gain * math.sqrt(2.0 / (cin * k * k))
        w = (self.rng.standard_normal((cout, cin, k, k)) * std).astype(np.float32)
        b = np.zeros(cout, np.float32) if bias is None else bias.astype(np.float32)
        self.macs += out_hw[0] * out_hw[1] * cout * cin * k * k
        return self.op("Conv", [x, self.const(w, "w"), self.const(b, "b")], kernel_shape=[k, k],
                       strides=[stride, stride], pads=[k // 2] * 4)

    def relu(self, x: str) -> str:
        return self.op("Relu", [x])

    def prelu(self, x: str, c: int) -> str:
        return self.op("PRelu", [x, self.const(np.full((c, 1, 1), 0.25, np.float32), "slope")])

    def save(self, path: Path, name: str, inputs: list, outputs: list) -> None:
        from onnx import helper, save

        graph = helper.make_graph(self.nodes, name, inputs, outputs, self.inits)
        save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8), str(path))


def build_benchmark_pack(folder: str | Path, seed: int = 0) -> BenchmarkPack:
    """Write the random-weight detector and recognizer into ``folder`` (created if needed)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    det, det_macs, det_params = _write_detector(folder / "det_10g.onnx", seed)
    rec, rec_macs, rec_params = _write_recognizer(folder / "w600k_r50.onnx", seed + 1)
    return BenchmarkPack(folder, det, rec, det_macs / 1e9, det_params / 1e6, rec_macs / 1e9, rec_params / 1e6)


def _write_detector(path: Path, seed: int) -> tuple[Path, int, int]:
    from onnx import TensorProto, helper

    g = _Graph(seed)
    size, anchors = 640, 2
    x = "input.1"
    # Backbone: stride 2, 4, then three levels at strides 8, 16, 32.
    x = g.relu(g.conv(x, 3, 24, 3, 2, (320, 320)))
    x = g.relu(g.conv(x, 24, 48, 3, 2, (160, 160)))
    for _ in range(2):
        x = g.relu(g.conv(x, 48, 48, 3, 1, (160, 160)))
    feats, cin = {}, 48
    for stride, cout in ((8, 96), (16, 192), (32, 384)):
        hw = (size // stride, size // stride)
        x = g.relu(g.conv(x, cin, cout, 3, 2, hw))
        for _ in range(2):
            x = g.relu(g.conv(x, cout, cout, 3, 1, hw))
        feats[stride], cin = (x, cout), cout
    outs: dict[int, object] = {}
    for idx, stride in enumerate((8, 16, 32)):
        feat, c = feats[stride]
        hw = (size // stride, size // stride)
        y = g.relu(g.conv(feat, c, 96, 1, 1, hw))
        for _ in range(2):
            y = g.relu(g.conv(y, 96, 96, 3, 1, hw))
        hot = np.full((1, anchors, *hw), -30.0, np.float32)
        for s, cx, cy in HOT_CELLS:
            if s == stride:
                hot[0, 0, cy, cx] = 30.0
        heads = {
            "score": (1, np.zeros(anchors, np.float32), hot),
            "box": (4, np.tile(_BOX, anchors), None),
            "kps": (10, np.tile(_KPS.reshape(-1), anchors), None),
        }
        for slot, (width, bias, add) in enumerate(heads.values()):
            z = g.conv(y, 96, anchors * width, 3, 1, hw, gain=1e-3, bias=bias)
            if add is not None:
                z = g.op("Sigmoid", [g.op("Add", [z, g.const(add, "hot")])])
            z = g.op("Transpose", [z], perm=[0, 2, 3, 1])
            name = DET_OUTPUT_NAMES[slot * 3 + idx]
            g.nodes.append(helper.make_node("Reshape", [z, g.const(np.array([-1, width], np.int64), "shape")],
                                            [name], name=f"Reshape_{name}"))
            outs[slot * 3 + idx] = helper.make_tensor_value_info(
                name, TensorProto.FLOAT, [hw[0] * hw[1] * anchors, width])
    inp = helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, size, size])
    g.save(path, "bench_scrfd", [inp], [outs[i] for i in range(9)])
    return path, g.macs, g.params


def _write_recognizer(path: Path, seed: int) -> tuple[Path, int, int]:
    from onnx import TensorProto, helper

    g = _Graph(seed)
    x = g.prelu(g.conv("input.1", 3, 64, 3, 1, (112, 112)), 64)
    cin, hw = 64, 112
    for blocks, cout in ((3, 64), (4, 128), (14, 256), (3, 512)):
        for b in range(blocks):
            stride = 2 if b == 0 else 1
            out_hw = hw // stride
            y = g.prelu(g.conv(x, cin, cout, 3, 1, (hw, hw)), cout)
            y = g.conv(y, cout, cout, 3, stride, (out_hw, out_hw), gain=0.5)
            short = g.conv(x, cin, cout, 1, stride, (out_hw, out_hw)) if b == 0 else x
            x = g.op("Add", [y, short])
            cin, hw = cout, out_hw
    flat = g.op("Flatten", [x], axis=1)
    fc = (g.rng.standard_normal((512 * 7 * 7, 512)) * math.sqrt(1.0 / (512 * 49))).astype(np.float32)
    g.macs += fc.size
    g.op("Add", [g.op("MatMul", [flat, g.const(fc, "fc")]), g.const(np.zeros(512, np.float32), "fcb")])
    g.nodes[-1].output[0] = "1333"
    inp = helper.make_tensor_value_info("input.1", TensorProto.FLOAT, ["None", 3, 112, 112])
    out = helper.make_tensor_value_info("1333", TensorProto.FLOAT, ["None", 512])
    g.save(path, "bench_arcface", [inp], [out])
    return path, g.macs, g.params


def main() -> None:
    """Build the pack and time the backend with 1 and 2 onnxruntime threads, side by side."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from withanyone.faces import load_image
    from withanyone.faces.backends.insightface_backend import InsightFaceBackend

    t0 = time.perf_counter()
    pack = build_benchmark_pack(Path(tempfile.mkdtemp(prefix="bench-pack-")))
    print(f"pack written in {time.perf_counter() - t0:.1f} s: detector {pack.detector_gmacs:.1f} GMAC / "
          f"{pack.detector_params_m:.1f} M params, recognizer {pack.recognizer_gmacs:.1f} GMAC / "
          f"{pack.recognizer_params_m:.1f} M params (random weights)")
    root = Path(__file__).resolve().parents[1]
    photo = next((p for p in (root.parent / "shared/data/faces/obama/1.jpg", root / "samples/faces/obama/1.jpg")
                  if p.is_file()), None)
    img = load_image(photo) if photo else np.random.default_rng(0).integers(0, 256, (480, 640, 3), np.uint8)
    res = {}
    for threads in (1, 2):
        be = InsightFaceBackend(pack=pack.folder, intra_op_threads=threads)
        faces = be.detect(img)  # warm up
        det, emb = [], []
        for _ in range(3):
            t = time.perf_counter()
            faces = be.detect(img, embed=False)
            det.append(time.perf_counter() - t)
            t = time.perf_counter()
            be.embed(img, faces)
            emb.append((time.perf_counter() - t) / len(faces))
        res[threads] = (1e3 * float(np.median(det)), 1e3 * float(np.median(emb)))
        print(f"{threads} thread(s): detection {res[threads][0]:.0f} ms/image, embedding {res[threads][1]:.0f} "
              f"ms/face ({len(faces)} faces/image)")
    print(f"2 vs 1 threads: detection {res[1][0] / res[2][0]:.2f}x, embedding {res[1][1] / res[2][1]:.2f}x "
          "(machine shared with other jobs)")
    print(json.dumps({"detect_ms_per_image_1t": round(res[1][0], 1), "embed_ms_per_face_1t": round(res[1][1], 1),
                      "detect_ms_per_image_2t": round(res[2][0], 1), "embed_ms_per_face_2t": round(res[2][1], 1)}))


if __name__ == "__main__":
    main()

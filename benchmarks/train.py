"""Training-step cost on tiny FLUX parts (CPU): flow-only steps vs steps with the ID terms, gradient
checkpointing on vs off, and the real-size ArcFace (r100) forward+backward the ID loss adds per face.

Ratios are measured side by side in one run; the last line is one JSON object of headline figures. The
machine is shared with other jobs: read ratios, not absolute times.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "tests")]

from test_train_fixtures import tiny_components, tiny_config, tiny_multiid  # noqa: E402

from withanyone.train.arcface import iresnet  # noqa: E402
from withanyone.train.data import MultiIDTrainDataset, iter_batches  # noqa: E402
from withanyone.train.loop import compute_losses, trainable_parameters  # noqa: E402


def _time(fn, repeats: int = 5) -> float:
    fn()  # warm-up
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def main() -> None:
    torch.set_num_threads(2)
    res = 128
    cfg = tiny_config(Path("/tmp/withanyone-bench-train"), resolution=res)
    batch = next(iter_batches(MultiIDTrainDataset(tiny_multiid() / "train", res, epochs=1), 2))
    parts = tiny_components()
    for m in (parts.pipe.transformer, parts.pipe.vae, parts.pipe.text_encoder, parts.pipe.text_encoder_2, parts.arcface):
        m.requires_grad_(False)
    parts.adapter.requires_grad_(False)
    params = trainable_parameters(parts.adapter)
    for p in params:
        p.requires_grad_(True)
    parts.adapter.train().attach(parts.pipe.transformer)

    def step(t: float):
        def run():
            losses = compute_losses(batch, parts, cfg, torch.Generator().manual_seed(0), t=torch.full((2,), t))
            losses["loss"].backward()
            parts.adapter.zero_grad(set_to_none=True)
        return run

    parts.pipe.transformer.enable_gradient_checkpointing()
    flow_ckpt = _time(step(0.9))
    id_ckpt = _time(step(0.3))
    parts.pipe.transformer.disable_gradient_checkpointing()
    flow_plain = _time(step(0.9))
    id_plain = _time(step(0.3))
    print(f"tiny FLUX (width 192, 2+2 blocks), {res}×{res} crops, batch 2 × 2 people, CPU 2 threads:")
    print(f"  flow-only step (t = 0.9, ID terms skipped): {1e3 * flow_ckpt:.0f} ms with checkpointing, "
          f"{1e3 * flow_plain:.0f} ms without")
    print(f"  step with ID + InfoNCE (t = 0.3, VAE decode + tiny ArcFace): {1e3 * id_ckpt:.0f} ms with checkpointing, "
          f"{1e3 * id_plain:.0f} ms without")
    print(f"  ID terms cost {id_ckpt / flow_ckpt:.2f}x a flow-only step; checkpointing costs "
          f"{flow_ckpt / flow_plain:.2f}x (flow-only)")

    arc = iresnet("r100").eval().requires_grad_(False)
    faces = (torch.rand(4, 3, 112, 112) * 255).requires_grad_(True)

    def arc_fb():
        arc(faces).sum().backward()

    with torch.no_grad():
        fwd = _time(lambda: arc(faces), 3)
    fb = _time(arc_fb, 3)
    print(f"ArcFace r100 (65.2 M params, random weights) on 4 faces: forward {1e3 * fwd:.0f} ms, "
          f"forward+backward to the pixels {1e3 * fb:.0f} ms ({fb / fwd:.2f}x)")
    print(json.dumps({
        "tiny_flow_step_ms": round(1e3 * flow_ckpt, 1), "tiny_id_step_ms": round(1e3 * id_ckpt, 1),
        "id_terms_step_ratio": round(id_ckpt / flow_ckpt, 2), "checkpointing_ratio": round(flow_ckpt / flow_plain, 2),
        "arcface_r100_fwd_bwd_ms_4faces": round(1e3 * fb, 1),
    }))


if __name__ == "__main__":
    main()

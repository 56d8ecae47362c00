"""Fréchet distance between image feature sets (FID-style), computed when a feature model loads.

Inception-v3 FID weights are not loadable offline here, so the features come from a CLIP vision tower
(the same ``--clip`` model) and the report labels the number "FD (CLIP features)", not Inception FID.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import linalg


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """‖μa − μb‖² + Tr(Σa + Σb − 2·(Σa·Σb)^½) between the rows of ``a`` and ``b`` (each ≥ 2 rows)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"need at least 2 feature rows per set, got {len(a)} and {len(b)}")
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():  # singular product: regularise slightly, as the reference FID code does
        off = np.eye(len(s1)) * 1e-6
        covmean = linalg.sqrtm((s1 + off) @ (s2 + off))
    covmean = np.real(covmean)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def fid_by_method(rows: list[dict[str, Any]], samples: dict[str, dict[str, Any]], scorer: Any) -> dict[str, Any]:
    """FD between GT images and each method's outputs, per subset and overall; {} entries need ≥ 2 images."""
    from ..errors import ImageLoadError

    feats: dict[str, np.ndarray | None] = {}

    def feat(path: str | None) -> np.ndarray | None:
        if not path:
            return None
        if path not in feats:
            try:
                feats[path] = scorer.image_features([path])[0]
            except ImageLoadError:
                feats[path] = None
        return feats[path]

    out: dict[str, Any] = {}
    seen = {(r["sample"], r["method"]): r for r in rows if r["status"] == "ok"}
    for sub in sorted({r["subset"] for r in seen.values()}) + ["all"]:
        for method in sorted({m for _, m in seen}):
            sel = [r for (s, m), r in seen.items() if m == method and (sub == "all" or r["subset"] == sub)]
            gts = [f for r in sel if (f := feat(samples.get(r["sample"], {}).get("gt"))) is not None]
            outs = [f for r in sel if (f := feat(r.get("output"))) is not None]
            if len(gts) >= 2 and len(outs) >= 2:
                out.setdefault(sub, {})[method] = frechet_distance(np.stack(gts), np.stack(outs))
    return out

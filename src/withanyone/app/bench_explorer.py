"""Reading a ``withanyone bench run`` results folder for the app's Bench explorer: samples, filters, and per
face Sim(GT) / Sim(Ref) / CP with the matched boxes.

Per-face similarities are recomputed from the run's embedding cache (``cache/<model key>.jsonl``, keyed by
the image content hash; references with the run's padding) and the pairs the run stored (``gt_pairs``,
``ref_pairs``); CP per face is the run's own ``cp_faces``. Without a cache file the per-face similarities
show as "–".
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..bench.cache import REF_PAD
from ..bench.runner import RESULTS, RUN_CONFIG, current_results
from ..io import read_jsonl


class ResultsFolderError(ValueError):
    """The folder is not a bench results folder; the message says what is missing."""


@dataclass
class FaceLine:
    """One generated face: its box, the matched GT / reference index and box, and its three numbers."""

    index: int
    box: list[float]
    gt_index: int | None = None
    ref_index: int | None = None
    sim_gt: float | None = None
    sim_ref: float | None = None
    cp: float | None = None


@dataclass
class MethodView:
    """One method's output for a sample."""

    method: str
    row: dict[str, Any]
    faces: list[FaceLine] = field(default_factory=list)


class BenchResults:
    """A results folder: rows of ``results.jsonl``, ``samples.json`` and the embedding caches."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder).expanduser()
        if not (self.folder / RESULTS).is_file():
            raise ResultsFolderError(f"{self.folder}: no {RESULTS} here — pick the --out folder of "
                                     "`withanyone bench run`")
        #: rows whose content keys match the files on disk now; ``stale`` holds the others (not shown)
        self.rows, self.stale = current_results(self.folder)
        if not self.rows and self.stale:
            raise ResultsFolderError(f"{self.folder / RESULTS}: all {len(self.stale)} rows are stale (outputs, GT or "
                                     "settings changed since they were scored) — rerun `withanyone bench run`")
        if not self.rows:
            raise ResultsFolderError(f"{self.folder / RESULTS} holds no rows yet")
        samples = self.folder / "samples.json"
        self.samples: dict[str, Any] = json.loads(samples.read_text()) if samples.is_file() else {}
        run = self.folder / RUN_CONFIG
        self.run: dict[str, Any] = json.loads(run.read_text()) if run.is_file() else {}
        self._caches: dict[str, dict[str, Any]] = {}

    @property
    def face_models(self) -> list[str]:
        """Face models present in the rows."""
        return sorted({r["face_model"] for r in self.rows})

    @property
    def subsets(self) -> list[str]:
        """Subsets present in the rows."""
        return sorted({str(r.get("subset")) for r in self.rows})

    @property
    def methods(self) -> list[str]:
        """Methods present in the rows."""
        return sorted({r["method"] for r in self.rows})

    def failure(self, row: dict[str, Any]) -> Any:
        """The row's failure taxonomy (``withanyone.bench.taxonomy.Taxonomy``), None when not classifiable."""
        from ..bench.taxonomy import classify_row, thresholds_by_model

        th = thresholds_by_model(self.run.get("face_models", []), [row["face_model"]]).get(row["face_model"])
        return classify_row(row, th) if th is not None else None

    def sample_list(self, face_model: str, subset: str | None = None, sort_by_cp: str = "none",
                    method: str | None = None, failure: str | None = None) -> list[tuple[str, str]]:
        """``(label, sample id)`` pairs, filtered by subset and failure label (a taxonomy label or ``none``:
        some row of the sample — of ``method`` when given — carries it) and sorted by CP (``desc``/``asc``; of
        ``method``, else the sample's highest CP); samples without CP go last."""
        by: dict[str, list[dict[str, Any]]] = {}
        for r in self.rows:
            if r["face_model"] != face_model or (subset not in (None, "", "all") and str(r.get("subset")) != subset):
                continue
            by.setdefault(r["sample"], []).append(r)
        if failure not in (None, "", "any"):
            def carries(r: dict[str, Any]) -> bool:
                t = self.failure(r)
                return t is not None and (t.primary == failure if failure == "none" else failure in t.labels)

            by = {sid: rows for sid, rows in by.items()
                  if any(carries(r) for r in rows if method in (None, "", "any") or r["method"] == method)}

        def cp_of(rows: list[dict[str, Any]]) -> float | None:
            vals = [r["cp"] for r in rows if r.get("cp") is not None and (method in (None, "", "any")
                                                                          or r["method"] == method)]
            return max(vals) if vals else None

        items = [(sid, cp_of(rows), rows[0].get("subset")) for sid, rows in by.items()]
        if sort_by_cp in ("desc", "asc"):
            have = sorted([i for i in items if i[1] is not None], key=lambda i: i[1], reverse=sort_by_cp == "desc")
            items = have + [i for i in items if i[1] is None]
        else:
            items.sort(key=lambda i: i[0])
        return [(f"{sid} [{sub}] CP {'–' if cp is None else f'{cp:+.3f}'}", sid) for sid, cp, sub in items]

    def _cache(self, face_model: str) -> dict[str, Any]:
        if face_model not in self._caches:
            entries: dict[str, Any] = {}
            for fm in self.run.get("face_models", []):
                if fm.get("name") == face_model and fm.get("key"):
                    for rec in read_jsonl(self.folder / "cache" / f"{fm['key']}.jsonl"):
                        entries[rec["key"]] = rec.get("faces") or []
            self._caches[face_model] = entries
        return self._caches[face_model]

    def _embeddings(self, path: str | None, face_model: str, pad: float | None = None) -> np.ndarray | None:
        if not path or not Path(path).is_file():
            return None
        key = hashlib.sha256(Path(path).read_bytes()).hexdigest() + (f":pad{pad:g}" if pad else "")
        faces = self._cache(face_model).get(key)
        if not faces:
            return None
        return np.asarray([f["embedding"] for f in faces], dtype=np.float64)

    def sample(self, sample_id: str, face_model: str) -> tuple[dict[str, Any], list[MethodView]]:
        """The sample's info (prompt, GT, references) and each method's output with per-face numbers."""
        info = dict(self.samples.get(sample_id, {}))
        rows = [r for r in self.rows if r["sample"] == sample_id and r["face_model"] == face_model]
        gt_emb = self._embeddings(info.get("gt"), face_model)
        ref_embs = [self._embeddings(p, face_model, REF_PAD) for p in info.get("references", [])]
        views = []
        for r in sorted(rows, key=lambda r: r["method"]):
            view = MethodView(r["method"], r)
            out_emb = self._embeddings(r.get("output"), face_model)
            g2t, g2r = dict(map(tuple, r.get("gt_pairs") or [])), dict(map(tuple, r.get("ref_pairs") or []))
            cps = r.get("cp_faces") or []
            for i, b in enumerate(r.get("out_boxes") or []):
                line = FaceLine(i, b, g2t.get(i), g2r.get(i), cp=cps[i] if i < len(cps) else None)
                if out_emb is not None and i < len(out_emb):
                    if gt_emb is not None and line.gt_index is not None and line.gt_index < len(gt_emb):
                        line.sim_gt = _cos(out_emb[i], gt_emb[line.gt_index])
                    ref = ref_embs[line.ref_index] if line.ref_index is not None and line.ref_index < len(ref_embs) \
                        else None
                    if ref is not None and len(ref):
                        line.sim_ref = _cos(out_emb[i], ref[0])
                view.faces.append(line)
            views.append(view)
        return info, views


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def open_image(path: str | None, boxes: list | None = None, labels: list[str] | None = None) -> Image.Image | None:
    """An image from the results with its face boxes drawn; None when it cannot be read."""
    from ..errors import WithAnyoneError
    from ..faces.image import load_image
    from .studio import draw_boxes

    if not path:
        return None
    try:
        image = load_image(path)
    except WithAnyoneError:
        return None
    return draw_boxes(image, [tuple(b) for b in (boxes or [])], labels, width=max(2, min(image.shape[:2]) // 150))


def fmt(v: float | None) -> str:
    """A number for the table ("–" when absent)."""
    return "–" if v is None else f"{v:+.3f}"

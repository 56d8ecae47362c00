"""``bench reproduce``: generate a method's outputs, score them, report — ending in the paper's table layout.

The table gives Sim(GT), Sim(Ref) and CP (robust means, CP gated as the paper reports it) per subset, our
measured rows beside the paper's published ones, and says which face model produced the numbers: the
paper's are insightface *buffalo_l* (ArcFace) cosines, so only numbers from that face model compare with
them in absolute terms.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..io import atomic_write_text
from .generate import GenerateStats, MethodSpec, generate
from .samples import Benchmark

#: The paper's published (Sim(GT), Sim(Ref), CP) per subset (insightface buffalo_l; None = not published).
PAPER_TABLE: dict[str, dict[str, tuple[float | None, float | None, float | None]]] = {
    "p1": {"WithAnyone": (0.460, 0.578, 0.144), "InstantID": (0.464, 0.734, 0.337),
           "PuLID": (0.452, 0.705, 0.315), "UMO": (0.458, 0.732, 0.359), "UniPortrait": (0.447, 0.677, 0.265),
           "reference-as-output": (0.521, None, 1.0)},
    "p2": {"WithAnyone": (0.405, 0.551, 0.161)},
    "p3": {"WithAnyone": (0.414, None, 0.171)},
}
PAPER_FACE_MODEL = "insightface buffalo_l (ArcFace)"


def load_benchmark(source: str | Path, caption_key: str = "prompt", split: str = "train",
                   progress: bool = True) -> Benchmark:
    """A benchmark from a folder in the authors' layout, a parquet file/folder or a hub id."""
    from .readers import read_folder_layout, read_hub

    src = Path(source)
    from .multihuman import is_multihuman, read_multihuman

    if src.is_dir() and is_multihuman(src):
        return read_multihuman(src)
    if src.is_dir() and not any(src.glob("*.parquet")):
        return read_folder_layout(src, output_name=None, caption_key=caption_key)[0]
    return read_hub(str(source), split=split, progress=progress)


def face_model_statement(summary: dict[str, Any]) -> str:
    """One sentence naming the face model(s) behind the numbers and whether they compare with the paper's."""
    models = summary.get("face_models") or []
    names = ", ".join(f"{m['name']} ({m.get('backend', '?')}, key {m.get('key', '?')})" for m in models) or "unknown"
    same = any(m.get("backend") == "insightface" and "buffalo_l" in str(m.get("key", "")) + str(m.get("name", ""))
               for m in models)
    tail = ("This is the paper's face model, so the numbers compare with its published ones." if same else
            f"The paper's numbers come from {PAPER_FACE_MODEL}; absolute values from another face model do not "
            "compare with them — compare methods within one face model.")
    norm = summary.get("cp_normalisation", "exact")
    return (f"Numbers produced by face model {names}; CP normalisation {norm}"
            f"{' (as the release evaluator)' if norm == 'release' else ''}. {tail}")


def _cell(entry: dict[str, Any] | None, metric: str) -> str:
    v = (entry or {}).get(metric)
    if not v or v.get("robust_mean") is None:
        return "–"
    return f"{v['robust_mean']:.3f}"


def paper_table(summary: dict[str, Any], face_model: str | None = None) -> str:
    """The paper's table layout in Markdown: per subset, measured methods then the published rows."""
    models = [m["name"] for m in summary.get("face_models", [])]
    fm = face_model or (models[0] if models else None)
    lines = [f"## MultiID-Bench, paper layout (face model {fm})", "",
             "| subset | method | source | n | Sim(GT) ↑ | Sim(Ref) | CP ↓ | Count acc. ↑ | ID confusion ↓ |",
             "|---|---|---|---|---|---|---|---|---|"]
    for sub in ("p1", "p2", "p3"):
        board = summary.get("leaderboard", {}).get(sub, {}).get(fm, {}) if fm else {}
        for meth, e in board.items():
            lines.append(f"| {sub} | {meth} | measured | {e['samples']} | {_cell(e, 'sim_gt')} | "
                         f"{_cell(e, 'sim_ref')} | {_cell(e, 'cp')} | {_cell(e, 'count_acc')} | "
                         f"{_cell(e, 'identity_confusion')} |")
        for meth, vals in PAPER_TABLE[sub].items():
            cells = ["–" if v is None else f"{v:.3f}" for v in vals]
            lines.append(f"| {sub} | {meth} | paper | – | {' | '.join(cells)} | – | – |")
    lines += ["", "Measured cells: robust mean (IQR-filtered, as the paper aggregates); CP only on samples passing "
              "the face model's CP gate. " + face_model_statement(summary), ""]
    return "\n".join(lines)


def reproduce(bench: Benchmark, method_name: str, out_dir: str | Path, spec: MethodSpec | None = None, *,
              face_models: Sequence[str] = ("dlib",), image_metrics: Sequence[Any] = (),
              cp_normalisation: str = "release", progress: bool = True,
              **generate_kwargs: Any) -> tuple[GenerateStats, dict[str, Any], str]:
    """Generate into ``<out>/outputs/<method>``, score into ``<out>/results``, write the reports and
    ``paper_table.md``; returns the generation stats, the summary and the table."""
    from .generate import GenerationError
    from .readers import read_method_outputs
    from .report import write_reports
    from .runner import check_face_model_spec, run_benchmark
    from .samples import Benchmark as _Benchmark

    for fm in face_models:  # a mistyped face model fails here, not after generating every image
        try:
            check_face_model_spec(fm)
        except ValueError as exc:
            raise GenerationError(f"-f {fm}: {exc}") from exc
    out_dir = Path(out_dir)
    gen_dir = out_dir / "outputs" / method_name
    for d in (out_dir, out_dir / "outputs", gen_dir, out_dir / "results"):
        if d.exists() and not d.is_dir():
            raise GenerationError(f"--out: {d} is a file, not a folder (outputs and results need folders)")
    stats = generate(bench, gen_dir, method_name, spec, progress=progress, **generate_kwargs)
    if stats.failed and not stats.generated and not stats.skipped:
        sid, err = next(iter(stats.failures.items()))
        raise GenerationError(f"every sample failed to generate ({stats.failed}), nothing to score; "
                              f"first, {sid}: {err}")
    chosen = set(json.loads((gen_dir / "generate.json").read_text())["samples"])
    sub = _Benchmark(bench.name, [s for s in bench if s.id in chosen], bench.root)
    outputs = read_method_outputs(gen_dir, method_name, sample_ids=[s.id for s in sub])
    res_dir = out_dir / "results"
    run_benchmark(sub, [outputs], res_dir, face_models=face_models, image_metrics=image_metrics,
                  progress=progress, cp_normalisation=cp_normalisation)
    summary = write_reports(res_dir, paper_points=True)
    table = paper_table(summary)
    atomic_write_text(res_dir / "paper_table.md", table)
    return stats, summary, table

"""MultiID-Bench: identity fidelity (Sim(GT), Sim(Ref)) and copy-paste, offline, with reports.

>>> from withanyone.bench import read_folder_layout, run_benchmark, write_reports
>>> bench, outputs = read_folder_layout("authors_layout/")
>>> run_benchmark(bench, [outputs], "results/")          # resumable; results.jsonl + cache/
>>> write_reports("results/")                             # summary.json, report.md, report.html
>>> generate(bench, "outputs/mine", "mine", MethodSpec("my_pkg.gen:make_image"))   # a method's outputs

Names are imported on first use, so ``withanyone.bench.cli`` (loaded by the top-level CLI) stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "metrics": ["match_faces", "copy_paste_score", "robust_mean", "bootstrap_ci", "aggregate", "score_faces",
                "cp_gate_passes", "SimGT", "SimRef", "CopyPaste", "MetricValue", "PAPER_CP_GATE"],
    "samples": ["Sample", "Benchmark", "MethodOutputs", "subset_for", "SUBSETS"],
    "readers": ["read_folder_layout", "read_method_outputs", "read_hub", "convert_hub", "BenchmarkFormatError",
                "HUB_ID"],
    "cache": ["EmbeddingCache", "CachedFaces", "pad_to_square", "REF_PAD"],
    "runner": ["run_benchmark", "load_results", "FaceModelSpec", "RunStats"],
    "report": ["summarize", "write_reports"],
    "calibration": ["build_calibration", "calibration_checks", "CALIBRATION_METHODS"],
    "generate": ["generate", "GenerationSample", "MethodSpec", "GenerateStats", "sample_seed"],
    "reproduce": ["reproduce", "paper_table", "load_benchmark", "PAPER_TABLE"],
    "multi_metrics": ["identity_confusion", "count_accuracy", "count_correct", "CP_NORMALISATIONS"],
}
_WHERE = {name: mod for mod, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    mod = _WHERE.get(name)
    if mod is None:
        raise AttributeError(f"module 'withanyone.bench' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{mod}", __name__), name)

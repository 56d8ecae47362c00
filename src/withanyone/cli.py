"""Command line: ``withanyone faces | bench | build-dataset | generate | train | app``.

Thin over library functions; each subcommand lives with its package (``<pkg>/cli.py``) and is imported
only when run, so ``withanyone faces`` never pays for torch or ray.
"""

from __future__ import annotations

import importlib
from typing import Any

import typer

app = typer.Typer(help="WithAnyone: identity-consistent multi-person generation on FLUX.1.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_show_locals=False)


def _lazy(module: str, attr: str) -> Any:
    return getattr(importlib.import_module(module), attr)


from .faces.cli import faces_command  # noqa: E402  (light: numpy/PIL/dlib only)

app.command("faces", help="Detect, embed and optionally name faces in images.")(faces_command)


def _register_optional() -> None:
    """Register subcommands whose packages exist; a missing optional dependency surfaces when run."""
    for name, module, attr, kind in [
        ("bench", "withanyone.bench.cli", "app", "group"),
        ("build-dataset", "withanyone.data.cli", "build_dataset_command", "command"),
        ("generate", "withanyone.pipeline.cli", "generate_command", "command"),
        ("train", "withanyone.train.cli", "train_command", "command"),
        ("app", "withanyone.app.cli", "app_command", "command"),
    ]:
        try:
            if importlib.util.find_spec(module) is None:
                continue
        except ModuleNotFoundError:  # the parent package is not part of this install
            continue
        obj = _lazy(module, attr)
        if kind == "group":
            app.add_typer(obj, name=name)
        else:
            app.command(name)(obj)


import importlib.util  # noqa: E402

_register_optional()


@app.command("demo")
def demo_command(out: str = typer.Option("demo-out", help="Output folder."),
                 backend: str = typer.Option("dlib", help="Face backend."),
                 samples: str = typer.Option("", help="Photo folder in the samples/faces layout (<person>/<n>.jpg, "
                                             "group/<n>.jpg, labels.json); default: the bundled copies.")) -> None:
    """Run the face demo and the MultiID-Bench calibration demo on the bundled photos; write to --out."""
    from pathlib import Path

    from rich.console import Console

    from .demo import SAMPLES, run_faces_demo

    folder = Path(samples) if samples else SAMPLES
    if not (folder / "labels.json").is_file():
        raise typer.BadParameter(f"{folder}: no labels.json (want <person>/<n>.jpg, group/<n>.jpg, labels.json)",
                                 param_hint="--samples")
    summary = run_faces_demo(Path(out), samples=folder, backend=backend)
    console = Console()
    for c in summary["checks"]:
        mark = "[green]ok[/]" if c["ok"] else "[red]WRONG[/]"
        console.print(f"{mark}  {c['image']}: expected {c['expected'] or 'unknown'}, got {c['got'] or 'unknown'}")
    console.print(f"wrote {out}/faces.json and annotated PNGs; all correct: {summary['all_correct']}")
    from .demo import run_bench_demo

    bench = run_bench_demo(Path(out) / "bench", samples=folder, backend=backend)
    for c in bench["checks"]:
        mark = "[green]ok[/]" if c["ok"] else "[red]WRONG[/]"
        val = "–" if c["value"] is None else f"{c['value']:+.3f}"
        console.print(f"{mark}  {c['check']}: {val}")
    console.print(f"MultiID-Bench calibration report: {bench['report']}")
    if not summary["all_correct"] or not bench["all_ok"]:
        raise typer.Exit(1)


def main() -> None:
    """Entry point."""
    app()


if __name__ == "__main__":
    main()

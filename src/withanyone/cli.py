"""Command line: ``withanyone faces | bench | build-dataset | generate | edit | train | app``.

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
        ("edit", "withanyone.pipeline.edit_cli", "edit_command", "command"),
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
                 samples: str = typer.Option("", help="Photo folder: <person>/<n>.jpg single-person photos, "
                                             "optionally group/<n>.jpg with labels.json at the top or in "
                                             "group/; default: the bundled copies (samples/faces).")) -> None:
    """Run the face demo and the MultiID-Bench calibration demo on a labelled photo folder; write to --out.

    Prints every check with its result, and every check the folder cannot give with the reason.
    """
    from pathlib import Path

    from rich.console import Console

    from .demo import SAMPLES, check_samples_folder, run_faces_demo

    folder = Path(samples).expanduser() if samples else SAMPLES
    try:
        check_samples_folder(folder)
        summary = run_faces_demo(Path(out), samples=folder, backend=backend)
    except (ValueError, OSError) as exc:
        typer.echo(f"error: {' '.join(str(exc).split())}", err=True)
        raise typer.Exit(1) from None
    console = Console(soft_wrap=True)
    console.print(f"[bold]faces[/] on {folder}: gallery of {len(summary['gallery'])} people, "
                  f"{len(summary['images'])} group photo(s)")
    for c in summary["checks"]:
        mark = "[green]ok[/]" if c["ok"] else "[red]WRONG[/]"
        console.print(f"{mark}  {c['image']}: expected {c['expected'] or 'unknown'}, got {c['got'] or 'unknown'}")
    for s in summary["checks_skipped"]:
        console.print(f"[yellow]skipped[/]  {s['check']}: {s['reason']}")
    console.print(f"wrote {out}/faces.json and annotated PNGs; naming checks: {len(summary['checks'])} ran, "
                  f"all correct: {summary['all_correct']}")
    from .demo import run_bench_demo

    try:
        bench = run_bench_demo(Path(out) / "bench", samples=folder, backend=backend)
    except ValueError as exc:  # too few people for a benchmark: the face checks above still stand
        console.print(f"[yellow]skipped[/]  MultiID-Bench calibration: {' '.join(str(exc).split())}")
        bench = {"checks": [], "checks_skipped": [], "all_ok": True, "report": None}
    for c in bench["checks"]:
        mark = "[green]ok[/]" if c["ok"] else "[red]WRONG[/]"
        val = "–" if c["value"] is None else f"{c['value']:+.3f}"
        console.print(f"{mark}  {c['check']}: {val}")
    for s in bench["checks_skipped"]:
        console.print(f"[yellow]skipped[/]  {s['check']}: {s['reason']}")
    if bench["report"]:
        ran = sorted({c["check"].split()[0] for c in bench["checks"]})
        console.print(f"MultiID-Bench calibration report: {bench['report']} (subsets checked: {', '.join(ran)})")
    if summary["all_correct"] is False or not bench["all_ok"]:
        raise typer.Exit(1)


def main() -> None:
    """Entry point."""
    app()


if __name__ == "__main__":
    main()

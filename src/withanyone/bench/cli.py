"""``withanyone bench run | convert | report`` (heavy imports stay inside the commands)."""

from __future__ import annotations

from pathlib import Path

import typer

app = typer.Typer(help="MultiID-Bench: identity fidelity and copy-paste, offline, with reports.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_show_locals=False)


@app.command("run")
def run_command(
    bench: str = typer.Argument(..., help="Benchmark: a folder in the authors' layout (<id>/ori.jpg, ref_k.jpg, "
                                          "meta.json), a parquet file/folder, or a hub id."),
    out: Path = typer.Option(Path("bench-out"), "--out", "-o", help="Results folder (resumable)."),
    method: list[str] = typer.Option([], "--method", "-m",
                                     help="NAME=FOLDER of a method's outputs named by sample id; repeatable."),
    output_name: str = typer.Option("out.jpg", help="Generated-image file name inside sample folders."),
    own_method: str = typer.Option("", help="Method name for the outputs inside the sample folders "
                                            "(default: the benchmark folder's name)."),
    caption_key: str = typer.Option("prompt", help="Prompt key in meta.json (e.g. caption_en)."),
    face_model: list[str] = typer.Option(["dlib"], "--face-model", "-f",
                                         help="Face model spec, repeatable: dlib | insightface:pack=antelopev2 | "
                                              "dlib:gate=0.9/0.9"),
    clip: str = typer.Option("openai/clip-vit-base-patch16",
                             help="CLIP model for CLIP-I/CLIP-T and the Fréchet distance (hub id or folder); "
                                  "'' = skip."),
    offline: bool = typer.Option(False, help="Load model weights only from local folders / the local hub "
                                             "cache (also when HF_HUB_OFFLINE=1)."),
    aesthetic: str = typer.Option("", help="Aesthetic predictor: SIGLIP_MODEL::HEAD.safetensors; empty = off."),
    paper_points: bool = typer.Option(False, help="Add the paper's published p1 points to the plot."),
    split: str = typer.Option("train", help="Split, for hub datasets."),
    workers: int = typer.Option(1, help="Processes for face detection (each loads the face model once)."),
    progress: bool = typer.Option(True, help="Show progress bars."),
) -> None:
    """Score methods on a benchmark and write results.jsonl, summary.json, report.md and report.html."""
    from rich.console import Console

    from .readers import read_folder_layout, read_hub, read_method_outputs
    from .report import write_reports
    from .runner import run_benchmark

    console = Console(stderr=True)
    src = Path(bench)
    methods = []
    if src.is_dir() and not any(src.glob("*.parquet")):
        b, own = read_folder_layout(src, output_name=output_name, caption_key=caption_key,
                                    method=own_method or None)
        if own is not None:
            methods.append(own)
    else:
        b = read_hub(bench, split=split, progress=progress)
    ids = [s.id for s in b]
    for spec in method:
        name, sep, folder = spec.partition("=")
        if not sep:
            folder, name = name, Path(name).name
        methods.append(read_method_outputs(folder, name, output_name=output_name, sample_ids=ids))
    if not methods:
        raise typer.BadParameter("no method outputs: pass --method NAME=FOLDER or keep out.jpg in sample folders")
    image_metrics = []
    if clip:
        from .clip_metrics import ClipScorer

        image_metrics.append(ClipScorer(clip, offline=offline or None))
    if aesthetic:
        from .aesthetics import AestheticScorer

        model, _, head = aesthetic.partition("::")
        image_metrics.append(AestheticScorer(model, head or None, offline=offline or None))
    for im in image_metrics:
        if not im.available:
            console.print(f"[yellow]{im.name}: not computed: {im.reason}[/]")
    stats = run_benchmark(b, methods, out, face_models=face_model, image_metrics=image_metrics, progress=progress,
                          workers=workers)
    summary = write_reports(out, paper_points=paper_points)
    console.print(f"{len(b)} samples × {len(methods)} methods × {len(face_model)} face models: "
                  f"{stats.rows_written} rows scored, {stats.rows_skipped} reused, {stats.seconds:.1f} s; "
                  f"model calls {stats.calls}")
    console.print(f"{len(summary['failures'])} failures, problems {summary['problem_counts']}")
    console.print(f"report: {out / 'report.html'}")


@app.command("convert")
def convert_command(
    source: str = typer.Argument("WithAnyone/MultiID-Bench", help="Hub id, parquet file or folder of parquet."),
    out: Path = typer.Option(Path("multiid-bench"), "--out", "-o", help="Folder to write the layout into."),
    split: str = typer.Option("train", help="Split, for hub datasets."),
    caption_key: str = typer.Option("prompt", help="Key to store the prompt under in meta.json."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
) -> None:
    """Convert the hub parquet benchmark to the authors' per-sample folder layout."""
    from .readers import convert_hub

    b = convert_hub(source, out, split=split, progress=progress, caption_key=caption_key)
    typer.echo(f"{len(b)} samples {b.subsets()} → {out}")


@app.command("report")
def report_command(
    out: Path = typer.Argument(..., help="A results folder written by `withanyone bench run`."),
    paper_points: bool = typer.Option(False, help="Add the paper's published p1 points to the plot."),
    gallery: int = typer.Option(200, help="Samples shown in the HTML gallery (0 = none)."),
) -> None:
    """Rebuild summary.json, report.md and report.html from results.jsonl."""
    from .report import write_reports

    if not (out / "results.jsonl").is_file():
        raise typer.BadParameter(f"{out}/results.jsonl not found")
    summary = write_reports(out, paper_points=paper_points, gallery=gallery > 0, max_gallery=gallery)
    typer.echo(f"{summary['rows']} rows → {out / 'report.html'}")

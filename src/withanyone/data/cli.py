"""``withanyone build-dataset``: photo collections → MultiID-2M-layout shards (light imports at the top)."""

from __future__ import annotations

from pathlib import Path

import typer


def build_dataset_command(
    input: list[str] = typer.Option([], "--input", "-i", help="Folder (<search name>/<photo>), glob, WebDataset "
                                    ".tar or CSV/Parquet manifest (path[, search_name][, caption]); repeatable. "
                                    "Quoted brace and glob patterns are expanded ('crawl-{000..099}.tar')."),
    more: list[str] = typer.Argument(None, metavar="INPUT", show_default=False,
                                     help="More inputs, taken after those of -i: several paths may follow one "
                                          "-i (as the shell expands -i crawl-{000..099}.tar)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder (resumable: rerun the same command)."),
    workers: int = typer.Option(1, "--workers", "-w", min=1, help="Ray actors for the face and write stages."),
    address: str = typer.Option(None, "--address", help="Ray cluster address (default: a local Ray)."),
    backend: str = typer.Option("dlib", "--backend", help="Face backend: dlib or insightface."),
    pack: str = typer.Option(None, "--pack", help="insightface model pack (folder, name or hub id)."),
    unit_size: int = typer.Option(16, "--unit-size", min=1, help="Photos per unit of work and per shard."),
    min_photos: int = typer.Option(2, "--min-photos", min=1, help="Reference photos an identity needs."),
    negatives: int = typer.Option(16, "--negatives", min=1, help="Reference embeddings per identity in the "
                                  "negative pool."),
    min_face_size: float = typer.Option(48.0, "--min-face-size", help="Faces smaller than this (px) are dropped."),
    min_sharpness: float = typer.Option(30.0, "--min-sharpness", help="Least variance of the Laplacian of a face."),
    no_name_folder: list[str] = typer.Option(["group", "groups"], "--no-name-folder",
                                             help="Folders of multi-person photos (no search name)."),
    fetch: bool = typer.Option(False, "--fetch", help="Download remote URLs listed in a manifest."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Start over: discard what --out holds (needed "
                                   "when settings or inputs changed)."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress bars."),
) -> None:
    """Build MultiID-2M-layout training data (train_rec, train_cp, reference bank, negatives, report)."""
    from rich.console import Console
    from rich.markup import escape

    from ..errors import WithAnyoneError
    from .filters import FilterConfig
    from .pipeline import build_dataset

    console = Console(stderr=True, soft_wrap=True)
    opts = {"pack": pack} if pack else {}
    inputs = [*input, *(more or [])]
    if not inputs:
        console.print("[red]error:[/] no input: pass --input FOLDER|GLOB|TAR|MANIFEST (several allowed)")
        raise typer.Exit(1)
    if out.exists() and not out.is_dir():
        console.print(f"[red]error:[/] --out {escape(str(out))} is a file, not a folder")
        raise typer.Exit(1)
    try:
        res = build_dataset(inputs, out, backend=backend, backend_options=opts, workers=workers, address=address,
                            unit_size=unit_size, min_photos=min_photos, negatives_per_identity=negatives,
                            filters=FilterConfig(min_face_size=min_face_size, min_sharpness=min_sharpness),
                            no_name_folders=no_name_folder, fetch=fetch, progress=progress, overwrite=overwrite)
    except WithAnyoneError as exc:
        console.print(f"[red]error:[/] {escape(str(exc))}")
        raise typer.Exit(1) from exc
    rep = res.report
    if rep.get("inputs_changed"):
        n = len(rep["inputs_changed"])
        console.print(f"[yellow]{n} input photo(s) changed content since the last run and were reprocessed[/] "
                      f"(e.g. {escape(rep['inputs_changed'][0])})")
    console.print(f"{res.photos} photos → train_rec {res.train_rec}, train_cp {res.train_cp}; "
                  f"{res.identities} identities; rejected {rep['rejected']}; wrote {out}")
    for c in rep["corrupt_inputs"][:20]:
        console.print(f"[yellow]unreadable[/] {c['source']}: {c['reason']}")
    if not res.train_rec and not res.train_cp:  # every photo failed or was rejected: nothing to train on
        why = ", ".join(f"{k} {v}" for k, v in rep["rejected"].items()) or "no photo in the inputs"
        console.print(f"[red]error:[/] no training sample written from {res.photos} photos ({escape(why)}); "
                      f"see {escape(str(out / 'report.json'))}")
        raise typer.Exit(1)

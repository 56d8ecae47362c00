"""``withanyone faces``: detect, embed and name faces from the command line."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import typer

from ..io import atomic_write_text

#: ``--draw`` with one of these suffixes (and one input image) is the output file; anything else is a folder.
DRAW_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def relative_names(paths: list[Path]) -> list[str]:
    """Each path relative to the deepest folder holding all of them (``obama/1.jpg``, ``biden/1.jpg``)."""
    if not paths:
        return []
    absolute = [os.path.abspath(p) for p in paths]
    try:
        root = os.path.commonpath([os.path.dirname(a) for a in absolute])
    except ValueError:  # different drives: no common folder
        return [str(p) for p in paths]
    return [os.path.relpath(a, root) for a in absolute]


def draw_targets(draw: Path, images: list[Path]) -> list[Path]:
    """Output PNG per image: ``draw`` itself for one image and a file name, else ``draw/<relative path>.png``.

    Keeping the relative path means ``obama/1.jpg``, ``biden/1.jpg`` and ``group/1.jpg`` never overwrite one
    another.
    """
    if len(images) == 1 and draw.suffix.lower() in DRAW_SUFFIXES and not draw.is_dir():
        return [draw]
    return [draw / Path(rel).with_suffix(".png") for rel in relative_names(images)]


def _fail(message: str) -> typer.Exit:
    """Print a one-line error (never wrapped) and return the exit to raise."""
    typer.echo(f"error: {' '.join(str(message).split())}", err=True)
    return typer.Exit(1)


def faces_command(
    images: list[Path] = typer.Argument(..., help="Image files to analyse."),
    backend: str = typer.Option("dlib", "--backend", "-b", help="Face backend: dlib (offline default) or insightface."),
    pack: str | None = typer.Option(None, help="insightface model pack: folder, name (antelopev2) or hub id."),
    min_score: float | None = typer.Option(None, "--min-score", help="Minimum detection score: dlib's HOG score "
                                           "(default: the calibrated 0.3) or insightface's det_thresh (0.5)."),
    gallery: Path | None = typer.Option(None, help="Folder of <person>/<photo> files to name faces against "
                                        "(photos with several faces are not enrolled)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    draw: Path | None = typer.Option(None, help="Write annotated PNGs: a .png file for one image, else a folder "
                                     "(relative paths kept)."),
    out_json: Path | None = typer.Option(None, "--out-json", help="Also write the JSON result to this file."),
    workers: int = typer.Option(1, help="Worker processes for many images."),
    embeddings: bool = typer.Option(False, help="Include embeddings in the JSON."),
) -> None:
    """Detect faces (box, score, 5 landmarks), embed them, and name them against --gallery.

    Exits 1 when no input image could be read or a drawing failed (the results are written first).
    """
    from rich.console import Console

    from ..errors import WithAnyoneError
    from .analyzer import FaceAnalyzer
    from .identity import Gallery

    console = Console(stderr=True)
    options: dict[str, object] = {"pack": pack} if pack else {}
    if min_score is not None:
        options["min_score" if backend == "dlib" else "det_thresh"] = min_score
    quiet = logging.getLogger("withanyone.faces.identity")  # the list below replaces the library's warning
    level = quiet.level
    try:
        analyzer = FaceAnalyzer(backend, **options)
        quiet.setLevel(logging.ERROR)
        gal = Gallery.from_folder(gallery, analyzer, workers=workers, progress=True) if gallery else None
    except (WithAnyoneError, OSError, ValueError) as exc:  # bad backend, pack or gallery: one line, no traceback
        raise _fail(str(exc)) from exc
    finally:
        quiet.setLevel(level)
    if gal is not None and gal.skipped:
        console.print(f"[yellow]gallery: {len(gal.skipped)} photo(s) not enrolled:[/]", highlight=False)
        for source, reason in gal.skipped:
            console.print(f"  {os.path.relpath(source, gallery)}: {reason}", highlight=False, soft_wrap=True)
        if gal.dropped:
            console.print(f"[yellow]gallery: no enrolled photo for {', '.join(gal.dropped)}[/]", highlight=False)

    results = analyzer.analyze_many([str(p) for p in images], workers=workers, progress=len(images) > 1)
    report, labels = [], []
    for res in results:
        names = gal.name_faces(res.faces) if gal and res.faces else [(None, None)] * len(res.faces)
        entry = {"image": res.source, "error": res.error, "width": res.size[0], "height": res.size[1], "faces": []}
        for face, (name, score) in zip(res.faces, names, strict=True):
            d = face.to_dict(with_embedding=embeddings)
            if gal is not None:
                d["name"] = name
                d["match_score"] = None if score is None else round(score, 4)
            entry["faces"].append(d)
        report.append(entry)
        labels.append([f"{n or 'unknown'} {s:.2f}" if gal else f"{f.score:.2f}"
                       for f, (n, s) in zip(res.faces, names, strict=True)])

    # results first: a drawing problem must never lose them
    text = json.dumps(report, indent=2)
    if out_json:
        try:
            atomic_write_text(out_json, text)
        except OSError as exc:
            raise _fail(f"--out-json {out_json}: cannot write ({exc.strerror or exc})") from exc
    if as_json:
        typer.echo(text)
    else:
        _print_table(report, images, analyzer.backend_name, gal is not None)
    bad = sum(1 for e in report if e["error"])
    if bad:
        console.print(f"[yellow]{bad} of {len(report)} image(s) could not be read", highlight=False)
    draw_failed = _draw_all(draw, images, results, labels, console) if draw else 0
    if (report and bad == len(report)) or draw_failed:
        raise typer.Exit(1)


def _print_table(report: list[dict], images: list[Path], backend: str, named: bool) -> None:
    """The result table on stdout; images by their path relative to the inputs' common folder, never cut."""
    from rich.console import Console
    from rich.table import Table

    shown = relative_names(images) if len(images) > 1 else [str(p) for p in images]
    table = Table(title=f"faces ({backend})")
    table.add_column("image", overflow="fold", ratio=3)
    table.add_column("face", justify="right")
    table.add_column("box", overflow="fold", ratio=2)
    table.add_column("score", justify="right")
    if named:
        table.add_column("name", overflow="fold", ratio=2)
        table.add_column("match", justify="right")
    for name, entry in zip(shown, report, strict=True):
        if entry["error"]:
            table.add_row(name, "-", f"[red]{entry['error']}", "")
            continue
        if not entry["faces"]:
            table.add_row(name, "-", "no face", "")
        for k, f in enumerate(entry["faces"]):
            row = [name, str(k), ",".join(f"{v:.0f}" for v in f["bbox"]), f"{f['score']:.2f}"]
            if named:
                row += [f.get("name") or "unknown", f"{f['match_score']:.3f}"]
            table.add_row(*row)
    Console().print(table)


def _draw_all(draw: Path, images: list[Path], results: list, labels: list[list[str]], console) -> int:
    """Annotated PNG per readable image, with a progress bar; a failed drawing is a warning, not a crash.

    Returns the number of drawings that failed.
    """
    from ..progress import track
    from .draw import draw_faces
    from .image import load_image

    targets = draw_targets(draw, images)
    todo = [(res, lab, t) for res, lab, t in zip(results, labels, targets, strict=True) if res.ok]
    failed = 0
    for res, lab, target in track(todo, total=len(todo), description="drawing", enabled=len(todo) > 1):
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            draw_faces(load_image(res.source), res.faces, lab).save(target)
        except (OSError, ValueError) as exc:
            failed += 1
            console.print(f"[yellow]cannot draw {target}: {exc}", highlight=False, soft_wrap=True)
    if todo:
        where = draw if targets != [draw] else draw.parent
        console.print(f"drew {len(todo) - failed} image(s) into {where}", highlight=False, soft_wrap=True)
    return failed

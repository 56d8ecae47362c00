"""``withanyone faces``: detect, embed and name faces from the command line."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from ..io import atomic_write_text


def faces_command(
    images: list[Path] = typer.Argument(..., help="Image files to analyse."),
    backend: str = typer.Option("dlib", "--backend", "-b", help="Face backend: dlib (offline default) or insightface."),
    pack: str | None = typer.Option(None, help="insightface model pack: folder, name (antelopev2) or hub id."),
    gallery: Path | None = typer.Option(None, help="Folder of <person>/<photo> files to name faces against."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    draw: Path | None = typer.Option(None, help="Write an annotated PNG (a folder when several images)."),
    out_json: Path | None = typer.Option(None, "--out-json", help="Also write the JSON result to this file."),
    workers: int = typer.Option(1, help="Worker processes for many images."),
    embeddings: bool = typer.Option(False, help="Include embeddings in the JSON."),
) -> None:
    """Detect faces (box, score, 5 landmarks), embed them, and name them against --gallery."""
    from rich.console import Console
    from rich.table import Table

    from .analyzer import FaceAnalyzer
    from .draw import draw_faces
    from .identity import Gallery
    from .image import load_image

    console = Console(stderr=True)
    options = {"pack": pack} if pack else {}
    analyzer = FaceAnalyzer(backend, **options)
    gal = Gallery.from_folder(gallery, analyzer, workers=workers, progress=True) if gallery else None
    results = analyzer.analyze_many([str(p) for p in images], workers=workers, progress=len(images) > 1)
    report = []
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
        if draw and res.ok:
            target = draw if len(images) == 1 else draw / (Path(res.source).stem + ".png")
            target.parent.mkdir(parents=True, exist_ok=True)
            labels = [f"{n or 'unknown'} {s:.2f}" if gal else f"{f.score:.2f}" for f, (n, s) in
                      zip(res.faces, names if gal else [(None, 0.0)] * len(res.faces), strict=True)]
            draw_faces(load_image(res.source), res.faces, labels).save(target)
    text = json.dumps(report, indent=2)
    if out_json:
        atomic_write_text(out_json, text)
    if as_json:
        typer.echo(text)
        return
    table = Table(title=f"faces ({analyzer.backend_name})")
    for col in ("image", "face", "box", "score") + (("name", "match") if gal else ()):
        table.add_column(col)
    for entry in report:
        if entry["error"]:
            table.add_row(entry["image"], "-", f"[red]{entry['error']}", "")
            continue
        if not entry["faces"]:
            table.add_row(entry["image"], "-", "no face", "")
        for k, f in enumerate(entry["faces"]):
            row = [entry["image"], str(k), ",".join(f"{v:.0f}" for v in f["bbox"]), f"{f['score']:.2f}"]
            if gal:
                row += [f.get("name") or "unknown", f"{f['match_score']:.3f}"]
            table.add_row(*row)
    Console().print(table)
    bad = sum(1 for e in report if e["error"])
    if bad:
        console.print(f"[yellow]{bad} image(s) could not be read")

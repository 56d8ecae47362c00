"""``withanyone bench run | convert | report | generate | reproduce`` (heavy imports stay inside the commands)."""

from __future__ import annotations

from pathlib import Path
from typing import NoReturn

import typer

app = typer.Typer(help="MultiID-Bench: identity fidelity and copy-paste, offline, with reports.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_show_locals=False)


def fail(message: str) -> NoReturn:
    """Print ``error: message`` on one line (no wrapping, no markup) to stderr and exit 1."""
    from rich.console import Console
    from rich.text import Text

    from ..errors import one_line

    Console(stderr=True, soft_wrap=True).print(Text.assemble(("error: ", "red"), one_line(message)))
    raise typer.Exit(1)


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        fail(f"--out {out} is a file, not a folder (results need a folder)")


def _is_arcface_spec(spec: str) -> bool:
    return spec.partition(":")[0].strip() != "dlib"


def _check_face_models(specs: list[str]) -> None:
    """Refuse a malformed ``-f`` spec or an unknown backend before anything loads."""
    from .runner import check_face_model_spec

    for text in specs:
        try:
            check_face_model_spec(text)
        except ValueError as exc:
            fail(f"-f {text}: {exc}")


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
                                             "cache (also when HF_HUB_OFFLINE=1 or the hub is unreachable)."),
    aesthetic: str = typer.Option("", help="Aesthetic predictor: SIGLIP_MODEL::HEAD.safetensors; empty = off."),
    paper_points: bool = typer.Option(False, help="Add the paper's published p1 points to the plot (ArcFace-scale "
                                                  "face models only)."),
    split: str = typer.Option("train", help="Split, for hub datasets."),
    workers: int = typer.Option(1, help="Processes for face detection (each loads the face model once)."),
    progress: bool = typer.Option(True, help="Show progress bars."),
    cp_normalisation: str = typer.Option("release", help="CP angles from x/(‖x‖+1e-6) as the release's evaluator "
                                                         "(release, default) or from unit vectors (exact)."),
    hps: Path = typer.Option(None, "--hps", help="HPSv2.1 weights file (HPS_v2.1_compressed.pt or .safetensors; "
                                                 "needs open_clip) for MultiHuman-Testbench's HPS; none = not computed."),
    action_scorer: str = typer.Option("", help="Local MLLM for MultiHuman-Testbench's action score: module:callable, "
                                               "f(questions, PIL image) -> one digit per question; '' = not computed."),
) -> None:
    """Score methods on a benchmark and write results.jsonl, summary.json, report.md and report.html."""
    from rich.console import Console
    from rich.markup import escape

    from ..errors import WithAnyoneError
    from .readers import read_folder_layout, read_hub, read_method_outputs
    from .report import write_reports
    from .runner import run_benchmark

    console = Console(stderr=True)
    _check_out(out)
    _check_face_models(face_model)
    if paper_points and not any(_is_arcface_spec(f) for f in face_model):
        fail("--paper-points: the paper's points are ArcFace (buffalo_l) cosines and this run scores with dlib "
             "only, whose cosines are another scale; add an ArcFace face model (-f insightface:...) or drop it")
    if cp_normalisation not in ("release", "exact"):
        fail(f"--cp-normalisation {cp_normalisation!r}: expected release or exact")
    methods = []
    try:
        src = Path(bench).expanduser()
        from .multihuman import is_multihuman, read_multihuman

        if src.is_dir() and is_multihuman(src):
            b, own = read_multihuman(src, output_name=output_name, method=own_method or None)
            if own is not None:
                methods.append(own)
        elif src.is_dir() and not any(src.glob("*.parquet")):
            b, own = read_folder_layout(src, output_name=output_name, caption_key=caption_key,
                                        method=own_method or None)
            if own is not None:
                methods.append(own)
        else:
            b = read_hub(bench, split=split, progress=progress, offline=offline or None)
        ids = [s.id for s in b]
        for spec in method:
            name, sep, folder = spec.partition("=")
            if not sep:
                folder, name = name, Path(name).name
            methods.append(read_method_outputs(folder, name, output_name=output_name, sample_ids=ids))
    except WithAnyoneError as exc:
        fail(str(exc))
    names = [m.name for m in methods]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        fail(f"method name {', '.join(dup)} given more than once (-m NAME=FOLDER; the benchmark folder's own "
             "outputs use --own-method); give each method its own name")
    if not methods:
        fail("no method outputs: pass --method NAME=FOLDER or keep out.jpg in sample folders")
    for s in b:
        if s.meta.get("_meta_error"):
            console.print(f"[yellow]warning:[/] {escape(str(s.meta['_meta_error']))} (sample kept without it)",
                          soft_wrap=True)
    image_metrics = []
    if clip:
        from .clip_metrics import ClipScorer

        image_metrics.append(ClipScorer(clip, offline=offline or None))
    if aesthetic:
        from .aesthetics import AestheticScorer

        model, _, head = aesthetic.partition("::")
        image_metrics.append(AestheticScorer(model, head or None, offline=offline or None))
    if hps is not None or action_scorer:
        from .multihuman import ActionScorer, HPSScorer

        image_metrics += [HPSScorer(hps)] if hps is not None else []
        image_metrics += [ActionScorer(action_scorer)] if action_scorer else []
    for im in image_metrics:
        if not im.available:
            console.print(f"[yellow]{im.name}: not computed: {escape(str(im.reason))}[/]", soft_wrap=True)
    try:
        stats = run_benchmark(b, methods, out, face_models=face_model, image_metrics=image_metrics,
                              progress=progress, workers=workers, cp_normalisation=cp_normalisation)
    except WithAnyoneError as exc:
        fail(str(exc))
    summary = write_reports(out, paper_points=paper_points)
    console.print(f"{len(b)} samples × {len(methods)} methods × {len(face_model)} face models: "
                  f"{stats.rows_written} rows scored, {stats.rows_skipped} reused, {stats.seconds:.1f} s; "
                  f"model calls {stats.calls}")
    if stats.rows_rescored:
        why = ", ".join(f"{k}: {v}" for k, v in stats.rescore_reasons.items())
        console.print(f"[yellow]{stats.rows_rescored} rows rescored because their inputs changed[/] ({why})",
                      soft_wrap=True)
    console.print(f"{len(summary['failures'])} failures, problems {summary['problem_counts']}")
    from .taxonomy import taxonomy_lines

    for line in taxonomy_lines(summary):
        console.print(line)
    console.print(f"report: {out / 'report.html'}")
    _report_stale(console, summary)
    total = stats.rows_written + stats.rows_skipped
    if total and stats.rows_failed == total:
        first = next(iter(stats.failure_reasons))
        fail(f"every row of this run failed: none could be scored ({total} of {total}); most common reason: "
             f"{first}")


def _report_stale(console, summary: dict) -> None:
    """Say which stored rows the report left out as stale (their files or settings changed since)."""
    from rich.markup import escape

    from .report import stale_sentence

    stale = stale_sentence(summary)
    if stale:
        console.print(f"[yellow]warning:[/] {escape(stale)}", soft_wrap=True)


@app.command("convert")
def convert_command(
    source: str = typer.Argument("WithAnyone/MultiID-Bench", help="Hub id, parquet file or folder of parquet; or "
                                 "'multihuman-testbench' (with --repo, --faces)."),
    out: Path = typer.Option(None, "--out", "-o", help="Folder to write the layout into (default multiid-bench, "
                                                       "or multihuman-testbench)."),
    repo: Path = typer.Option(None, "--repo", help="multihuman-testbench: the MultiHuman-Testbench checkout."),
    faces: Path = typer.Option(None, "--faces", help="multihuman-testbench: the downloaded faces folder "
                                                     "(default REPO/data/faces)."),
    limit: int = typer.Option(None, help="multihuman-testbench: only the first N prompts."),
    split: str = typer.Option("train", help="Split, for hub datasets."),
    caption_key: str = typer.Option("prompt", help="Key to store the prompt under in meta.json."),
    offline: bool = typer.Option(False, help="Never ask the hub (also when HF_HUB_OFFLINE=1 or it is "
                                             "unreachable): SOURCE must be a local file or folder."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
) -> None:
    """Convert the hub parquet benchmark (or a MultiHuman-Testbench checkout) to the per-sample folder layout."""
    from ..errors import WithAnyoneError
    from .readers import convert_hub

    if source == "multihuman-testbench":
        _convert_multihuman(repo, faces, out or Path("multihuman-testbench"), limit, progress)
        return
    out = out or Path("multiid-bench")
    _check_out(out)
    try:
        b = convert_hub(source, out, split=split, progress=progress, caption_key=caption_key,
                        offline=offline or None)
    except WithAnyoneError as exc:
        fail(str(exc))
    typer.echo(f"{len(b)} samples {b.subsets()} → {out}")


def _convert_multihuman(repo: Path | None, faces: Path | None, out: Path, limit: int | None, progress: bool) -> None:
    """``bench convert multihuman-testbench``: convert, then list what is missing (not fatal)."""
    from ..errors import WithAnyoneError
    from .multihuman import convert_multihuman

    if repo is None:
        fail("multihuman-testbench: --repo DIR (the MultiHuman-Testbench checkout) is required")
    if limit is not None and limit < 1:
        fail(f"--limit must be at least 1 (the first N prompts), got {limit}")
    _check_out(out)
    try:
        b, rep = convert_multihuman(repo, out, faces=faces, limit=limit, progress=progress)
    except WithAnyoneError as exc:
        fail(str(exc))
    splits = {s: sum(1 for x in b if x.meta.get("split") == s) for s in ("simple", "complex")}
    people = {k: sum(1 for x in b if x.num_persons == k) for k in sorted({x.num_persons for x in b})}
    typer.echo(f"{len(b)} samples ({rep.written} written, {rep.kept} unchanged) {splits}, by people {people} → {out}")
    for note in rep.notes:
        typer.echo(f"warning: {note}", err=True)
    if rep.missing_faces:
        shown = ", ".join(f"{i}:{Path(f).name}" for i, f in rep.missing_faces[:10])
        typer.echo(f"warning: {len(rep.missing_faces)} reference face(s) missing (listed in {out / 'multihuman.json'}; "
                   f"those samples score without them): {shown}{' …' if len(rep.missing_faces) > 10 else ''}", err=True)
    if rep.missing_poses:
        typer.echo(f"warning: {len(rep.missing_poses)} pose image(s) missing", err=True)
    if rep.no_prior:
        typer.echo(f"warning: {len(rep.no_prior)} sample(s) without regional-prior boxes (--layout prior falls back "
                   f"to the automatic layout for them); first: {rep.no_prior[0][0]}: {rep.no_prior[0][1]}", err=True)


@app.command("report")
def report_command(
    out: Path = typer.Argument(..., help="A results folder written by `withanyone bench run`."),
    paper_points: bool = typer.Option(False, help="Add the paper's published p1 points to the plot (ArcFace-scale "
                                                  "face models only)."),
    gallery: int = typer.Option(200, help="Samples shown in the HTML gallery (0 = none)."),
) -> None:
    """Rebuild summary.json, report.md and report.html from results.jsonl."""
    import json

    from .report import write_reports

    if not (out / "results.jsonl").is_file():
        fail(f"{out}/results.jsonl not found (not a results folder of `withanyone bench run`)")
    if paper_points:
        try:
            cfg = json.loads((out / "run.json").read_text())
            backends = [f.get("backend") for f in cfg.get("face_models", [])]
        except (OSError, ValueError, AttributeError):
            backends = []
        if backends and all(b == "dlib" for b in backends):
            fail(f"--paper-points: the paper's points are ArcFace (buffalo_l) cosines and {out} was scored with "
                 "dlib only, whose cosines are another scale")
    summary = write_reports(out, paper_points=paper_points, gallery=gallery > 0, max_gallery=gallery)
    typer.echo(f"{summary['rows']} rows → {out / 'report.html'}")
    from rich.console import Console

    _report_stale(Console(stderr=True), summary)


_GEN_HELP = {
    "pipeline": "'withanyone' (our pipeline) or module:callable, f(GenerationSample) -> PIL.Image "
                "(a class is instantiated once per worker); see docs/bench.md.",
    "tiny": "Use the tiny random pipeline (offline; images are noise) — the whole loop on CPU.",
    "subset": "Only this subset: p1, p2, p3 or p34 (= p3); simple or complex (MultiHuman-Testbench).",
    "workers": "CPU workers (Ray actors, one thread each); 1 runs in this process.",
    "num_gpus": "GPUs to use: one Ray actor per device, each loading the pipeline once.",
    "address": "Ray cluster address (ray://host:10001); the package must be importable there.",
}


def _spec(pipeline: str, tiny: bool, steps: int | None, guidance: float, base: str, adapter: str,
          memory: dict | None = None):
    from .generate import MethodSpec

    pretrained = {k: v for k, v in (("base", base), ("adapter", adapter)) if v}
    return MethodSpec(pipeline=pipeline, tiny=tiny, steps=steps, guidance=guidance, pretrained=pretrained,
                      memory={k: v for k, v in (memory or {}).items() if v})


def _memory_settings(low_vram: str, base_quantization: str, adapter_quantization: str, offload: str,
                     transformer_file: str) -> dict:
    """The memory options, checked here (one error line) before the benchmark or any model loads."""
    from ..pipeline import memory

    settings = {"low_vram": low_vram or None, "base_quantization": base_quantization or None,
                "adapter_quantization": adapter_quantization or None, "offload": offload or None}
    try:
        mem = memory.resolve_memory(settings["low_vram"], **{k: v for k, v in settings.items() if k != "low_vram"})
    except memory.MemoryConfigError as exc:
        fail(str(exc))
    why = memory.check_available(mem, None, transformer_file or None)
    if why:
        fail(why)
    return {**settings, "transformer_file": transformer_file or None}


@app.command("generate")
def generate_command(
    bench: str = typer.Argument(..., help="Benchmark: authors' layout folder, parquet file/folder or hub id."),
    method: str = typer.Option(..., "--method", "-m", help="Method name (the output folder's method)."),
    out: Path = typer.Option(None, "--out", "-o", help="Output folder (default bench-gen/<method>); resumable."),
    pipeline: str = typer.Option("withanyone", help=_GEN_HELP["pipeline"]),
    tiny: bool = typer.Option(False, help=_GEN_HELP["tiny"]),
    subset: str = typer.Option("", help=_GEN_HELP["subset"]),
    limit: int = typer.Option(None, help="At most this many samples (after --subset)."),
    layout: str = typer.Option("prior", help="prior: the benchmark's face boxes (MultiID-Bench GT faces; "
                                             "MultiHuman-Testbench pose heads); auto: our automatic layout."),
    seed: int = typer.Option(0, help="Base seed; each sample's seed is derived from it and its id."),
    size: int = typer.Option(None, help="Longer side of the output (GT aspect ratio kept); default 1024, tiny 64."),
    height: int = typer.Option(None, help="Fixed output height (with --width)."),
    width: int = typer.Option(None, help="Fixed output width (with --height)."),
    steps: int = typer.Option(None, help="Sampler steps (default 25; tiny 2)."),
    guidance: float = typer.Option(4.0, help="FLUX-dev distilled guidance."),
    base: str = typer.Option("", help="FLUX base (hub id or folder) for --pipeline withanyone."),
    adapter: str = typer.Option("", help="WithAnyone adapter (hub id, folder or .safetensors)."),
    workers: int = typer.Option(1, help=_GEN_HELP["workers"]),
    num_gpus: int = typer.Option(0, "--num-gpus", help=_GEN_HELP["num_gpus"]),
    address: str = typer.Option("", help=_GEN_HELP["address"]),
    caption_key: str = typer.Option("prompt", help="Prompt key in meta.json."),
    split: str = typer.Option("train", help="Split, for hub datasets."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
    low_vram: str = typer.Option("", "--low-vram", help="Memory preset: none, model-offload, group-offload, nf4, "
                                 "24gb, 16gb, 12gb, 8gb (docs/pipeline.md)."),
    base_quantization: str = typer.Option("", help="Transformer storage: bf16, fp8, int8, nf4 (overrides "
                                          "--low-vram)."),
    adapter_quantization: str = typer.Option("", help="Adapter storage: bf16, fp8, int8 (overrides --low-vram)."),
    offload: str = typer.Option("", help="none, model or group (overrides --low-vram)."),
    transformer_file: str = typer.Option("", help="Single-file transformer: GGUF or fp8 .safetensors."),
) -> None:
    """Generate a method's output for every benchmark sample (<out>/<id>.png + <id>.json sidecar)."""
    from ..errors import WithAnyoneError
    from .generate import generate
    from .reproduce import load_benchmark

    _check_out(out or Path("bench-gen") / method)
    memory = _memory_settings(low_vram, base_quantization, adapter_quantization, offload, transformer_file)
    try:
        b = load_benchmark(bench, caption_key=caption_key, split=split, progress=progress)
        stats = generate(b, out or Path("bench-gen") / method, method,
                         _spec(pipeline, tiny, steps, guidance, base, adapter, memory), subset=subset or None,
                         limit=limit,
                         seed=seed, long_side=size or (64 if tiny else 1024), height=height, width=width,
                         workers=workers, num_gpus=num_gpus, address=address or None, progress=progress,
                         layout=layout)
    except WithAnyoneError as exc:
        fail(str(exc))
    typer.echo(f"{stats.generated} generated, {stats.skipped} already done, {stats.failed} failed "
               f"({stats.engine}, {stats.workers} worker(s), {stats.seconds:.1f} s) → {out or Path('bench-gen') / method}")
    _report_generation(stats)


def _report_generation(stats) -> None:
    """Regenerated outputs and why, other-settings outputs kept, failures; exit 1 when every sample failed."""
    if stats.regenerated:
        why = ", ".join(f"{k}: {v}" for k, v in stats.regenerate_reasons.items())
        typer.echo(f"{stats.regenerated} output(s) made with other settings were generated again ({why})",
                   err=True)
    if stats.other_settings_kept:
        typer.echo(f"warning: the folder also holds {stats.other_settings_kept} output(s) outside this selection "
                   "made with another seed or generator; `bench run` on the folder would score them too", err=True)
    for sid, err in stats.failures.items():
        typer.echo(f"failed {sid}: {err}", err=True)
    if stats.failed and not stats.generated and not stats.skipped:
        fail(f"every sample failed ({stats.failed}); first: {next(iter(stats.failures.values()))}")


@app.command("reproduce")
def reproduce_command(
    bench: str = typer.Argument(..., help="Benchmark: authors' layout folder, parquet file/folder or hub id."),
    method: str = typer.Option(..., "--method", "-m", help="Method name."),
    out: Path = typer.Option(Path("bench-reproduce"), "--out", "-o",
                             help="Folder: outputs/<method>/ (generated) and results/ (scores, reports)."),
    pipeline: str = typer.Option("withanyone", help=_GEN_HELP["pipeline"]),
    tiny: bool = typer.Option(False, help=_GEN_HELP["tiny"]),
    subset: str = typer.Option("", help=_GEN_HELP["subset"]),
    limit: int = typer.Option(None, help="At most this many samples (after --subset)."),
    seed: int = typer.Option(0, help="Base seed."),
    size: int = typer.Option(None, help="Longer side of the output; default 1024, tiny 64."),
    steps: int = typer.Option(None, help="Sampler steps (default 25; tiny 2)."),
    guidance: float = typer.Option(4.0, help="FLUX-dev distilled guidance."),
    base: str = typer.Option("", help="FLUX base (hub id or folder)."),
    adapter: str = typer.Option("", help="WithAnyone adapter (hub id, folder or .safetensors)."),
    workers: int = typer.Option(1, help=_GEN_HELP["workers"]),
    num_gpus: int = typer.Option(0, "--num-gpus", help=_GEN_HELP["num_gpus"]),
    address: str = typer.Option("", help=_GEN_HELP["address"]),
    face_model: list[str] = typer.Option(["dlib"], "--face-model", "-f", help="Face model spec, repeatable."),
    cp_normalisation: str = typer.Option("release", help="release (‖x‖+1e-6, as the release's evaluator) | exact."),
    caption_key: str = typer.Option("prompt", help="Prompt key in meta.json."),
    split: str = typer.Option("train", help="Split, for hub datasets."),
    progress: bool = typer.Option(True, help="Show progress bars."),
) -> None:
    """Generate → score → report in one command, ending with the paper's table layout."""
    from rich.console import Console

    from ..errors import WithAnyoneError
    from .reproduce import load_benchmark, reproduce

    if cp_normalisation not in ("release", "exact"):
        fail(f"--cp-normalisation {cp_normalisation!r}: expected release or exact")
    _check_out(out)
    _check_face_models(face_model)  # before generating: a mistyped -f must not cost a generation run
    try:
        b = load_benchmark(bench, caption_key=caption_key, split=split, progress=progress)
        stats, summary, table = reproduce(
            b, method, out, _spec(pipeline, tiny, steps, guidance, base, adapter), face_models=face_model,
            cp_normalisation=cp_normalisation, progress=progress, subset=subset or None, limit=limit, seed=seed,
            long_side=size or (64 if tiny else 1024), workers=workers, num_gpus=num_gpus, address=address or None)
    except WithAnyoneError as exc:
        fail(str(exc))
    console = Console()
    console.print(f"generated {stats.generated}, reused {stats.skipped}, failed {stats.failed}")
    _report_generation(stats)
    typer.echo(table)
    console.print(f"report: {out / 'results' / 'report.html'}")

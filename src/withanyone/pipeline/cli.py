"""``withanyone generate``: one image of 1–4 reference people, plus a JSON sidecar to reproduce it."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import typer

#: Output side and steps of ``--tiny`` (a random 2-block FLUX: seconds on a CPU).
TINY_SIZE = 64
TINY_STEPS = 4
#: What a ``--tiny`` run says about its image, on the console and in the sidecar.
TINY_NOTE = ("tiny random model (--tiny): the image is noise from random weights, not a WithAnyone generation; "
             "it shows the generate path runs")


#: Output suffixes the image writer knows (anything else is refused before loading).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
_CHOICES = {"--timestep-shift": ("release", "flux"), "--noise": ("release", "cpu"),
            "--reference-face": ("score", "largest"),
            "--dtype": ("auto", "bfloat16", "float16", "float32")}


def _parse_box(text: str) -> tuple[float, float, float, float]:
    parts = [p for p in text.replace(" ", "").split(",") if p]
    if len(parts) != 4:
        raise ValueError(f"--box {text!r}: want x1,y1,x2,y2 in pixels")
    try:
        x1, y1, x2, y2 = (float(p) for p in parts)
    except ValueError as exc:
        raise ValueError(f"--box {text!r}: not numbers (want x1,y1,x2,y2 in pixels)") from exc
    return x1, y1, x2, y2


def download_hint(base: str) -> str:
    """How to get a FLUX base that is missing (FLUX.1-dev is gated: licence and login first)."""
    from ..hub import download_hint as hint

    return hint(base)


def validate_generate_args(refs: list[str], height: int, width: int, steps: int, layout: Path | None,
                           box: list[str] | None = None, out: Path | None = None,
                           options: dict[str, str] | None = None) -> list[tuple[float, float, float, float]] | None:
    """Reject bad --box values, --ref/--layout files, sizes FLUX cannot make, an --out that is a folder and
    unknown choices, before any weights load; returns the parsed boxes (None without --box).

    Raises ``ValueError`` with a one-line message naming the argument.
    """
    from ..errors import ImageLoadError
    from ..faces.image import load_image
    for flag, value in (options or {}).items():
        if value not in _CHOICES[flag]:
            *rest, last = _CHOICES[flag]
            raise ValueError(f"{flag} {value!r}: choose {', '.join(rest) + ' or ' if rest else ''}{last}")
    for flag, v in (("--height", height), ("--width", width)):
        if v < 16 or v % 16:
            near = sorted({max(16, v // 16 * 16), v // 16 * 16 + 16})
            raise ValueError(f"{flag} {v}: must be a positive multiple of 16 pixels (FLUX: 8x VAE, 2x2 patches); "
                             f"e.g. {' or '.join(map(str, near))}")
    if steps < 1:
        raise ValueError(f"--steps {steps}: must be at least 1")
    boxes = None
    if box:
        if layout is not None:
            raise ValueError("give either --box or --layout, not both")
        parsed = [_parse_box(b) for b in box]
        if len(parsed) != len(refs):
            raise ValueError(f"{len(parsed)} --box for {len(refs)} --ref: give one box per reference, in order")
        for text, (x1, y1, x2, y2) in zip(box, parsed, strict=True):
            if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
                raise ValueError(f"--box {text}: holds NaN or infinity")
            if x2 <= x1 or y2 <= y1:
                raise ValueError(f"--box {text}: empty box: need x2 > x1 and y2 > y1 (x1,y1 is the top-left corner)")
            if x2 <= 0 or y2 <= 0 or x1 >= width or y1 >= height:
                raise ValueError(f"--box {text}: lies entirely outside the {width}x{height} image")
        boxes = parsed
    if out is not None:
        if out.is_dir() or str(out).endswith(("/", "\\")):
            raise ValueError(f"--out {out}: is a folder; give an image file name, e.g. {Path(out) / 'out.png'}")
        if out.suffix.lower() not in IMAGE_SUFFIXES:
            raise ValueError(f"--out {out}: unknown image type {out.suffix or '(no suffix)'!r}; use "
                             f"{', '.join(IMAGE_SUFFIXES)}")
        parent = out.parent
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
        if parent.exists() and not parent.is_dir():
            raise ValueError(f"--out {out}: {parent} is a file, not a folder")
    files = [("--ref", Path(r)) for r in refs] + ([("--layout", layout)] if layout is not None else [])
    for flag, path in files:
        if not path.exists():
            raise ValueError(f"{flag} {path}: no such file")
        if not path.is_file():
            raise ValueError(f"{flag} {path}: is a folder, not a file")
        if path.suffix.lower() != ".npy":
            try:
                load_image(path)
            except ImageLoadError as exc:
                raise ValueError(f"{flag} {path}: {exc.reason}") from exc
    return boxes


def prepare_faces(refs: list[str], layout: Path | None, boxes: list | None, height: int, width: int, *,
                  tiny: bool, face_pack: str, need_crop: bool, reference_face: str) -> tuple[Any, list, Any]:
    """The face analyzer, each reference's :class:`~withanyone.pipeline.Reference` and the boxes (a layout
    photo's faces mapped to the output), computed before FLUX loads so a photo without a face fails first."""
    from ..faces import FaceAnalyzer
    from .layout import resolve_boxes
    from .references import ARCFACE_DIM, DLIB_DIM, REFERENCE_DET_THRESH, prepare_references

    photos = any(not str(r).endswith(".npy") for r in refs) or layout is not None
    analyzer = None
    if photos:
        if tiny:
            analyzer = FaceAnalyzer("dlib")
        else:
            analyzer = FaceAnalyzer("insightface", pack=str(face_pack), det_thresh=REFERENCE_DET_THRESH)
    dim = DLIB_DIM if tiny else ARCFACE_DIM
    references = prepare_references(refs, analyzer, need_crop=need_crop, dim=dim, reference_face=reference_face)
    for r, path in zip(references, refs, strict=True):
        r.source = str(path)
    if layout is not None:
        boxes = resolve_boxes(str(layout), len(refs), height, width, analyzer=analyzer)
    return analyzer, references, boxes


def generate_command(
    prompt: str = typer.Option(..., "--prompt", "-p", help="What to draw."),
    ref: list[str] = typer.Option(..., "--ref", "-r", help="Reference per person: a photo or a .npy ArcFace "
                                  "embedding; repeat, in the order of --box."),
    out: Path = typer.Option(Path("out.png"), "--out", "-o", help="Output image (a .json sidecar goes beside it)."),
    box: list[str] | None = typer.Option(None, "--box", help="Face box x1,y1,x2,y2 in output pixels, one per "
                                            "--ref (default: automatic placement)."),
    layout: Path | None = typer.Option(None, "--layout", help="Photo whose faces give the boxes (left to right)."),
    id_weight: float = typer.Option(1.0, "--id-weight", help="ArcFace branch weight."),
    siglip_weight: float = typer.Option(0.0, "--siglip-weight", help="SigLIP branch weight (0: SigLIP not loaded)."),
    seed: int | None = typer.Option(None, "--seed", help="Random seed (default: drawn and recorded)."),
    height: int | None = typer.Option(None, "--height", help="Output height in pixels (multiple of 16; default "
                                      "1024, --tiny 64)."),
    width: int | None = typer.Option(None, "--width", help="Output width in pixels (multiple of 16; default 1024, "
                                     "--tiny 64)."),
    steps: int | None = typer.Option(None, "--steps", help="Denoising steps (default 25, --tiny 4)."),
    guidance: float = typer.Option(4.0, "--guidance", help="FLUX-dev distilled guidance."),
    base: str = typer.Option("black-forest-labs/FLUX.1-dev", "--base", help="FLUX hub id or diffusers folder; "
                             "kontext = FLUX.1-Kontext-dev with the WithAnyone.K adapter."),
    adapter: str = typer.Option("WithAnyone/WithAnyone", "--adapter", help="Adapter hub id, folder or .safetensors."),
    siglip: str = typer.Option("google/siglip-base-patch16-256-i18n", "--siglip", help="SigLIP hub id or folder."),
    face_pack: str = typer.Option("antelopev2", "--face-pack", help="insightface pack (name or folder)."),
    lora: list[str] | None = typer.Option(None, "--lora", help="LoRA file/folder/hub id to load (repeatable)."),
    lora_scale: float = typer.Option(1.0, "--lora-scale", help="Scale of the LoRA(s)."),
    dtype: str = typer.Option("auto", "--dtype", help="bfloat16, float16, float32 or auto (bf16 on GPU, fp32 on CPU)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda (cuda:N), mps or xpu."),
    offload: bool = typer.Option(False, "--offload", help="Model CPU offload (= --low-vram model-offload)."),
    low_vram: str | None = typer.Option(None, "--low-vram", help="Memory preset: none, model-offload, group-offload, "
                                        "nf4, 24gb, 16gb, 12gb, 8gb (docs/pipeline.md)."),
    base_quantization: str | None = typer.Option(None, "--base-quantization", help="Transformer storage: bf16, "
                                                 "fp8, int8 or nf4 (CUDA); overrides --low-vram."),
    adapter_quantization: str | None = typer.Option(None, "--adapter-quantization", help="Adapter storage: bf16, "
                                                    "fp8 or int8; overrides --low-vram."),
    text_encoder_quantization: str | None = typer.Option(None, "--text-encoder-quantization", help="T5 storage: "
                                                         "bf16, fp8 or int8; overrides --low-vram."),
    transformer_file: Path | None = typer.Option(None, "--transformer-file", help="Single-file transformer instead "
                                                 "of the base's: GGUF (Q8_0, Q5/Q4, K-quants) or fp8 .safetensors."),
    offline: bool = typer.Option(False, "--offline", help="Use only files already on disk / in the hub cache."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
    timestep_shift: str = typer.Option("release", "--timestep-shift", help="release (the authors' inference) or "
                                       "flux (diffusers' FluxPipeline: stronger shift at large sizes)."),
    noise: str = typer.Option("release", "--noise", help="release (seed drawn on the device in the model dtype, "
                              "as the authors' inference) or cpu (FluxPipeline from a CPU generator)."),
    reference_face: str = typer.Option("score", "--reference-face", help="Face of a multi-face reference photo: "
                                       "score (highest detector score, the release's) or largest."),
    matting: bool = typer.Option(False, "--matting/--no-matting", help="Remove the background of the reference "
                                 "crops before SigLIP (needs --siglip-weight > 0)."),
    matting_model: str = typer.Option("briaai/RMBG-2.0", "--matting-model", help="Segmentation model for --matting "
                                      "(hub id or folder)."),
    tiny: bool = typer.Option(False, "--tiny", help="Tiny random model, no weights needed (dlib faces; the image "
                              "is noise): the whole generate path on CPU in seconds."),
) -> None:
    """Generate an image of the --ref people (their faces in --box / --layout / automatic boxes)."""
    from rich.console import Console

    console = Console(stderr=True)
    height = height if height is not None else (TINY_SIZE if tiny else 1024)
    width = width if width is not None else (TINY_SIZE if tiny else 1024)
    steps = steps if steps is not None else (TINY_STEPS if tiny else 25)

    from rich.markup import escape

    def fail(message: object) -> typer.Exit:
        console.print(f"[red]error:[/] {escape(str(message))}", highlight=False, soft_wrap=True)
        return typer.Exit(1)

    try:  # every cheap check first: nothing heavy has loaded yet
        boxes = validate_generate_args(list(ref), height, width, steps, layout, box=list(box or []), out=out,
                                       options={"--timestep-shift": timestep_shift, "--noise": noise,
                                                "--reference-face": reference_face, "--dtype": dtype})
        from .device import resolve_device

        device = resolve_device(device)
        from . import memory

        mem = memory.resolve_memory(low_vram, base_quantization=base_quantization,
                                    adapter_quantization=adapter_quantization, offload=offload or None,
                                    text_encoder_quantization=text_encoder_quantization)
        why = memory.check_available(mem, device, transformer_file)
        if why:
            raise ValueError(why)
    except ValueError as exc:
        raise fail(exc) from exc

    import torch

    from ..errors import WithAnyoneError

    if dtype == "auto":
        dtype = "bfloat16" if device.startswith("cuda") else "float32"
    torch_dtype = getattr(torch, dtype)
    from .kontext_source import is_kontext_base, resolve_kontext_base

    kontext = is_kontext_base(base)  # WithAnyone.K: text-to-image on FLUX.1 Kontext
    base = resolve_kontext_base(base)
    if tiny:
        dtype = "float32"
    else:  # the base's files exist (locally, or cached when offline) before the face model loads
        from .loading import check_base

        try:
            check_base(base, None, offline or None, skip=("transformer",) if transformer_file is not None else ())
        except (WithAnyoneError, FileNotFoundError) as exc:
            hub_id = re.fullmatch(r"[\w.-]+/[\w.-]+", base) is not None and not Path(base).exists()
            raise fail(f"{exc}; {download_hint(base)}" if hub_id and "hf download" not in str(exc) else exc) from exc

    import warnings

    try:  # the faces of every reference photo and of the layout photo, before FLUX loads (~35 GB)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", UserWarning)
            analyzer, references, boxes = prepare_faces(list(ref), layout, boxes, height, width, tiny=tiny,
                                                        face_pack=face_pack, need_crop=siglip_weight > 0,
                                                        reference_face=reference_face)
    except (WithAnyoneError, ValueError, FileNotFoundError) as exc:
        raise fail(" ".join(str(exc).split())) from exc
    for w in caught:  # e.g. a reference photo with several faces: which one is used
        console.print(f"[yellow]warning:[/] {escape(str(w.message))}", highlight=False, soft_wrap=True)

    if tiny:
        from .tiny import tiny_kontext_pipeline, tiny_pipeline

        console.print(f"[yellow]{TINY_NOTE}[/]")
        analyzer_or_name = analyzer if analyzer is not None else "dlib"
        pipe = (tiny_kontext_pipeline(face_analyzer=analyzer_or_name, variant="K") if kontext
                else tiny_pipeline(face_analyzer=analyzer_or_name))
        try:
            memory.apply_memory(pipe, mem, device, compute_dtype=torch.float32, quantize_base=True,
                                transformer_file=transformer_file, place=False)
        except WithAnyoneError as exc:
            raise fail(exc) from exc
    elif kontext:
        from .kontext_source import load_kontext

        pipe = load_kontext(base, adapter, "K", adapter_file=None, siglip=siglip, analyzer=analyzer,
                            face_pack=face_pack, torch_dtype=torch_dtype, offline=offline, console=console,
                            fail=fail)
        try:
            memory.apply_memory(pipe, mem, device, compute_dtype=torch_dtype, quantize_base=True,
                                transformer_file=transformer_file, place=False)
        except WithAnyoneError as exc:
            raise fail(exc) from exc
        pipe.memory = mem
    else:
        from .pipeline import WithAnyonePipeline

        console.print(f"loading {base} + {adapter} ({dtype}, {device}; memory {mem.summary()})")
        try:
            from dataclasses import replace

            pipe = WithAnyonePipeline.from_pretrained(base, adapter=adapter, siglip=siglip,
                                                      face_pack=analyzer if analyzer is not None else face_pack,
                                                      torch_dtype=torch_dtype, local_files_only=offline or None,
                                                      low_vram=replace(mem, offload="none"),
                                                      transformer_file=transformer_file)
        except (WithAnyoneError, FileNotFoundError) as exc:
            raise fail(exc) from exc
        pipe.model_sources["face_pack"] = str(face_pack)
        pipe.memory = mem
    for i, lo in enumerate(lora or []):
        pipe.load_lora_weights(lo, adapter_name=f"lora{i}")
    if lora:
        pipe.set_adapters([f"lora{i}" for i in range(len(lora))], [lora_scale] * len(lora))
    memory.apply_offload(pipe, mem.offload, device)
    pipe.set_progress_bar_config(disable=True)
    if matting:
        pipe.set_matting(matting_model)

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(TextColumn("[bold]denoising"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   console=console, disable=not progress)
    try:
        with bar:
            task = bar.add_task("denoising", total=steps)
            result = pipe(prompt, references=references, boxes=boxes,
                          id_weight=id_weight, siglip_weight=siglip_weight, height=height, width=width,
                          num_inference_steps=steps, guidance_scale=guidance, seed=seed,
                          timestep_shift=timestep_shift, noise=noise, reference_face=reference_face,
                          use_matting=matting,
                          step_callback=lambda i, n: bar.update(task, completed=i))
    except (WithAnyoneError, ValueError, FileNotFoundError) as exc:  # bad input: a message, not a traceback
        raise fail(exc) from exc

    from .sidecar import build_sidecar, write_image_and_sidecar

    image = result.images[0]
    sidecar = build_sidecar(
        pipe, result, prompt=prompt, references=list(ref),
        box_mode="explicit" if box else ("layout" if layout is not None else "auto"),
        layout=str(layout) if layout is not None else None, id_weight=id_weight, siglip_weight=siglip_weight,
        height=height, width=width, steps=steps, guidance=guidance, lora=list(lora or []), lora_scale=lora_scale,
        dtype=dtype, device=device, offload=mem.offload, output=str(out), memory=memory.describe(mem),
        timestep_shift=timestep_shift, noise=noise, reference_face=reference_face, matting=matting,
        matting_model=matting_model if matting else None, **({"mode": "kontext-t2i"} if kontext else {}),
        **({"tiny": True, "note": TINY_NOTE} if tiny else {}))
    sidecar_path = write_image_and_sidecar(out, image, sidecar)
    console.print(f"wrote {out} ({image.size[0]}x{image.size[1]}) and {sidecar_path}; seed {result.seed}")
    if tiny:
        console.print(f"[yellow]note:[/] {out} is NOISE: {TINY_NOTE}")

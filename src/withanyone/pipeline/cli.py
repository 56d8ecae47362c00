"""``withanyone generate``: one image of 1–4 reference people, plus a JSON sidecar to reproduce it."""

from __future__ import annotations

from pathlib import Path

import typer

#: Output side and steps of ``--tiny`` (a random 2-block FLUX: seconds on a CPU).
TINY_SIZE = 64
TINY_STEPS = 4
#: What a ``--tiny`` run says about its image, on the console and in the sidecar.
TINY_NOTE = ("tiny random model (--tiny): the image is noise from random weights, not a WithAnyone generation; "
             "it shows the generate path runs")


def _parse_box(text: str) -> tuple[float, float, float, float]:
    parts = [p for p in text.replace(" ", "").split(",") if p]
    if len(parts) != 4:
        raise typer.BadParameter(f"--box {text!r}: want x1,y1,x2,y2 in pixels")
    try:
        x1, y1, x2, y2 = (float(p) for p in parts)
    except ValueError as exc:
        raise typer.BadParameter(f"--box {text!r}: not numbers") from exc
    return x1, y1, x2, y2


def validate_generate_args(refs: list[str], height: int, width: int, steps: int, layout: Path | None) -> None:
    """Reject missing/unreadable --ref and --layout files and sizes FLUX cannot make, before any weights load.

    Raises ``ValueError`` with a one-line message naming the argument.
    """
    from ..errors import ImageLoadError
    from ..faces.image import load_image

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
    for flag, v in (("--height", height), ("--width", width)):
        if v < 16 or v % 16:
            near = sorted({max(16, v // 16 * 16), v // 16 * 16 + 16})
            raise ValueError(f"{flag} {v}: must be a positive multiple of 16 pixels (FLUX: 8x VAE, 2x2 patches); "
                             f"e.g. {' or '.join(map(str, near))}")
    if steps < 1:
        raise ValueError(f"--steps {steps}: must be at least 1")


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
    base: str = typer.Option("black-forest-labs/FLUX.1-dev", "--base", help="FLUX hub id or diffusers folder."),
    adapter: str = typer.Option("WithAnyone/WithAnyone", "--adapter", help="Adapter hub id, folder or .safetensors."),
    siglip: str = typer.Option("google/siglip-base-patch16-256-i18n", "--siglip", help="SigLIP hub id or folder."),
    face_pack: str = typer.Option("antelopev2", "--face-pack", help="insightface pack (name or folder)."),
    lora: list[str] | None = typer.Option(None, "--lora", help="LoRA file/folder/hub id to load (repeatable)."),
    lora_scale: float = typer.Option(1.0, "--lora-scale", help="Scale of the LoRA(s)."),
    dtype: str = typer.Option("auto", "--dtype", help="bfloat16, float16, float32 or auto (bf16 on GPU, fp32 on CPU)."),
    device: str = typer.Option("auto", "--device", help="cuda, cpu or auto."),
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
    boxes = [_parse_box(b) for b in box] if box else None
    if boxes is not None and layout is not None:
        raise typer.BadParameter("give either --box or --layout, not both")
    if boxes is not None and len(boxes) != len(ref):
        raise typer.BadParameter(f"{len(boxes)} --box for {len(ref)} --ref: give one box per reference")
    for flag, value, allowed in (("--timestep-shift", timestep_shift, ("release", "flux")),
                                 ("--noise", noise, ("release", "cpu")),
                                 ("--reference-face", reference_face, ("score", "largest"))):
        if value not in allowed:
            raise typer.BadParameter(f"{flag} {value!r}: choose {' or '.join(allowed)}")

    try:  # cheap checks first: nothing heavy has loaded yet
        validate_generate_args(list(ref), height, width, steps, layout)
        from . import memory

        mem = memory.resolve_memory(low_vram, base_quantization=base_quantization,
                                    adapter_quantization=adapter_quantization, offload=offload or None,
                                    text_encoder_quantization=text_encoder_quantization)
        why = memory.check_available(mem, None if device == "auto" else device, transformer_file)
        if why:
            raise ValueError(why)
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from exc

    import torch

    from .pipeline import WithAnyonePipeline

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype == "auto":
        dtype = "bfloat16" if device.startswith("cuda") else "float32"
    torch_dtype = getattr(torch, dtype, None)
    if not isinstance(torch_dtype, torch.dtype):
        raise typer.BadParameter(f"--dtype {dtype!r} is not a torch dtype")

    from ..errors import WithAnyoneError

    if tiny:
        from .tiny import tiny_pipeline

        console.print(f"[yellow]{TINY_NOTE}[/]")
        pipe = tiny_pipeline()
        dtype = "float32"
        try:
            memory.apply_memory(pipe, mem, device, compute_dtype=torch.float32, quantize_base=True,
                                transformer_file=transformer_file, place=False)
        except WithAnyoneError as exc:
            console.print(f"[red]error:[/] {exc}")
            raise typer.Exit(1) from exc
    else:
        console.print(f"loading {base} + {adapter} ({dtype}, {device}; memory {mem.summary()})")
        try:
            from dataclasses import replace

            pipe = WithAnyonePipeline.from_pretrained(base, adapter=adapter, siglip=siglip, face_pack=face_pack,
                                                      torch_dtype=torch_dtype, local_files_only=offline or None,
                                                      low_vram=replace(mem, offload="none"),
                                                      transformer_file=transformer_file)
        except (WithAnyoneError, FileNotFoundError) as exc:
            console.print(f"[red]error:[/] {exc}")
            raise typer.Exit(1) from exc
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
            result = pipe(prompt, references=list(ref), boxes=str(layout) if layout is not None else boxes,
                          id_weight=id_weight, siglip_weight=siglip_weight, height=height, width=width,
                          num_inference_steps=steps, guidance_scale=guidance, seed=seed,
                          timestep_shift=timestep_shift, noise=noise, reference_face=reference_face,
                          use_matting=matting,
                          step_callback=lambda i, n: bar.update(task, completed=i))
    except (WithAnyoneError, ValueError, FileNotFoundError) as exc:  # bad input: a message, not a traceback
        console.print(f"[red]error:[/] {exc}")
        raise typer.Exit(1) from exc

    from .sidecar import build_sidecar, write_image_and_sidecar

    image = result.images[0]
    sidecar = build_sidecar(
        pipe, result, prompt=prompt, references=list(ref),
        box_mode="explicit" if boxes is not None else ("layout" if layout is not None else "auto"),
        layout=str(layout) if layout is not None else None, id_weight=id_weight, siglip_weight=siglip_weight,
        height=height, width=width, steps=steps, guidance=guidance, lora=list(lora or []), lora_scale=lora_scale,
        dtype=dtype, device=device, offload=mem.offload, output=str(out), memory=memory.describe(mem),
        timestep_shift=timestep_shift, noise=noise, reference_face=reference_face, matting=matting,
        matting_model=matting_model if matting else None, **({"tiny": True, "note": TINY_NOTE} if tiny else {}))
    sidecar_path = write_image_and_sidecar(out, image, sidecar)
    console.print(f"wrote {out} ({image.size[0]}x{image.size[1]}) and {sidecar_path}; seed {result.seed}")
    if tiny:
        console.print(f"[yellow]note:[/] {out} is NOISE: {TINY_NOTE}")

"""``withanyone edit``: put the ``--ref`` people into a photo in place of its faces (FLUX.1 Kontext with the
released WithAnyone.Ke adapter), plus the JSON sidecar ``generate`` writes and the base photo's hash.

The checks here run before any weights load: the photo, references, ``--replace`` / ``--box`` and ``--out``
are validated, the photo's faces detected and matched against ``--replace``, so a wrong face number is one
line in a second, not a traceback after loading 30 GB. The edit itself is
:class:`~withanyone.pipeline.kontext.WithAnyoneKontextPipeline`'s.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import typer

from .cli import IMAGE_SUFFIXES, TINY_STEPS, _parse_box, validate_generate_args
from .kontext_source import KONTEXT_BASE, check_kontext_base, load_kontext, resolve_kontext_base

#: Output side of ``--tiny`` edits (the square canvas; a random 2-block Kontext: seconds on a CPU).
TINY_EDIT_SIZE = 128
#: ``--canvas`` choices: the release's square canvas around the faces, or diffusers' Kontext resolution
#: nearest the photo's own aspect (our option).
CANVASES = ("square", "photo")
TINY_EDIT_NOTE = ("tiny random model (--tiny): the image is noise from random weights, not a WithAnyone edit; "
                  "it shows the edit path runs (faces, boxes, blur and condition are real)")


def parse_replace(text: str) -> list[int]:
    """``"0,2"`` → ``[0, 2]``; ``ValueError`` naming ``--replace`` for anything but distinct face numbers."""
    parts = [p for p in text.replace(" ", "").split(",") if p]
    if not parts:
        raise ValueError(f"--replace {text!r}: give face numbers like 0,1 (see --list-faces)")
    try:
        nums = [int(p) for p in parts]
    except ValueError as exc:
        raise ValueError(f"--replace {text!r}: not face numbers (want e.g. 0,1; see --list-faces)") from exc
    if any(n < 0 for n in nums):
        raise ValueError(f"--replace {text!r}: face numbers start at 0 (see --list-faces)")
    if len(set(nums)) != len(nums):
        raise ValueError(f"--replace {text!r}: a face is named twice; each face gets one person")
    return nums


def validate_edit_args(photo: Path, refs: Sequence[str], *, replace: str | None, box: Sequence[str],
                       out: Path | None, save_condition: Path | None, canvas: str, steps: int,
                       options: dict[str, str] | None = None
                       ) -> tuple[list[int] | None, list[tuple[float, float, float, float]] | None]:
    """Reject a missing/unreadable photo or reference, bad ``--replace``/``--box``, a ``--replace`` count that
    differs from the references', a bad ``--out``/``--save-condition`` or ``--canvas``, before anything loads;
    returns the parsed face numbers and boxes (each None when not given).

    Raises ``ValueError`` with a one-line message naming the argument.
    """
    _check_photo(photo)
    if canvas not in CANVASES:
        raise ValueError(f"--canvas {canvas!r}: choose square (the release's) or photo")
    # --ref files, --out, --steps and the choices: generate's own checks (the size is the edit's, checked later)
    validate_generate_args(list(refs), 16, 16, steps, None, out=out, options=options)
    if not refs:
        raise ValueError("give at least one --ref: the person who goes into the photo")
    if replace is not None and box:
        raise ValueError("give either --replace (faces of the photo) or --box (your own boxes), not both")
    faces = parse_replace(replace) if replace is not None else None
    if faces is not None and len(faces) != len(refs):
        raise ValueError(f"--replace {replace}: {len(faces)} face(s) for {len(refs)} --ref; give one face per "
                         "reference, in the order of --ref")
    boxes = None
    if box:
        boxes = [_parse_box(b) for b in box]
        if len(boxes) != len(refs):
            raise ValueError(f"{len(boxes)} --box for {len(refs)} --ref: give one box per reference, in order")
        for text, (x1, y1, x2, y2) in zip(box, boxes, strict=True):
            if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
                raise ValueError(f"--box {text}: holds NaN or infinity")
            if x2 <= x1 or y2 <= y1:
                raise ValueError(f"--box {text}: empty box: need x2 > x1 and y2 > y1 (x1,y1 is the top-left corner)")
    if save_condition is not None:
        if save_condition.is_dir() or save_condition.suffix.lower() not in IMAGE_SUFFIXES:
            raise ValueError(f"--save-condition {save_condition}: give an image file name ending in "
                             f"{', '.join(IMAGE_SUFFIXES)}")
        if out is not None and save_condition.resolve() == out.resolve():
            raise ValueError(f"--save-condition {save_condition}: is the --out file; choose another name")
    return faces, boxes


def check_replace(photo: Path, faces: Sequence[Any], replace: list[int] | None, n_refs: int) -> list[int]:
    """The face numbers to replace: ``replace``, or every face when the photo shows exactly one per
    reference. ``ValueError`` naming the photo for a face number out of range, a photo without faces, or a
    face count that differs from the references' when ``--replace`` is not given."""
    n = len(faces)
    if n == 0:
        raise ValueError(f"PHOTO {photo}: no face found; use a photo where the faces are clearly visible, or place "
                         "the people with --box")
    if replace is None:
        if n != n_refs:
            raise ValueError(f"PHOTO {photo}: {n} face(s) for {n_refs} --ref; say which faces to replace with "
                             f"--replace (numbers 0–{n - 1}, see --list-faces)")
        return list(range(n))
    bad = [i for i in replace if i >= n]
    if bad:
        raise ValueError(f"--replace {','.join(map(str, replace))}: face {bad[0]} does not exist; {photo} has {n} "
                         f"face(s), numbered 0–{n - 1} (see --list-faces)")
    return list(replace)


#: The Python API's words in the edit's error messages → the command line's.
_CLI_WORDS = (("canvas='photo'", "--canvas photo"), ("keep_unreplaced=True", "--keep-unreplaced"),
              ("replace=[face indices]", "--replace"), ("pass boxes=", "pass --box"), ("boxes=", "--box"),
              ("replace=", "--replace "), ("`boxes`", "--box"), ("feather must", "--feather must"),
              ("min_blur_face must", "--min-blur-face must"))


def cli_words(message: str, photo: Path) -> str:
    """An edit error in the CLI's words (``--canvas photo`` for ``canvas='photo'``, ...), naming ``photo``."""
    for api, cli in _CLI_WORDS:
        message = message.replace(api, cli)
    return message if str(photo) in message or photo.name in message else f"{photo}: {message}"


def _edit_message(exc: BaseException, photo: Path) -> str:
    """The one-line message for ``exc``: the edit preprocessing's in the CLI's words and naming the photo; others
    (a reference without a face, ...) as they are, since they name their own file."""
    from .edit import EditError

    return cli_words(str(exc), photo) if isinstance(exc, EditError) else str(exc)


def unblurred_replaced(plan: Any) -> list[tuple[int, int]]:
    """``(face number, shorter side in photo px)`` of the replaced faces the release's blur skips: it blurs only
    faces at least ``min_blur_face`` (100) photo pixels on both sides, so on a small photo the model sees the
    original face where the new person should go."""
    limit = float(plan.options.get("min_blur_face", 100.0))
    out = []
    for i in plan.replaced:
        x1, y1, x2, y2 = plan.transform.to_photo([plan.face_boxes[i]])[0]  # the region blur_faces is given
        if x2 - x1 < limit or y2 - y1 < limit:
            out.append((i, int(min(x2 - x1, y2 - y1))))
    return out


def unblurred_warning(plan: Any) -> str | None:
    """A warning naming the replaced faces left unblurred (see :func:`unblurred_replaced`), or None."""
    small = unblurred_replaced(plan)
    if not small:
        return None
    what = ", ".join(f"face {i} ({side} px)" for i, side in small)
    return (f"{what}: under the release's {plan.options.get('min_blur_face', 100):.0f} px blur threshold, so not "
            "blurred: the model sees the original face there (a larger photo of the scene, or a lower min_blur_face, "
            "avoids this)")


def face_lines(faces: Sequence[Any], size: tuple[int, int],
               canvas_boxes: Sequence[Sequence[float]] | None = None) -> list[str]:
    """One line per detected face, as ``--list-faces`` prints them: number, box in the photo, size, where,
    score, and (``canvas_boxes``) its box on the output canvas, the pixels ``--box`` takes."""
    w, h = size
    lines = []
    for i, f in enumerate(faces):
        x1, y1, x2, y2 = (float(v) for v in f.bbox)
        cx, cy = (x1 + x2) / 2 / w, (y1 + y2) / 2 / h
        where = ("left" if cx < 1 / 3 else "right" if cx > 2 / 3 else "centre") + (
            ", top" if cy < 1 / 3 else ", bottom" if cy > 2 / 3 else "")
        line = (f"face {i}: box {x1:.0f},{y1:.0f},{x2:.0f},{y2:.0f}  ({x2 - x1:.0f}x{y2 - y1:.0f} px, {where}; "
                f"score {float(f.score):.2f})")
        if canvas_boxes is not None:
            line += "; on the output: " + ",".join(f"{float(v):.0f}" for v in canvas_boxes[i])
        lines.append(line)
    return lines


def edit_sidecar(pipe: Any, result: Any, *, photo: str, photo_sha256: str, replace: list[int] | None,
                 box_mode: str, canvas: str, condition: str | None, prompt: str, references: list[str],
                 **common: Any) -> dict[str, Any]:
    """``generate``'s sidecar (:func:`~withanyone.pipeline.sidecar.build_sidecar`, the same keys in the same
    order) plus the edit's: ``mode`` ("edit"), ``base_photo``, ``base_sha256``, ``replace`` (face numbers, None
    with ``--box``), ``photo_boxes`` (the identity boxes in the photo's pixels), ``canvas``, ``condition`` (the
    saved condition image, or None) and ``edit_plan`` (the crop, every face's box, which faces were blurred).
    The standard ``boxes`` are in output pixels, as generate's. ``extra``: more keys, appended last."""
    from .sidecar import build_sidecar

    plan = getattr(result, "edit", None)
    photo_boxes = plan.transform.to_photo(plan.boxes) if plan is not None else None
    extra = common.pop("extra", {})
    return build_sidecar(pipe, result, prompt=prompt, references=references, box_mode=box_mode, layout=None,
                         **common, mode="edit", base_photo=photo, base_sha256=photo_sha256,
                         replace=list(replace) if replace is not None else None, photo_boxes=photo_boxes,
                         canvas=canvas, condition=condition,
                         edit_plan=plan.to_dict() if plan is not None else None, **extra)


def condition_image(result: Any) -> Any:
    """The blurred condition image the model saw (a PIL image) from the pipeline's output (None without an edit)."""
    plan = getattr(result, "edit", None)
    return plan.condition if plan is not None else None


def edit_command(
    photo: Path = typer.Argument(..., help="The photo to edit: its faces are replaced by the --ref people."),
    ref: list[str] | None = typer.Option(None, "--ref", "-r", help="Reference per person: a photo or a .npy "
                                         "ArcFace embedding; repeat, in the order of --replace / --box."),
    replace: str | None = typer.Option(None, "--replace", help="Faces of PHOTO to replace, e.g. 0,1 (numbers from "
                                       "--list-faces; default: every face, when there is one per --ref)."),
    box: list[str] | None = typer.Option(None, "--box", help="Your own face box x1,y1,x2,y2 in output pixels (the "
                                         "canvas: --list-faces prints the faces' boxes there), one per --ref "
                                         "(instead of --replace)."),
    prompt: str | None = typer.Option(None, "--prompt", "-p", help="What the edited photo shows."),
    out: Path = typer.Option(Path("edit.png"), "--out", "-o", help="Output image (a .json sidecar goes beside "
                             "it)."),
    list_faces: bool = typer.Option(False, "--list-faces", help="Print PHOTO's detected faces, numbered for "
                                    "--replace, and exit."),
    save_condition: Path | None = typer.Option(None, "--save-condition", help="Also write the blurred condition "
                                               "image the model sees."),
    canvas: str = typer.Option("square", "--canvas", help="square (the release's: a square crop around all faces) "
                               "or photo (the photo's own aspect, diffusers' Kontext resolutions)."),
    keep_unreplaced: bool = typer.Option(False, "--keep-unreplaced", help="Leave the faces that are not replaced "
                                         "unblurred, and square the crop around the replaced ones only (the "
                                         "release blurs every face)."),
    feather: float = typer.Option(0.0, "--feather", help="Soft edge of the face blur, in photo pixels (the "
                                  "release: 0, a hard-edged blur)."),
    min_blur_face: float = typer.Option(100.0, "--min-blur-face", help="Blur only faces whose sides are at least "
                                        "this many photo pixels (the release's 100; 0 blurs every face)."),
    id_weight: float = typer.Option(1.0, "--id-weight", help="ArcFace branch weight (the release's edit model is "
                                    "ArcFace-only: no SigLIP branch)."),
    seed: int | None = typer.Option(None, "--seed", help="Random seed (default: drawn and recorded)."),
    size: int | None = typer.Option(None, "--size", help="Output side of the square canvas in pixels (multiple "
                                    "of 16; default 512 as the release, --tiny 128); --canvas photo: about "
                                    "size² pixels."),
    steps: int | None = typer.Option(None, "--steps", help="Denoising steps (default 25, --tiny 4)."),
    guidance: float = typer.Option(4.0, "--guidance", help="FLUX distilled guidance."),
    base: str = typer.Option(KONTEXT_BASE, "--base", help="FLUX.1 Kontext hub id or diffusers folder."),
    adapter: str = typer.Option("WithAnyone/WithAnyone", "--adapter", help="Adapter hub id, folder or "
                                ".safetensors (the WithAnyone.Ke file)."),
    adapter_file: str | None = typer.Option(None, "--adapter-file", help="File name of the Ke checkpoint inside "
                                            "--adapter (default withanyone_kontext_edit.safetensors, assumed: the "
                                            "release names no file)."),
    face_pack: str = typer.Option("antelopev2", "--face-pack", help="insightface pack (name or folder)."),
    dtype: str = typer.Option("auto", "--dtype", help="bfloat16, float16, float32 or auto (bf16 on GPU, fp32 on CPU)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda (cuda:N), mps or xpu."),
    offline: bool = typer.Option(False, "--offline", help="Use only files already on disk / in the hub cache."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
    tiny: bool = typer.Option(False, "--tiny", help="Tiny random Kontext model, no weights needed (dlib faces; the "
                              "image is noise): the whole edit path on CPU in seconds."),
) -> None:
    """Replace faces of PHOTO with the --ref people, keeping the scene (FLUX.1 Kontext + WithAnyone.Ke)."""
    from rich.console import Console
    from rich.markup import escape

    console = Console(stderr=True)

    def fail(message: object) -> typer.Exit:
        console.print(f"[red]error:[/] {escape(' '.join(str(message).split()))}", highlight=False, soft_wrap=True)
        return typer.Exit(1)

    refs = list(ref or [])
    steps = steps if steps is not None else (TINY_STEPS if tiny else 25)
    side = size if size is not None else (TINY_EDIT_SIZE if tiny else 512)
    try:
        if list_faces:
            _check_photo(photo)
        else:
            if not prompt or not prompt.strip():
                raise ValueError("--prompt is required: what the edited photo shows (or --list-faces to see the "
                                 "faces)")
            if side < 16 or side % 16:
                raise ValueError(f"--size {side}: must be a positive multiple of 16 pixels (e.g. "
                                 f"{max(16, side // 16 * 16)})")
            replace_v, boxes = validate_edit_args(photo, refs, replace=replace, box=list(box or []), out=out,
                                                  save_condition=save_condition, canvas=canvas, steps=steps,
                                                  options={"--dtype": dtype})
            from .device import resolve_device

            device = resolve_device(device)
    except ValueError as exc:
        raise fail(exc) from exc
    if not tiny and not list_faces:  # the base's files exist before the face model loads
        check_kontext_base(resolve_kontext_base(base), offline, fail)

    import warnings

    from ..errors import WithAnyoneError
    from ..faces.image import load_image

    try:  # the photo's faces first (seconds): numbered as --replace counts them
        analyzer = _analyzer(tiny, face_pack)
        from .edit import detect_faces

        image = load_image(photo)
        faces = detect_faces(image, analyzer)
    except (WithAnyoneError, ValueError, FileNotFoundError) as exc:
        raise fail(exc) from exc
    h0, w0 = image.shape[:2]
    if list_faces:
        from .edit import EditError, prepare_edit

        canvas_boxes, note = None, ""
        if faces:
            try:  # where each face lands on the output canvas (when all faces are kept in it)
                plan = prepare_edit(photo, len(faces), faces=faces, size=side, canvas=canvas)
                canvas_boxes = plan.face_boxes
                note = f"; output canvas {plan.size[0]}x{plan.size[1]} (--canvas {canvas}, --size {side})"
            except (EditError, ValueError) as exc:  # e.g. faces that no square holds: said, the list still shown
                note = "; " + cli_words(" ".join(str(exc).split()), photo).removeprefix(f"{photo}: ")
        typer.echo(f"{photo}: {len(faces)} face(s) ({w0}x{h0}), numbered left to right for --replace{note}")
        for line in face_lines(faces, (w0, h0), canvas_boxes):
            typer.echo(line)
        return
    try:
        if boxes is None:
            replace_v = check_replace(photo, faces, replace_v, len(refs))
        from .edit import prepare_edit

        # the whole preprocessing, before any model loads: faces that cannot be squared, boxes off the canvas
        plan = prepare_edit(photo, len(refs), faces=faces, replace=replace_v, boxes=boxes, canvas=canvas, size=side,
                            keep_unreplaced=keep_unreplaced, feather=feather, min_blur_face=min_blur_face)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", UserWarning)
            references = _references(refs, analyzer, tiny, False)
    except (WithAnyoneError, ValueError, FileNotFoundError) as exc:
        raise fail(_edit_message(exc, photo)) from exc
    small = unblurred_warning(plan)
    for message in [str(w.message) for w in caught] + ([small] if small else []):
        console.print(f"[yellow]warning:[/] {escape(message)}", highlight=False, soft_wrap=True)

    import torch

    if dtype == "auto":
        dtype = "bfloat16" if device.startswith("cuda") else "float32"
    if tiny:
        dtype = "float32"
        from .tiny import tiny_kontext_pipeline

        console.print(f"[yellow]{TINY_EDIT_NOTE}[/]")
        pipe = tiny_kontext_pipeline(face_analyzer=analyzer)
    else:
        pipe = load_kontext(resolve_kontext_base(base), adapter, "Ke", adapter_file=adapter_file, siglip=None,
                             analyzer=analyzer, face_pack=face_pack, torch_dtype=getattr(torch, dtype),
                             offline=offline, console=console, fail=fail)
    pipe.to(device)  # (--tiny too: the sidecar's device is where it ran)
    pipe.set_progress_bar_config(disable=True)

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(TextColumn("[bold]denoising"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   console=console, disable=not progress)
    try:
        with bar:
            task = bar.add_task("denoising", total=steps)
            result = pipe(prompt, image=photo, references=references,
                          boxes=[list(b) for b in boxes] if boxes is not None else "faces", replace=replace_v,
                          canvas=canvas, keep_unreplaced=keep_unreplaced, feather=feather, min_blur_face=min_blur_face,
                          id_weight=id_weight,
                          size=side, num_inference_steps=steps, guidance_scale=guidance, seed=seed,
                          step_callback=lambda i, n: bar.update(task, completed=i))
    except (WithAnyoneError, ValueError, FileNotFoundError) as exc:  # bad input: a message, not a traceback
        raise fail(_edit_message(exc, photo)) from exc

    from ..io import atomic_write_bytes
    from .edit import photo_sha256
    from .sidecar import write_image_and_sidecar

    cond_path = None
    if save_condition is not None:
        cond = condition_image(result)
        if cond is None:
            raise fail("--save-condition: the pipeline returned no condition image")
        import io

        buf = io.BytesIO()
        cond.save(buf, format={".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}.get(
            save_condition.suffix.lower(), "PNG"))
        atomic_write_bytes(save_condition, buf.getvalue())
        cond_path = str(save_condition)
    out_image = result.images[0]
    sidecar = edit_sidecar(
        pipe, result, photo=str(photo), photo_sha256=photo_sha256(photo), replace=replace_v,
        box_mode="explicit" if boxes is not None else "faces", canvas=canvas, condition=cond_path, prompt=prompt,
        references=refs, id_weight=id_weight, siglip_weight=0.0, height=out_image.size[1],
        width=out_image.size[0], steps=steps, guidance=guidance, lora=[], lora_scale=1.0, dtype=dtype,
        device=device, offload="none", output=str(out),
        extra={"tiny": True, "note": TINY_EDIT_NOTE} if tiny else {})
    sidecar_path = write_image_and_sidecar(out, out_image, sidecar)
    what = f"faces {','.join(map(str, replace_v))}" if replace_v is not None else f"{len(refs)} box(es)"
    console.print(f"wrote {out} ({out_image.size[0]}x{out_image.size[1]}) and {sidecar_path}; replaced {what}; "
                  f"seed {result.seed}" + (f"; condition image {cond_path}" if cond_path else ""))
    if tiny:
        console.print(f"[yellow]note:[/] {out} is NOISE: {TINY_EDIT_NOTE}")


def _check_photo(photo: Path) -> None:
    from ..errors import ImageLoadError
    from ..faces.image import load_image

    if not photo.exists():
        raise ValueError(f"PHOTO {photo}: no such file")
    if not photo.is_file():
        raise ValueError(f"PHOTO {photo}: is a folder, not a file")
    try:
        load_image(photo)
    except ImageLoadError as exc:
        raise ValueError(f"PHOTO {photo}: {exc.reason}") from exc


def _analyzer(tiny: bool, face_pack: str) -> Any:
    """dlib for ``--tiny``; else insightface at the release edit demo's threshold (for the photo and the refs)."""
    from ..faces import FaceAnalyzer

    if tiny:
        return FaceAnalyzer("dlib")
    from .edit import EDIT_DET_THRESH

    return FaceAnalyzer("insightface", pack=str(face_pack), det_thresh=EDIT_DET_THRESH)


def _references(refs: Sequence[str], analyzer: Any, tiny: bool, need_crop: bool) -> list[Any]:
    from .references import ARCFACE_DIM, DLIB_DIM, prepare_references

    dim = DLIB_DIM if tiny else ARCFACE_DIM
    references = prepare_references(list(refs), analyzer, need_crop=need_crop, dim=dim)
    for r, path in zip(references, refs, strict=True):
        r.source = str(path)
    return references

"""The app's **Edit** tab: put the people of the Generate tab's people panel into an uploaded photo, in place of
the faces the user picks (FLUX.1 Kontext + WithAnyone.Ke, :class:`~withanyone.pipeline.kontext.WithAnyoneKontextPipeline`).

:class:`Editor` is the Gradio-free part (tests call it directly): analyse the base photo (faces numbered as
``withanyone edit --list-faces`` numbers them, drawn on the photo), load the Kontext pipeline on first use,
run one edit with per-step progress and cancel, write the image and the CLI's edit sidecar.
:func:`build_edit_tab` lays the tab out inside ``ui.build_ui``.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .studio import COLORS, Cancelled, Person, Studio

#: Faces of a base photo the tab offers a person for (more are drawn, numbered, and kept).
MAX_FACES = 8
#: What a face's dropdown says when no person goes into it.
KEEP = "nobody (not replaced)"
#: Output side of the square canvas: the release's 512; ``--tiny`` 128 so a CPU keeps up.
EDIT_SIZE = 512
TINY_EDIT_SIZE = 128
#: Display height (px) of the before / after / condition images; :data:`EDIT_CSS` scales a small canvas up to it.
COMPARE_HEIGHT = 340
EDIT_CSS = "\n".join(f"#{e} img {{ width: 100% !important; height: 100% !important; object-fit: contain; }}"
                     for e in ("edit_before", "edit_after", "edit_condition"))


@dataclass
class KontextOptions:
    """What ``withanyone app`` was asked to load for the Edit tab (``--kontext-base`` / ``--kontext-adapter``)."""

    base: str = "black-forest-labs/FLUX.1-Kontext-dev"
    adapter: str = "WithAnyone/WithAnyone"
    adapter_file: str | None = None
    face_pack: str = "antelopev2"
    tiny: bool = False
    offline: bool = False


@dataclass
class BasePhoto:
    """An uploaded base photo: its pixels, detected faces (numbered by list position) and content hash."""

    path: str
    image: np.ndarray
    faces: list[Any]
    sha256: str

    @property
    def size(self) -> tuple[int, int]:
        """``(width, height)`` in pixels."""
        return int(self.image.shape[1]), int(self.image.shape[0])


def numbered_faces(image: Image.Image | np.ndarray, boxes: Sequence[Sequence[float]],
                   labels: Sequence[str] | None = None) -> Image.Image:
    """A copy of ``image`` with each box outlined and its number (or label) written large enough to read at
    the photo's size (the numbers ``--replace`` and the tab's dropdowns use)."""
    im = (Image.fromarray(image) if isinstance(image, np.ndarray) else image.copy()).convert("RGB")
    side = min(im.size)
    line = max(2, side // 150)
    font = ImageFont.load_default(size=max(12, side // 18))
    d = ImageDraw.Draw(im)
    for i, b in enumerate(boxes):
        color = COLORS[i % len(COLORS)]
        x1, y1, x2, y2 = (float(v) for v in b)
        d.rectangle([x1, y1, x2, y2], outline=color, width=line)
        text = labels[i] if labels is not None else str(i)
        tx, ty = x1 + line, max(0.0, y1 - font.size - 2 * line) if y1 > font.size + 2 * line else y1 + line
        box = d.textbbox((tx, ty), text, font=font)
        d.rectangle([box[0] - line, box[1] - line, box[2] + line, box[3] + line], fill=color)
        d.text((tx, ty), text, fill=(255, 255, 255), font=font)
    return im


class Editor:
    """The Edit tab's state and actions over a :class:`Studio` (its people, analyser, cancel and output folder)."""

    def __init__(self, studio: Studio, options: KontextOptions | None = None):
        self.studio = studio
        self.options = options or KontextOptions(tiny=studio.models.tiny)
        self._pipe: Any = None
        self._error: str | None = None
        self._bases: dict[str, BasePhoto] = {}
        self._load_lock = threading.Lock()
        self._analyzer: Any = None

    @property
    def analyzer(self) -> Any:
        """The base photo's face analyser: with ``--tiny`` the app's (dlib); else insightface at the release edit
        demo's detection threshold (:data:`~withanyone.pipeline.edit.EDIT_DET_THRESH`), created on first use."""
        if self.options.tiny:
            return self.studio.analyzer
        if self._analyzer is None:
            from ..faces import FaceAnalyzer
            from ..pipeline.edit import EDIT_DET_THRESH

            self._analyzer = FaceAnalyzer("insightface", pack=str(self.options.face_pack),
                                          det_thresh=EDIT_DET_THRESH)
        return self._analyzer

    @property
    def size(self) -> int:
        """Default side of the square canvas."""
        return TINY_EDIT_SIZE if self.options.tiny else EDIT_SIZE

    # ------------------------------------------------------------------ models
    def pipeline(self) -> Any:
        """The Kontext pipeline (WithAnyone.Ke), loaded on first use; ``ValueError`` with what is missing."""
        with self._load_lock:
            if self._pipe is None and self._error is None:
                self._pipe, self._error = self._load()
        if self._pipe is None:
            raise ValueError(self._error or "the Kontext pipeline could not be loaded")
        return self._pipe

    def _load(self) -> tuple[Any, str | None]:
        import torch

        from ..errors import WithAnyoneError

        if self.options.tiny:
            from ..pipeline.tiny import tiny_kontext_pipeline

            pipe = tiny_kontext_pipeline(face_analyzer=self.studio.analyzer).to(self.studio.models.device)
        else:
            from ..pipeline.kontext import WithAnyoneKontextPipeline

            dtype = getattr(torch, self.studio.models.dtype) if self.studio.models.dtype != "-" else torch.float32
            try:  # the face pack: the one already loaded for the photos, else the pipeline's own (lazy, at 0.5)
                pipe = WithAnyoneKontextPipeline.from_pretrained(
                    base=self.options.base, adapter=self.options.adapter, variant="Ke",
                    adapter_file=self.options.adapter_file,
                    face_pack=self._analyzer if self._analyzer is not None else self.options.face_pack,
                    torch_dtype=dtype, local_files_only=self.options.offline or None)
                pipe.to(self.studio.models.device)
            except (WithAnyoneError, FileNotFoundError, OSError, ValueError) as exc:
                return None, kontext_missing_message(exc, self.options)
        pipe.set_progress_bar_config(disable=True)
        return pipe, None

    # ------------------------------------------------------------------ base photo
    def analyse_base(self, path: str) -> BasePhoto:
        """Load the base photo and detect its faces (cached by content); ``ValueError`` for an unreadable photo."""
        if not self.studio.models.ready:  # the face analyser and the people come with the Generate tab's models
            raise ValueError("the app's models did not load (see the banner), so faces cannot be analysed: "
                             f"{' '.join(str(self.studio.models.error).split())[:300]}")
        from ..errors import WithAnyoneError
        from ..faces.image import load_image
        from ..pipeline.edit import detect_faces, photo_sha256

        sha = photo_sha256(path)
        hit = self._bases.get(sha)
        if hit is None:
            try:
                image = load_image(path)
            except WithAnyoneError as exc:
                raise ValueError(f"{Path(path).name}: {getattr(exc, 'reason', exc)}") from exc
            with self.studio._face_lock:
                faces = detect_faces(image, self.analyzer)
            hit = self._bases[sha] = BasePhoto(str(path), image, list(faces), sha)
        return hit

    def preview(self, base: BasePhoto) -> Image.Image:
        """The base photo with its faces numbered."""
        return numbered_faces(base.image, [f.bbox for f in base.faces])

    # ------------------------------------------------------------------ edit
    def edit(self, prompt: str, people: Sequence[Person], base_path: str, assignment: Sequence[str | None], *,
             steps: int, guidance: float, seed: int | None, size: int | None = None, canvas: str = "square",
             keep_unreplaced: bool = False, feather: float = 0.0) -> Iterator[dict[str, Any]]:
        """Replace the faces of ``base_path`` that ``assignment`` gives a person (one entry per detected face: a
        person's name or None to keep it). Yields ``{"step", "total"}`` after each step, then ``{"done": True,
        "image", "before", "condition", "boxes", "replace", "seed", "image_path", "sidecar_path", "sidecar",
        "seconds", "warning"}`` (``warning``: replaced faces too small for the release's blur, or None). ``canvas``/``keep_unreplaced``/``feather``: the pipeline's options (release: square, every
        face blurred, hard edge). Raises ``ValueError`` for bad requests and :class:`Cancelled`."""
        if not base_path:
            raise ValueError("upload the photo to edit first")
        if not prompt.strip():
            raise ValueError("write a prompt first: what the edited photo shows")
        base = self.analyse_base(base_path)
        if not base.faces:
            raise ValueError(f"{Path(base_path).name}: no face found; use a photo where the faces are clearly "
                             "visible")
        names = [p.name for p in people]
        replace, chosen = [], []
        for i, who in enumerate(list(assignment)[:len(base.faces)]):
            if who in (None, "", KEEP):
                continue
            if who not in names:
                raise ValueError(f"face {i}: {who!r} is not one of the people ({', '.join(names)})")
            replace.append(i)
            chosen.append(people[names.index(who)])
        if not replace:
            raise ValueError("pick a person for at least one face (the dropdown under each face number)")
        dup = [p.name for p in chosen if sum(q.name == p.name for q in chosen) > 1]
        if dup:
            raise ValueError(f"{dup[0]} is picked for two faces; each person goes into one face")
        refs, errors = self.studio.references(chosen, need_crop=False)  # Ke is ArcFace-only
        if errors:
            raise ValueError("; ".join(e + " (in the Generate tab's people panel)" for e in errors))
        pipe = self.pipeline()
        side = int(size or self.size)
        if seed is None:
            seed = int(np.random.default_rng().integers(0, 2**31 - 1))
        studio = self.studio
        studio._cancel.clear()
        steps_q: queue.Queue = queue.Queue()
        box: dict[str, Any] = {}

        def on_step(i: int, n: int) -> None:
            steps_q.put((i, n))
            if studio._cancel.is_set():
                raise Cancelled()

        def work() -> None:
            try:
                with studio._lock:
                    box["result"] = pipe(
                        prompt, image=base.path, references=refs, boxes="faces", replace=replace, canvas=canvas,
                        keep_unreplaced=bool(keep_unreplaced), feather=float(feather), id_weight=1.0, size=side, num_inference_steps=int(steps), guidance_scale=float(guidance), seed=int(seed),
                        step_callback=on_step)
            except BaseException as exc:  # handed to the caller's thread
                box["error"] = exc
            finally:
                steps_q.put(None)

        t0 = time.perf_counter()
        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        while (item := steps_q.get()) is not None:
            yield {"step": item[0], "total": item[1]}
        thread.join()
        if "error" in box:
            raise box["error"]
        result = box["result"]
        seconds = time.perf_counter() - t0
        image = result.images[0]
        from ..pipeline.edit_cli import condition_image, edit_sidecar
        from ..pipeline.sidecar import write_image_and_sidecar

        stamp = time.strftime("%Y%m%d-%H%M%S")
        out = studio.out_dir / f"withanyone-edit-{stamp}-{seed}.png"
        used, ignored = studio.photo_use(chosen)
        sidecar = edit_sidecar(
            pipe, result, photo=str(base_path), photo_sha256=base.sha256, replace=replace, box_mode="faces",
            canvas=canvas, condition=None, prompt=prompt, references=used, id_weight=1.0,
            siglip_weight=0.0, height=image.size[1], width=image.size[0], steps=int(steps),
            guidance=float(guidance), lora=[], lora_scale=1.0, dtype=studio.models.dtype if not self.options.tiny
            else "float32", device=studio.models.device, offload=studio.models.preset, output=str(out),
            extra={"names": [p.name for p in chosen], "ignored_photos": ignored, "app": "withanyone app"})
        sidecar_path = write_image_and_sidecar(out, image, sidecar)
        plan = getattr(result, "edit", None)
        before = plan.canvas if plan is not None else None
        from ..pipeline.edit_cli import unblurred_warning

        warning = unblurred_warning(plan) if plan is not None else None
        yield {"done": True, "image": image, "before": before if before is not None else Image.fromarray(base.image),
               "condition": condition_image(result), "boxes": list(result.boxes), "replace": replace,
               "seed": result.seed, "image_path": str(out), "sidecar_path": str(sidecar_path), "sidecar": sidecar,
               "seconds": seconds, "steps": int(steps), "names": [p.name for p in chosen], "warning": warning}


def kontext_missing_message(exc: BaseException, opts: KontextOptions) -> str:
    """What failed to load for the Edit tab, and how to get it (``hf download`` lines for hub ids only)."""
    import re

    from ..hub import GATED_REPOS, download_command
    from ..model.kontext import KONTEXT_FILES

    def hub_id(name: str) -> bool:
        return re.fullmatch(r"[\w.-]+/[\w.-]+", name) is not None and not Path(name).exists()

    cmds = []
    if hub_id(opts.base):
        cmds.append(download_command(opts.base))
    if hub_id(opts.adapter):
        cmds.append(download_command(opts.adapter, (opts.adapter_file or KONTEXT_FILES["Ke"],)))
    licence = (f"accept the licence at https://huggingface.co/{opts.base} and `hf auth login`, then "
               if opts.base in GATED_REPOS else "")
    how = (f"How to get them: {licence}" + " and ".join(f"`{c}`" for c in cmds) + "; or " if cmds else "")
    return (f"the Edit tab's model could not be loaded: {' '.join(str(exc).split())}. {how}start the app with "
            "--kontext-base (a FLUX.1 Kontext diffusers folder) and --kontext-adapter (the WithAnyone.Ke file) "
            "pointing at local copies; `withanyone app --tiny` runs the tab on a tiny random model.")


def build_edit_tab(editor: Editor, names: Sequence[Any], photos: Sequence[Any], n_people: Any,
                   people_of: Any) -> None:
    """The Edit tab's widgets and events (call inside ``gr.Tab``). ``names``/``photos``/``n_people`` are the
    Generate tab's people-panel components; ``people_of(n, *names, *photos)`` turns their values into
    :class:`Person` objects."""
    import gradio as gr

    tiny = editor.options.tiny
    gr.Markdown("Replace people in a photo, keep the scene (FLUX.1 Kontext + WithAnyone.Ke). The people come "
                "from the **Generate** tab's people panel (names and photos); upload the photo to edit here, then "
                "pick who goes into which face.")
    state = gr.State(None)
    with gr.Row():
        with gr.Column(scale=1):
            photo = gr.Image(type="filepath", sources=["upload"], label="photo to edit", elem_id="edit_photo",
                             height=300)
            faces_view = gr.Image(label="faces found (numbered)", interactive=False, elem_id="edit_faces",
                                  height=300)
            faces_msg = gr.Markdown(elem_id="edit_faces_msg")
            pickers = [gr.Dropdown([KEEP], value=KEEP, label=f"face {i} gets", visible=False,
                                   elem_id=f"edit_face{i}", interactive=True) for i in range(MAX_FACES)]
        with gr.Column(scale=2):
            prompt = gr.Textbox(label="prompt (what the edited photo shows)", lines=2, elem_id="edit_prompt",
                                value="a photo of two people in the park" if tiny else "")
            with gr.Row():
                steps = gr.Slider(1, 50, value=4 if tiny else 25, step=1, label="steps", elem_id="edit_steps")
                guidance = gr.Slider(1.0, 10.0, value=4.0, step=0.1, label="guidance", elem_id="edit_guidance")
                size = gr.Number(editor.size, label="output side (square canvas)", precision=0, step=16,
                                 elem_id="edit_size")
            with gr.Row():
                random_seed = gr.Checkbox(True, label="random seed", elem_id="edit_random_seed")
                seed = gr.Number(0, label="seed (the one used is shown here)", precision=0, elem_id="edit_seed")
            with gr.Accordion("options beyond the release", open=False):
                with gr.Row():
                    canvas = gr.Radio(["square", "photo"], value="square", elem_id="edit_canvas",
                                      label="canvas: square (the release's crop around the faces) or the photo's "
                                            "own aspect")
                    keep = gr.Checkbox(False, label="keep the faces that are not replaced unblurred (the release "
                                       "blurs every face)", elem_id="edit_keep")
                    feather = gr.Slider(0, 40, value=0, step=1, label="blur edge feathering, photo px (release: 0)",
                                        elem_id="edit_feather")
            with gr.Row():
                go = gr.Button("Edit the photo", variant="primary", elem_id="edit_go")
                stop = gr.Button("Cancel", variant="stop", elem_id="edit_cancel")
            status = gr.Markdown(elem_id="edit_status")
            with gr.Row():
                before = gr.Image(label="before (the photo on the model's canvas)", interactive=False,
                                  elem_id="edit_before", format="png", height=COMPARE_HEIGHT)
                after = gr.Image(label="after", interactive=False, elem_id="edit_after", format="png",
                                 height=COMPARE_HEIGHT)
            with gr.Accordion("what the model saw: the condition image (the faces blurred)", open=False):
                condition = gr.Image(label="condition", interactive=False, elem_id="edit_condition", format="png",
                                     height=COMPARE_HEIGHT)
            downloads = gr.File(label="download: image + JSON sidecar", file_count="multiple", interactive=False,
                                elem_id="edit_downloads")

    def choices(n: int, *values: Any) -> list[str]:
        people = people_of(int(n), *values)
        return [KEEP, *[p.name for p in people]]

    def on_photo(path, n, *values):
        hidden = [gr.update(visible=False, value=KEEP) for _ in range(MAX_FACES)]
        if not path:
            return None, None, "", *hidden
        try:
            base = editor.analyse_base(path)
        except Exception as exc:  # shown, never a traceback
            return None, None, f"⚠ {exc}", *hidden
        k = len(base.faces)
        opts = choices(n, *values)
        ups = [gr.update(visible=i < k, choices=opts, value=KEEP) for i in range(MAX_FACES)]
        if k == 0:
            msg = "⚠ no face found in this photo; use one where the faces are clearly visible"
        else:
            msg = (f"{k} face(s) found, numbered as `withanyone edit --list-faces` numbers them. Pick a person for "
                   "each face to replace. As in the release, every face is blurred in what the model sees, so a "
                   "face without a person is redrawn freely; to keep such faces as they are, tick *keep the faces "
                   "that are not replaced* under the options.")
            if k > MAX_FACES:
                msg += f" Faces {MAX_FACES}–{k - 1} can only be kept here (use the CLI's --replace)."
        return path, editor.preview(base), msg, *ups

    people_inputs = [n_people, *names, *photos]
    photo.change(on_photo, [photo, *people_inputs], [state, faces_view, faces_msg, *pickers],
                 concurrency_limit=1, concurrency_id="faces")

    def refresh_choices(n, *values):
        """New names / people count → each dropdown's choices; a pick whose person is gone goes back to nobody."""
        picks, rest = values[:MAX_FACES], values[MAX_FACES:]
        opts = choices(n, *rest)
        return [gr.update(choices=opts, value=v if v in opts else KEEP) for v in picks]

    for trigger in [n_people.change, *[nm.blur for nm in names]]:
        trigger(refresh_choices, [n_people, *pickers, *names, *photos], pickers)

    def run(path, prompt_v, steps_v, guidance_v, size_v, rnd, seed_v, canvas_v, keep_v, feather_v, n, *args,
            progress=gr.Progress()):
        picks = list(args[:MAX_FACES])
        people = people_of(int(n), *args[MAX_FACES:])
        use_seed = None if rnd or seed_v is None else int(seed_v)
        same = gr.update()
        try:
            for ev in editor.edit(prompt_v or "", people, path, picks, steps=int(steps_v), guidance=float(guidance_v),
                                  seed=use_seed, size=int(size_v or editor.size), canvas=canvas_v,
                                  keep_unreplaced=bool(keep_v), feather=float(feather_v or 0)):
                if ev.get("done"):
                    w, h = ev["image"].size
                    who = ", ".join(f"face {i} → {nm}" for i, nm in zip(ev["replace"], ev["names"], strict=True))
                    msg = (f"✓ done: denoising step {ev['steps']}/{ev['steps']} · seed **{ev['seed']}** · {w}×{h} · "
                           f"{ev['seconds']:.1f} s · {who}" + (f"\n\n⚠ {ev['warning']}" if ev["warning"] else ""))
                    yield (ev["before"], ev["image_path"], ev["condition"], msg,
                           [ev["image_path"], ev["sidecar_path"]], ev["seed"])
                else:
                    progress((ev["step"], ev["total"]), desc="denoising")
                    yield same, same, same, f"denoising step {ev['step']}/{ev['total']}", same, same
        except Cancelled:
            yield same, same, same, "❌ cancelled", same, same
        except Exception as exc:  # a message on screen, never a traceback
            yield same, same, same, f"❌ {exc or type(exc).__name__}", same, same

    inputs = [state, prompt, steps, guidance, size, random_seed, seed, canvas, keep, feather, n_people, *pickers,
              *names, *photos]
    ev = go.click(run, inputs, [before, after, condition, status, downloads, seed], concurrency_limit=1,
                  concurrency_id="gpu")
    stop.click(editor.studio.cancel, None, None, cancels=[ev])

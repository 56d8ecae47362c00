"""WithAnyone Studio's Gradio interface: a Generate tab, an Edit tab and a Bench explorer tab over :class:`Studio`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import gradio as gr

from .edit import EDIT_CSS
from .models import PRESETS, LoadedModels
from .people import MAX_PEOPLE, TRAINED_PEOPLE
from .studio import SIZES, TINY_SIZES, Cancelled, Person, Placement, Studio, canvas, draw_boxes, people_note

PLACEMENTS = {"automatic presets": "auto", "boxes drawn on the canvas": "drawn", "layout photo": "layout"}
TINY_BANNER = ("⚠ **Tiny random model (`--tiny`)**: images are noise from a tiny random model (random weights). "
               "Everything else — face analysis, placement, progress, sidecars — is real. With weights and a GPU: "
               "`withanyone app`.")


def banner(models: LoadedModels) -> str:
    """The status line at the top of the app: model, device, low-VRAM preset, or what is missing."""
    if models.error:
        return f"❌ {models.error}"
    notes = "".join(f" ({n})" for n in models.notes)
    what = TINY_BANNER + "\n\n" if models.tiny else ""
    return (f"{what}Model ready on **{models.device}** ({models.dtype}); low-VRAM preset: **{models.preset}** — "
            f"{PRESETS[models.preset].description}{notes}")


def _names(n: int, names: list[str]) -> list[str]:
    out = []
    for i in range(n):
        name = (names[i] or "").strip() or f"person {i + 1}"
        while name in out:
            name += "'"
        out.append(name)
    return out


#: Heights (px) of the app's galleries, by elem_id (``crops`` for every person's face-crop gallery).
GALLERY_HEIGHTS = {"gallery": 360, "crops": 130, "bench_refs": 240, "bench_outputs": 300}
#: Pixels of a gallery's height taken by its label and padding, above the thumbnails.
_GALLERY_CHROME = 40
#: Whole images in the galleries: Gradio draws each thumbnail as a square as wide as its column, which the
#: gallery's fixed height then clips (a 224×128 result in a 360 px gallery showed its top half); here every
#: thumbnail is as tall as the gallery's visible area and the image is letterboxed inside it (object-fit contain).
APP_CSS = "\n".join(
    f"{'[id^=crops]' if key == 'crops' else '#' + key} .thumbnail-item {{ aspect-ratio: auto !important; "
    f"height: {h - _GALLERY_CHROME}px !important; }}"
    for key, h in GALLERY_HEIGHTS.items()) + "\n" + EDIT_CSS


def whole_gallery(**kwargs: Any) -> gr.Gallery:
    """A ``gr.Gallery`` that shows whole images (object-fit contain; with :data:`APP_CSS`, thumbnails no taller
    than the gallery), keeping its column count for a few images (Gradio 6's ``fit_columns``)."""
    import inspect

    if "fit_columns" in inspect.signature(gr.Gallery.__init__).parameters:
        kwargs.setdefault("fit_columns", False)
    return gr.Gallery(object_fit="contain", **kwargs)


def blocks_css_kwargs(method: Any) -> dict[str, str]:
    """``{"css": APP_CSS}`` when ``method`` (``gr.Blocks`` in Gradio 5, ``Blocks.launch`` in 6) takes it."""
    import inspect

    return {"css": APP_CSS} if "css" in inspect.signature(method).parameters else {}


def build_ui(studio: Studio, editor: Any = None) -> gr.Blocks:
    """The Blocks app; call ``.queue(...).launch(...)`` on it (see :func:`withanyone.app.launch`). ``editor``:
    the Edit tab's :class:`~withanyone.app.edit.Editor` (default: one with the default Kontext sources)."""
    from gradio_image_annotation import image_annotator

    from .edit import Editor, build_edit_tab

    editor = editor if editor is not None else Editor(studio)

    tiny = studio.models.tiny
    sizes = TINY_SIZES if tiny else SIZES
    size_choices = [f"{k} ({w}×{h})" for k, (w, h) in sizes.items()]
    w0, h0 = sizes["1:1"]

    with gr.Blocks(title="WithAnyone Studio", **blocks_css_kwargs(gr.Blocks.__init__)) as demo:
        gr.Markdown("# WithAnyone Studio\nPut several people in one picture: a photo (or a few) per person, "
                    "where their faces go, a prompt.")
        gr.Markdown(banner(studio.models), elem_id="banner")
        results = gr.State([])
        with gr.Tab("Generate", id="generate"):
            with gr.Row():
                with gr.Column(scale=1):
                    n_people = gr.Slider(1, MAX_PEOPLE, value=2, step=1, label="people",
                                         info=f"1–{TRAINED_PEOPLE} as in the release; up to {MAX_PEOPLE} flagged",
                                         elem_id="n_people")
                    people_warn = gr.Markdown(elem_id="people_warn")
                    slots = []
                    for i in range(MAX_PEOPLE):
                        with gr.Group(visible=i < 2) as grp:
                            name = gr.Textbox(value=f"person {i + 1}", label=f"person {i + 1}: name",
                                              elem_id=f"name{i}")
                            photos = gr.File(file_count="multiple", type="filepath", label="photo(s) of this person",
                                             elem_id=f"photos{i}", height=110)
                            crops = whole_gallery(label="face used per photo", columns=4,
                                                  height=GALLERY_HEIGHTS["crops"], elem_id=f"crops{i}", show_label=True, interactive=False)
                            warn = gr.Markdown(elem_id=f"warn{i}")
                        slots.append((grp, name, photos, crops, warn))
                with gr.Column(scale=2):
                    prompt = gr.Textbox(label="prompt", lines=2, elem_id="prompt",
                                        value="a photo of two people in the park" if tiny else "")
                    with gr.Row():
                        size = gr.Radio(size_choices, value=size_choices[0], label="size (aspect presets)", elem_id="size",
                                        scale=3)
                        width = gr.Number(w0, label="width", precision=0, step=16, elem_id="width")
                        height = gr.Number(h0, label="height", precision=0, step=16, elem_id="height")
                    placement = gr.Radio(list(PLACEMENTS), value="automatic presets", label="face placement",
                                         elem_id="placement")
                    board = image_annotator(value=_board(2, h0, w0, ["person 1", "person 2"]),
                                            label_list=["person 1", "person 2"], label="face boxes (drag to "
                                            "move/resize, draw a new one on empty space; one per person, labelled "
                                            "with the name)", elem_id="board", image_type="numpy",
                                            sources=[], show_clear_button=False, use_default_label=True,
                                            height=360)
                    reset = gr.Button("reset boxes to the presets", size="sm", elem_id="reset_boxes")
                    with gr.Group(visible=False) as layout_group:
                        layout = gr.File(file_count="single", type="filepath", label="layout photo", elem_id="layout")
                        layout_view = gr.Image(label="assignment", interactive=False, elem_id="layout_view")
                        layout_msg = gr.Markdown(elem_id="layout_msg")
                    with gr.Row():
                        steps = gr.Slider(1, 50, value=4 if tiny else 25, step=1, label="steps", elem_id="steps")
                        guidance = gr.Slider(1.0, 10.0, value=4.0, step=0.1, label="guidance", elem_id="guidance")
                    resemblance = gr.Slider(
                        0.0, 1.0, value=0.0, step=0.05, elem_id="resemblance",
                        label="resemblance: ← more freedom (ArcFace, 'in spirit') · more resemblance (SigLIP, 'in "
                              "form') →", info="siglip_weight = value, id_weight = 1 − value (the release's slider)")
                    with gr.Row():
                        random_seed = gr.Checkbox(True, label="random seed", elem_id="random_seed")
                        seed = gr.Number(0, label="seed (the one used is shown here)", precision=0, elem_id="seed")
                    with gr.Accordion("LoRA and extra pipeline options", open=False):
                        lora = gr.File(file_count="single", type="filepath", label="LoRA (.safetensors, optional)",
                                       elem_id="lora")
                        lora_scale = gr.Slider(0.0, 2.0, value=1.0, step=0.05, label="LoRA scale")
                        with gr.Row():
                            shift = gr.Dropdown(["release", "flux"], value="release", elem_id="timestep_shift",
                                                label="time shift (release: the authors' inference; flux: diffusers')")
                            noise = gr.Dropdown(["release", "cpu"], value="release", elem_id="noise",
                                                label="seed noise (release: drawn on the GPU as the release does)")
                            matting = gr.Checkbox(False, label="matting: remove the reference crops' background "
                                                  "before SigLIP (resemblance > 0)", elem_id="matting")
                        extra = gr.Textbox("{}", label="extra pipeline keyword arguments (JSON), passed to "
                                           "WithAnyonePipeline.__call__ unchanged", elem_id="extra")
                    with gr.Row():
                        go = gr.Button("Generate", variant="primary", elem_id="generate",
                                       interactive=studio.models.ready)
                        stop = gr.Button("Cancel", variant="stop", elem_id="cancel")
                    status = gr.Markdown(elem_id="status")
                    show_boxes = gr.Checkbox(False, label="draw the face boxes on the results", elem_id="show_boxes")
                    gallery = whole_gallery(label="results", columns=3, height=GALLERY_HEIGHTS["gallery"],
                                            elem_id="gallery", interactive=False)
                    downloads = gr.File(label="download: image + JSON sidecar", file_count="multiple",
                                        interactive=False, elem_id="downloads")

        with gr.Tab("Edit", id="edit"):
            build_edit_tab(editor, [s[1] for s in slots], [s[2] for s in slots], n_people,
                           lambda n, *values: _people(int(n), values))

        with gr.Tab("Bench explorer", id="bench"):
            _bench_tab()

        # ------------------------------------------------------------------ events
        names = [s[1] for s in slots]

        def on_people(n, *name_values):
            n = int(n)
            ups = [gr.update(visible=i < n) for i in range(MAX_PEOPLE)]
            return [people_note(n), *ups]

        n_people.change(on_people, [n_people, *names], [people_warn, *[s[0] for s in slots]])

        def on_size(choice):
            key = choice.split(" ")[0]
            w, h = sizes[key]
            return w, h

        size.change(on_size, size, [width, height])

        def refresh_board(n, w, h, *name_values):
            labels = _names(int(n), list(name_values))
            return image_annotator(value=_board(int(n), int(h), int(w), labels), label_list=labels)

        for trigger in (n_people.release, width.change, height.change, reset.click):
            trigger(refresh_board, [n_people, width, height, *names], board)
        for nm in names:
            nm.blur(refresh_board, [n_people, width, height, *names], board)

        def on_placement(choice):
            mode = PLACEMENTS[choice]
            return gr.update(visible=mode == "layout")

        placement.change(on_placement, placement, layout_group)

        for _, _name, photos, crops, warn in slots:
            def on_photos(paths, _studio=studio):
                if not paths:
                    return [], ""
                if not _studio.models.ready:
                    return [], "models not loaded: photos cannot be analysed"
                try:
                    analyses, warnings = _studio.analyse_person(paths)
                except Exception as exc:  # e.g. the face pack cannot be loaded: a message, not a traceback
                    return [], f"⚠ the photos could not be analysed: {exc}"
                items = [(a.crop, f"{a.name}: {a.faces_found} face(s)") for a in analyses if a.crop is not None]
                good = sum(a.ok for a in analyses)
                text = "\n".join(f"- ⚠ {w}" for w in warnings)
                if good:
                    text += f"\n\n✓ {good} usable photo(s)" + (": identity = their mean ArcFace vector, SigLIP "
                                                                "crop from the most frontal one" if good > 1 else "")
                return items, text

            photos.change(on_photos, photos, [crops, warn], concurrency_limit=1, concurrency_id="faces")

        def on_layout(path, n, w, h, *args):
            if not path:
                return None, ""
            people = _people(int(n), args)
            try:
                a = studio.assign(path, people, int(h), int(w))
            except Exception as exc:  # shown, never a traceback
                return None, f"⚠ {exc}"
            labels = [p.name for p in people]
            boxes = [tuple(float(v) for v in f.bbox) for f in a.faces]  # in the layout photo's own pixels
            how = ("matched by identity: " + ", ".join(f"{nm} (cos {s:.2f})" for nm, s in zip(labels, a.similarities,
                                                                                            strict=True))
                   if a.method == "identity" else "not every person is recognised in it: assigned left to right: "
                   + ", ".join(labels))
            return draw_boxes(a.image, boxes, labels, width=max(2, min(a.image.shape[:2]) // 150)), how

        layout_inputs = [layout, n_people, width, height, *names, *[s[2] for s in slots]]
        layout.change(on_layout, layout_inputs, [layout_view, layout_msg], concurrency_limit=1,
                      concurrency_id="faces")

        gen_inputs = [prompt, n_people, width, height, steps, guidance, random_seed, seed, resemblance, lora,
                      lora_scale, placement, board, layout, shift, noise, matting, extra, show_boxes, results, *names,
                      *[s[2] for s in slots]]

        def run(prompt_v, n, w, h, steps_v, guidance_v, rnd, seed_v, res_v, lora_v, lora_scale_v, place, board_v,
                layout_v, shift_v, noise_v, matting_v, extra_v, show, past, *args, progress=gr.Progress()):
            people = _people(int(n), args)
            try:
                kwargs = {"timestep_shift": shift_v, "noise": noise_v, "use_matting": bool(matting_v),
                          **json.loads(extra_v or "{}")}
                if not isinstance(kwargs, dict):
                    raise ValueError("extra pipeline options must be a JSON object")
            except (json.JSONDecodeError, ValueError) as exc:
                yield _fail(f"extra pipeline options: {exc}", past, show)
                return
            mode = PLACEMENTS[place]
            placement_v = Placement(mode, (board_v or {}).get("boxes") or [], layout_v)
            use_seed = None if rnd or seed_v is None else int(seed_v)
            try:
                for ev in studio.generate(prompt_v, people, placement_v, height=int(h), width=int(w),
                                          steps=int(steps_v), guidance=float(guidance_v), seed=use_seed,
                                          siglip_weight=float(res_v), lora=lora_v, lora_scale=float(lora_scale_v),
                                          **kwargs):
                    if ev.get("done"):
                        entry = {"image": ev["image_path"], "boxes": ev["boxes"], "names": [p.name for p in people],
                                 "sidecar": ev["sidecar_path"]}
                        past = [entry, *past]
                        msg = (f"✓ done: denoising step {ev['steps']}/{ev['steps']} · seed **{ev['seed']}** · "
                               f"{int(w)}×{int(h)} · {ev['seconds']:.1f} s · boxes "
                               + ", ".join(f"{nm}: ({', '.join(f'{v:.0f}' for v in b)})"
                                           for nm, b in zip(entry["names"], ev["boxes"], strict=True)))
                        yield (_gallery(past, show), msg, [ev["image_path"], ev["sidecar_path"]],
                               ev["seed"], past)
                    else:
                        progress((ev["step"], ev["total"]), desc="denoising")
                        yield (gr.update(), f"denoising step {ev['step']}/{ev['total']}", gr.update(), gr.update(),
                               past)
            except Cancelled:
                yield _fail("cancelled", past, show)
            except Exception as exc:  # a message on screen, never a traceback
                yield _fail(str(exc) or type(exc).__name__, past, show)

        gen_event = go.click(run, gen_inputs, [gallery, status, downloads, seed, results], concurrency_limit=1,
                             concurrency_id="gpu")
        stop.click(studio.cancel, None, None, cancels=[gen_event])
        show_boxes.change(lambda past, show: _gallery(past, show), [results, show_boxes], gallery)
    return demo


def _people(n: int, args: tuple) -> list[Person]:
    names = _names(n, list(args[:MAX_PEOPLE]))
    files = args[MAX_PEOPLE:]
    return [Person(names[i], [str(p) for p in (files[i] or [])]) for i in range(n)]


def _board(n: int, height: int, width: int, labels: list[str]) -> dict[str, Any]:
    import numpy as np

    from ..pipeline.layout import auto_boxes
    from .studio import COLORS

    boxes = [{"xmin": round(b[0]), "ymin": round(b[1]), "xmax": round(b[2]), "ymax": round(b[3]),
              "label": labels[i], "color": COLORS[i % len(COLORS)]} for i, b in enumerate(auto_boxes(n, height, width))]
    return {"image": np.asarray(canvas(height, width)), "boxes": boxes}


def _gallery(past: list[dict[str, Any]], show: bool) -> list[tuple[Any, str]]:
    from PIL import Image

    items = []
    for e in past:
        if show:
            items.append((draw_boxes(Image.open(e["image"]), e["boxes"], e["names"]), Path(e["image"]).name))
        else:
            items.append((e["image"], Path(e["image"]).name))
    return items


def _fail(msg: str, past: list, show: bool) -> tuple:
    return gr.update(), f"❌ {msg}", gr.update(), gr.update(), past


def _bench_tab() -> None:
    from .bench_explorer import BenchResults, fmt, open_image

    state = gr.State(None)
    with gr.Row():
        folder = gr.Textbox(label="results folder (the --out of `withanyone bench run`)", elem_id="bench_folder",
                            scale=4)
        open_btn = gr.Button("open", elem_id="bench_open", scale=1)
    msg = gr.Markdown(elem_id="bench_msg")
    with gr.Row():
        face_model = gr.Dropdown([], label="face model", elem_id="bench_face_model")
        subset = gr.Dropdown(["all"], value="all", label="subset", elem_id="bench_subset")
        sort = gr.Radio(["none", "desc", "asc"], value="desc", label="sort by CP", elem_id="bench_sort")
        method = gr.Dropdown(["any"], value="any", label="CP of method", elem_id="bench_method")
        failure = gr.Dropdown(["any", "missing", "extra", "dominance", "swap", "blending", "drift", "none"],
                              value="any", label="failure label", elem_id="bench_failure")
    sample = gr.Dropdown([], label="sample", elem_id="bench_sample")
    info = gr.Markdown(elem_id="bench_info")
    with gr.Row():
        gt = gr.Image(label="GT (matched faces boxed)", interactive=False, elem_id="bench_gt")
        refs = whole_gallery(label="references", columns=4, height=GALLERY_HEIGHTS["bench_refs"],
                             interactive=False, elem_id="bench_refs")
    outs = whole_gallery(label="outputs", columns=4, height=GALLERY_HEIGHTS["bench_outputs"], interactive=False,
                         elem_id="bench_outputs")
    table = gr.Dataframe(headers=["method", "face", "box", "→ GT face", "Sim(GT)", "→ ref", "Sim(Ref)", "CP"],
                         interactive=False, elem_id="bench_table")

    def do_open(path):
        try:
            res = BenchResults(path or "")
        except Exception as exc:
            return (None, f"⚠ {exc}", gr.update(choices=[]), gr.update(choices=["all"]), gr.update(choices=["any"]))
        fms = res.face_models
        stale = (f" · ⚠ {len(res.stale)} stale rows left out (methods {', '.join(sorted({r['method'] for r in res.stale}))}"
                 "; rerun `withanyone bench run`)") if res.stale else ""
        return (res, f"{len(res.rows)} rows · methods {', '.join(res.methods)} · face models {', '.join(fms)}{stale}",
                gr.update(choices=fms, value=fms[0]), gr.update(choices=["all", *res.subsets], value="all"),
                gr.update(choices=["any", *res.methods], value="any"))

    def do_list(res, fm, sub, srt, meth, fail="any"):
        if res is None or not fm:
            return gr.update(choices=[], value=None)
        items = res.sample_list(fm, sub, srt, meth, fail)
        return gr.update(choices=items, value=items[0][1] if items else None)

    def do_show(res, fm, sid):
        if res is None or not sid:
            return "", None, [], [], []
        meta, views = res.sample(sid, fm)
        first = views[0].row if views else {}
        gt_img = open_image(meta.get("gt"), first.get("gt_boxes"), [f"GT{i}" for i in range(len(first.get(
            "gt_boxes") or []))])
        ref_boxes = first.get("ref_boxes") or []
        ref_imgs = []
        for j, p in enumerate(meta.get("references", [])):
            im = open_image(p, ref_boxes[j] if j < len(ref_boxes) else None)
            if im is not None:
                ref_imgs.append((im, f"ref {j + 1}"))
        out_imgs, rows = [], []
        for v in views:
            labels = [f"{i}: CP {fmt(f.cp)}" for i, f in enumerate(v.faces)]
            im = open_image(v.row.get("output"), [f.box for f in v.faces], labels)
            head = (f"{v.method}: Sim(GT) {fmt(v.row.get('sim_gt'))} · Sim(Ref) {fmt(v.row.get('sim_ref'))} · "
                    f"CP {fmt(v.row.get('cp'))}" + ("" if v.row.get("status") == "ok" else f" · {v.row.get('reason')}"))
            tax = res.failure(v.row)
            head += "" if tax is None else f" · failure: {', '.join(tax.labels) or 'none'}"
            if im is not None:
                out_imgs.append((im, head))
            for f in v.faces:
                rows.append([v.method, f.index, ", ".join(f"{x:.0f}" for x in f.box),
                             "–" if f.gt_index is None else f"GT{f.gt_index}", fmt(f.sim_gt),
                             "–" if f.ref_index is None else f"ref {f.ref_index + 1}", fmt(f.sim_ref), fmt(f.cp)])
            if not v.faces:
                rows.append([v.method, "–", "–", "–", "–", "–", "–", v.row.get("reason") or "no face"])
        text = f"**{sid}** · subset {first.get('subset')} · prompt: {meta.get('prompt') or '–'}"
        return text, gt_img, ref_imgs, out_imgs, rows

    open_btn.click(do_open, folder, [state, msg, face_model, subset, method]).then(
        do_list, [state, face_model, subset, sort, method, failure], sample)
    for c in (face_model, subset, sort, method, failure):
        c.change(do_list, [state, face_model, subset, sort, method, failure], sample)
    sample.change(do_show, [state, face_model, sample], [info, gt, refs, outs, table])

"""``withanyone edit`` (and ``generate --base kontext``) on tiny random Kontext models and the real photos in
../shared/data/faces: one-line errors before anything loads, ``--list-faces``, and whole edits that write the
image, the condition image and generate's sidecar plus the base photo's hash and the boxes used."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from withanyone.cli import app


def _run(args):
    res = CliRunner().invoke(app, [str(a) for a in args])
    return res, [ln for ln in res.stderr.splitlines() if ln.strip()]


@pytest.fixture
def nothing_loads(monkeypatch):
    """Any attempt to build a Kontext pipeline fails the test: the inputs must be refused first."""
    import withanyone.pipeline.tiny as tiny

    def touched(*a, **k):
        raise AssertionError("a Kontext pipeline was built before the inputs were checked")

    monkeypatch.setattr(tiny, "tiny_kontext_pipeline", touched)


def test_edit_refuses_bad_input_in_one_line(shared_faces, tmp_path, nothing_loads):
    group = shared_faces / "group"
    obama, biden = shared_faces / "obama" / "1.jpg", shared_faces / "biden" / "1.jpg"
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    (tmp_path / "dir").mkdir()
    ok = ["-p", "two people", "--tiny", "--out", tmp_path / "o.png"]
    cases = [
        ([tmp_path / "nope.jpg", "-r", obama, *ok], f"error: PHOTO {tmp_path / 'nope.jpg'}: no such file"),
        ([tmp_path / "dir", "-r", obama, *ok], f"error: PHOTO {tmp_path / 'dir'}: is a folder, not a file"),
        ([tmp_path / "broken.jpg", "-r", obama, *ok], f"error: PHOTO {tmp_path / 'broken.jpg'}: "),
        ([group / "3.jpg", *ok], "error: give at least one --ref"),
        ([group / "3.jpg", "-r", obama, "--tiny"], "error: --prompt is required"),
        ([group / "3.jpg", "-r", tmp_path / "who.jpg", *ok], f"error: --ref {tmp_path / 'who.jpg'}: no such file"),
        ([group / "3.jpg", "-r", obama, "--replace", "a", *ok], "error: --replace 'a': not face numbers"),
        ([group / "3.jpg", "-r", obama, "-r", biden, "--replace", "1,1", *ok], "error: --replace '1,1': a face is "
                                                                                "named twice"),
        ([group / "3.jpg", "-r", obama, "-r", biden, "--replace", "0", *ok],
         "error: --replace 0: 1 face(s) for 2 --ref; give one face per reference"),
        ([group / "3.jpg", "-r", obama, "--replace", "0", "--box", "0,0,9,9", *ok], "error: give either --replace"),
        ([group / "3.jpg", "-r", obama, "--box", "0,0,9", *ok], "error: --box '0,0,9': want x1,y1,x2,y2"),
        ([group / "3.jpg", "-r", obama, "--canvas", "round", *ok], "error: --canvas 'round': choose square"),
        ([group / "3.jpg", "-r", obama, "-p", "x", "--out", tmp_path / "o.gif"], "error: --out"),
        ([group / "3.jpg", "-r", obama, *ok, "--save-condition", tmp_path / "o.png"], "error: --save-condition"),
        ([group / "3.jpg", "-r", obama, *ok, "--size", "100"], "error: --size 100: must be a positive multiple of 16"),
        # without --tiny: the Kontext base is checked before the face model or any weights load
        ([group / "3.jpg", "-r", obama, "-p", "x", "--base", tmp_path / "no-kontext", "--out", tmp_path / "o.png"],
         f"error: FLUX base: {tmp_path / 'no-kontext' / 'model_index.json'} is missing"),
        # the photo's faces decide: 2 faces for 1 person without --replace, a face number that does not exist
        ([group / "3.jpg", "-r", obama, *ok], f"error: PHOTO {group / '3.jpg'}: 2 face(s) for 1 --ref; say which "
                                               "faces to replace with --replace (numbers 0–1"),
        ([group / "3.jpg", "-r", obama, "-r", biden, "--replace", "0,5", *ok],
         f"error: --replace 0,5: face 5 does not exist; {group / '3.jpg'} has 2 face(s), numbered 0–1"),
    ]
    for args, expected in cases:
        res, lines = _run(["edit", *args])
        assert res.exit_code == 1 and isinstance(res.exception, SystemExit), (args, res.output, res.exception)
        assert len(lines) == 1 and lines[0].startswith(expected), (args, lines)
    assert not (tmp_path / "o.png").exists()


def test_list_faces_numbers_them_left_to_right(shared_faces, dlib_analyzer):
    photo = shared_faces / "group" / "2.jpg"
    res = CliRunner().invoke(app, ["edit", str(photo), "--list-faces", "--tiny"])
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()
    faces = sorted(dlib_analyzer.detect(photo), key=lambda f: f.bbox[0])  # the detector's, ordered here
    assert lines[0].startswith(f"{photo}: {len(faces)} face(s) (2000x1428), numbered left to right")
    assert "output canvas 128x128 (--canvas square, --size 128)" in lines[0]
    assert len(lines) == 1 + len(faces) == 4
    for i, (line, f) in enumerate(zip(lines[1:], faces, strict=True)):
        x1, y1, x2, y2 = (int(round(float(v))) for v in f.bbox)
        assert line.startswith(f"face {i}: box {x1},{y1},{x2},{y2}"), line
        # the square canvas is the photo's full height (1428 px) → 128 px: boxes scale by 128/1428
        cx1, cy1, cx2, cy2 = (int(v) for v in line.rsplit("on the output: ", 1)[1].split(","))
        assert cy1 == pytest.approx(y1 * 128 / 1428, abs=1.01) and cx2 - cx1 == pytest.approx((x2 - x1) * 128 / 1428,
                                                                                                abs=1.01)
    assert "centre" in lines[1] and "right, bottom" in lines[3]  # biden, obama, then the child bottom right


#: generate's sidecar keys, in generate's order: an edit's sidecar starts with exactly these.
GENERATE_KEYS = ["prompt", "references", "reference_sources", "boxes", "box_mode", "layout", "id_weight",
                 "siglip_weight", "seed", "height", "width", "steps", "guidance", "lora", "lora_scale", "dtype",
                 "device", "offload", "models", "versions", "output"]


def test_tiny_edit_writes_image_condition_and_sidecar(shared_faces, tmp_path, dlib_analyzer):
    photo = shared_faces / "group" / "2.jpg"  # biden (face 0), obama (face 1), a child (face 2)
    refs = [shared_faces / "obama" / "1.jpg", shared_faces / "biden" / "1.jpg"]
    out, cond = tmp_path / "swap.png", tmp_path / "seen.png"
    args = ["edit", photo, "-r", refs[0], "-r", refs[1], "--replace", "0,1", "-p", "two men in suits", "--tiny",
            "--seed", "3", "--steps", "2", "--no-progress"]
    res, lines = _run([*args, "--out", out, "--save-condition", cond])
    assert res.exit_code == 0, res.output + repr(res.exception)
    said = " ".join(res.stderr.split())
    assert f"wrote {out} (128x128) and {out.with_suffix('.json')}; replaced faces 0,1; seed 3" in said
    assert f"condition image {cond}" in said and "NOISE" in said
    assert "blur threshold" not in said  # faces of 178 and 213 px: blurred
    assert Image.open(out).size == (128, 128) and Image.open(cond).size == (128, 128)
    side = json.loads(out.with_suffix(".json").read_text())
    assert list(side)[:len(GENERATE_KEYS)] == GENERATE_KEYS
    assert side["base_sha256"] == hashlib.sha256(photo.read_bytes()).hexdigest() == side["edit_plan"]["photo_sha256"]
    assert side["mode"] == "edit" and side["replace"] == [0, 1] and side["box_mode"] == "faces"
    assert side["seed"] == 3 and side["steps"] == 2 and side["condition"] == str(cond)
    assert side["references"] == [str(r) for r in refs] and side["models"]["tiny"]["variant"] == "Ke"
    plan = side["edit_plan"]
    assert side["boxes"] == [plan["face_boxes"][0], plan["face_boxes"][1]] == plan["boxes"]
    # the identity boxes are where the replaced faces are in the photo (within one canvas pixel: 1428/128 px)
    faces = sorted(dlib_analyzer.detect(photo), key=lambda f: f.bbox[0])
    scale = plan["transform"]["crop_w"] / 128
    for b, f in zip(side["photo_boxes"], faces[:2], strict=True):
        np.testing.assert_allclose(b, f.bbox, atol=scale + 1)
    # the condition is the photo's canvas with the faces blurred: equal away from them, smoother on them
    t = plan["transform"]
    canvas = np.asarray(Image.open(photo).convert("RGB").crop(
        (t["left"], t["top"], t["left"] + t["crop_w"], t["top"] + t["crop_h"])).resize((128, 128), Image.LANCZOS),
        dtype=np.float32)
    seen = np.asarray(Image.open(cond).convert("RGB"), dtype=np.float32)
    away = np.ones((128, 128), bool)
    for x1, y1, x2, y2 in plan["face_boxes"]:
        away[max(0, y1 - 3):y2 + 3, max(0, x1 - 3):x2 + 3] = False
    assert np.abs(seen - canvas)[away].mean() < 1.0
    ratios = []  # every face blurred (the release's default): its detail (mean horizontal gradient) drops
    for x1, y1, x2, y2 in plan["face_boxes"]:
        def detail(a, x1=x1, y1=y1, x2=x2, y2=y2):
            return np.abs(np.diff(a[y1 + 2:y2 - 2, x1 + 2:x2 - 2], axis=1)).mean()

        ratios.append(detail(seen) / detail(canvas))
    assert max(ratios) < 0.8 and np.mean(ratios) < 0.6, ratios
    assert np.abs(np.asarray(Image.open(out), np.float32) - seen).mean() > 5  # the output is the model's


def test_tiny_edit_one_face_photo_and_own_boxes(shared_faces, tmp_path):
    """A photo with one face works (the release's face_preserving_resize needs two); --box places the person."""
    photo = shared_faces / "obama" / "1.jpg"
    res, _ = _run(["edit", photo, "-r", shared_faces / "biden" / "1.jpg", "-p", "a man", "--tiny", "--steps", "1",
                   "--no-progress", "--out", tmp_path / "one.png"])
    assert res.exit_code == 0, res.output + repr(res.exception)
    side = json.loads((tmp_path / "one.json").read_text())
    assert side["replace"] == [0] and len(side["boxes"]) == 1 and Image.open(tmp_path / "one.png").size == (128, 128)
    res, _ = _run(["edit", photo, "-r", shared_faces / "biden" / "1.jpg", "-p", "a man", "--tiny", "--steps", "1",
                   "--box", "16,16,64,64", "--no-progress", "--out", tmp_path / "box.png"])
    assert res.exit_code == 0, res.output + repr(res.exception)
    side = json.loads((tmp_path / "box.json").read_text())
    assert side["boxes"] == [[16, 16, 64, 64]] and side["box_mode"] == "explicit" and side["replace"] is None


def test_unsquarable_photo_is_one_line_and_canvas_photo_edits_it(shared_faces, tmp_path):
    """group/1.jpg (1126×661): its two faces span more than 661 px across, so no square crop holds them."""
    photo = shared_faces / "group" / "1.jpg"
    refs = ["-r", shared_faces / "biden" / "1.jpg", "-r", shared_faces / "obama" / "1.jpg"]
    common = ["edit", photo, *refs, "-p", "two men", "--tiny", "--steps", "1", "--no-progress"]
    res, lines = _run([*common, "--out", tmp_path / "sq.png"])
    assert res.exit_code == 1 and len(lines) == 1, lines
    assert lines[0].startswith(f"error: {photo}: the faces span ") and "no square crop holds them" in lines[0]
    assert "use --canvas photo, or --keep-unreplaced" in lines[0]
    assert "Traceback" not in res.output and not (tmp_path / "sq.png").exists()
    res, lines = _run([*common, "--canvas", "photo", "--out", tmp_path / "wide.png"])
    assert res.exit_code == 0, res.output + repr(res.exception)
    w, h = Image.open(tmp_path / "wide.png").size
    assert w > h and w % 16 == 0 and h % 16 == 0  # the photo's own (landscape) aspect
    assert json.loads((tmp_path / "wide.json").read_text())["canvas"] == "photo"


def test_generate_base_kontext_tiny(shared_faces, tmp_path):
    """``generate --base kontext``: WithAnyone.K's text-to-image mode, same sidecar as generate."""
    res, lines = _run(["generate", "--base", "kontext", "--tiny", "-p", "a photo of two people", "-r",
                       shared_faces / "obama" / "1.jpg", "-r", shared_faces / "biden" / "1.jpg", "--seed", "1",
                       "--steps", "2", "--no-progress", "-o", tmp_path / "k.png"])
    assert res.exit_code == 0, res.output + repr(res.exception)
    side = json.loads((tmp_path / "k.json").read_text())
    assert list(side)[:len(GENERATE_KEYS)] == GENERATE_KEYS and side["mode"] == "kontext-t2i"
    assert side["models"]["tiny"]["variant"] == "K" and Image.open(tmp_path / "k.png").size == (64, 64)
    plain, _ = _run(["generate", "--tiny", "-p", "a photo of two people", "-r", shared_faces / "obama" / "1.jpg",
                     "-r", shared_faces / "biden" / "1.jpg", "--seed", "1", "--steps", "2", "--no-progress",
                     "-o", tmp_path / "f.png"])
    assert plain.exit_code == 0 and "mode" not in json.loads((tmp_path / "f.json").read_text())


def test_which_bases_are_kontext(tmp_path):
    from withanyone.model.kontext import KONTEXT_BASE as CORE_BASE
    from withanyone.pipeline.kontext_source import KONTEXT_BASE, is_kontext_base, resolve_kontext_base

    assert KONTEXT_BASE == CORE_BASE == resolve_kontext_base("kontext")
    assert resolve_kontext_base("black-forest-labs/FLUX.1-dev") == "black-forest-labs/FLUX.1-dev"
    for folder, cls in (("k", "FluxKontextPipeline"), ("flux", "FluxPipeline"), ("kontext-named-flux", "FluxPipeline")):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "model_index.json").write_text(json.dumps({"_class_name": cls}))
    assert is_kontext_base(str(tmp_path / "k")) and is_kontext_base("kontext") and is_kontext_base(KONTEXT_BASE)
    assert not is_kontext_base(str(tmp_path / "flux")) and not is_kontext_base("black-forest-labs/FLUX.1-dev")
    assert not is_kontext_base(str(tmp_path / "kontext-named-flux"))  # a local folder: its model_index decides


def test_edit_loads_a_kontext_folder_and_ke_file_from_disk(tmp_path):
    """Without --tiny: a FLUX.1 Kontext diffusers folder, a release-layout Ke file and an insightface-format pack
    (tiny, in the real formats) load through --base/--adapter/--face-pack; the sidecar names them."""
    from diffusers import FluxKontextPipeline
    from tiny_models.insightface_pack import build_tiny_pack, paint_key

    from withanyone.pipeline.tiny import get_dummy_components, write_tiny_kontext_checkpoint

    FluxKontextPipeline(**get_dummy_components()).save_pretrained(tmp_path / "kontext")
    ke = write_tiny_kontext_checkpoint(tmp_path / "ke" / "withanyone_kontext_edit.safetensors")
    build_tiny_pack(tmp_path / "pack", num_anchors=1)
    rng = np.random.default_rng(3)
    photo = paint_key(rng.integers(60, 200, size=(256, 256, 3), dtype=np.uint8), 96, 64, 128, 96)
    Image.fromarray(photo).save(tmp_path / "photo.png")  # one "face" (the tiny detector's key colour)
    ref = paint_key(rng.integers(60, 200, size=(256, 256, 3), dtype=np.uint8), 128, 128, 160, 160)
    Image.fromarray(ref).save(tmp_path / "ref.png")
    listed = CliRunner().invoke(app, ["edit", str(tmp_path / "photo.png"), "--list-faces", "--face-pack",
                                      str(tmp_path / "pack")])
    assert listed.exit_code == 0, listed.output
    n = int(listed.stdout.split(": ", 1)[1].split(" face(s)")[0])
    assert n >= 1  # the tiny detector may fire on neighbouring cells of the square too
    res, _ = _run(["edit", tmp_path / "photo.png", "-r", tmp_path / "ref.png", "--replace", "0", "-p", "a person",
                   "--base", tmp_path / "kontext", "--adapter", ke, "--face-pack", tmp_path / "pack", "--size", "64",
                   "--steps", "1", "--seed", "0", "--device", "cpu", "--no-progress", "--keep-unreplaced",
                   "--out", tmp_path / "e.png"])
    assert res.exit_code == 0, res.output + repr(res.exception)
    side = json.loads((tmp_path / "e.json").read_text())
    assert side["models"]["base"]["path"] == str((tmp_path / "kontext").resolve())
    assert side["models"]["face_pack"] == str(tmp_path / "pack") and side["dtype"] == "float32"
    assert side["edit_plan"]["keep_unreplaced"] is True and Image.open(tmp_path / "e.png").size == (64, 64)


def test_faces_too_small_for_the_release_blur_are_warned(samples_dir, tmp_path):
    """The bundled ≤ 512 px copy of group/2.jpg: its faces are under the release's 100 px blur threshold, so the
    release's blur leaves them as they are, and the command says so."""
    res, _ = _run(["edit", samples_dir / "group" / "2.jpg", "-r", samples_dir / "obama" / "1.jpg", "--replace", "1",
                   "-p", "a man", "--tiny", "--steps", "1", "--no-progress", "--out", tmp_path / "e.png",
                   "--save-condition", tmp_path / "c.png"])
    assert res.exit_code == 0, res.output + repr(res.exception)
    said = " ".join(res.stderr.split())
    assert "warning: face 1 (" in said and "under the release's 100 px blur threshold, so not blurred" in said
    plan = json.loads((tmp_path / "e.json").read_text())["edit_plan"]
    t = plan["transform"]
    canvas = np.asarray(Image.open(samples_dir / "group" / "2.jpg").convert("RGB").crop(
        (t["left"], t["top"], t["left"] + t["crop_w"], t["top"] + t["crop_h"])).resize((128, 128), Image.LANCZOS),
        dtype=np.float32)
    x1, y1, x2, y2 = plan["face_boxes"][1]
    seen = np.asarray(Image.open(tmp_path / "c.png").convert("RGB"), dtype=np.float32)
    assert np.abs(seen - canvas)[y1:y2, x1:x2].mean() < 1.0  # the face is the photo's own

"""The app's Edit tab without a browser: the base photo's faces numbered left to right (as ``withanyone edit
--list-faces``) and drawn, a person of the Generate tab's people panel per face, one tiny edit with progress,
its sidecar (the CLI's edit keys), and the messages for a request that cannot run."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("gradio")


@pytest.fixture(scope="module")
def editor(tmp_path_factory):
    from withanyone.app import LoadOptions, Studio, load_models
    from withanyone.app.edit import Editor, KontextOptions

    studio = Studio(load_models(LoadOptions(tiny=True, device="cpu")), tmp_path_factory.mktemp("edit-out"))
    return Editor(studio, KontextOptions(tiny=True))


@pytest.fixture(scope="module")
def duo(shared_faces):
    from withanyone.app import Person

    return [Person("obama", [str(shared_faces / "obama" / "1.jpg")]),
            Person("biden", [str(shared_faces / "biden" / "1.jpg")])]


def test_numbered_faces_draws_each_box_and_number():
    from withanyone.app.edit import numbered_faces
    from withanyone.app.studio import COLORS

    im = numbered_faces(np.full((300, 400, 3), 40, np.uint8), [(50, 100, 150, 200), (250, 100, 350, 200)])
    a = np.asarray(im)
    assert im.size == (400, 300)
    for i, (x1, y1, x2, _) in enumerate([(50, 100, 150, 200), (250, 100, 350, 200)]):
        assert tuple(a[150, x1]) == COLORS[i] and tuple(a[150, x2]) == COLORS[i]  # the outline
        label = a[y1 - 25:y1, x1:x1 + 20]  # the number's tag above the box: its colour and white text
        assert (label == COLORS[i]).all(axis=2).any() and (label > 200).all(axis=2).any()
    assert (a[150, 200] == 40).all()  # nothing between the boxes


def test_base_photo_faces_match_the_cli_numbering(editor, shared_faces, dlib_analyzer):
    photo = shared_faces / "group" / "2.jpg"
    base = editor.analyse_base(str(photo))
    expected = sorted(dlib_analyzer.detect(photo), key=lambda f: f.bbox[0])
    assert len(base.faces) == 3 and base.size == (2000, 1428)
    np.testing.assert_allclose([f.bbox for f in base.faces], [f.bbox for f in expected], atol=1)
    assert base.sha256 == hashlib.sha256(photo.read_bytes()).hexdigest()
    assert editor.analyse_base(str(photo)) is base  # cached by content
    assert editor.preview(base).size == (2000, 1428)


def test_tiny_edit_puts_the_chosen_people_in_the_chosen_faces(editor, shared_faces, duo):
    photo = shared_faces / "group" / "2.jpg"  # faces: biden, obama, a child
    events = list(editor.edit("two men in suits", duo, str(photo), ["biden", None, "obama"], steps=2,
                              guidance=4.0, seed=5))
    assert [e["step"] for e in events[:-1]] == [1, 2]
    done = events[-1]
    assert done["image"].size == (128, 128) and done["before"].size == (128, 128) == done["condition"].size
    assert done["replace"] == [0, 2] and done["names"] == ["biden", "obama"] and done["seed"] == 5
    side = json.loads(open(done["sidecar_path"]).read())
    assert side["mode"] == "edit" and side["replace"] == [0, 2] and side["names"] == ["biden", "obama"]
    assert side["references"] == [[str(shared_faces / "biden" / "1.jpg")], [str(shared_faces / "obama" / "1.jpg")]]
    assert side["base_sha256"] == hashlib.sha256(photo.read_bytes()).hexdigest()
    plan = side["edit_plan"]
    assert side["boxes"] == [plan["face_boxes"][0], plan["face_boxes"][2]]
    assert Image.open(done["image_path"]).size == (128, 128)
    # before = the photo's canvas, unblurred: it differs from the condition only on the (blurred) faces
    before = np.asarray(done["before"], np.float32)
    cond = np.asarray(done["condition"], np.float32)
    x1, y1, x2, y2 = plan["face_boxes"][1]
    assert np.abs(before - cond)[y1:y2, x1:x2].mean() > 3 * np.abs(before - cond)[:30, :30].mean()


def test_edit_requests_that_cannot_run_say_why(editor, shared_faces, duo):
    from withanyone.app import Person

    photo = str(shared_faces / "group" / "2.jpg")
    cases = [
        (("x", duo, photo, [None, None, None]), "pick a person for at least one face"),
        (("x", duo, photo, ["obama", "obama", None]), "obama is picked for two faces"),
        (("x", duo, photo, ["carol", None, None]), "face 0: 'carol' is not one of the people (obama, biden)"),
        (("", duo, photo, ["obama", None, None]), "write a prompt first"),
        (("x", duo, "", ["obama"]), "upload the photo to edit first"),
        (("x", [Person("carol", [])], photo, ["carol", None, None]),
         "carol: no photo with a detectable face — upload one (in the Generate tab's people panel)"),
        (("x", duo, str(shared_faces / "group" / "1.jpg"), ["obama", "biden"]), "no square crop holds them all"),
    ]
    for args, message in cases:
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
            list(editor.edit(*args, steps=1, guidance=4.0, seed=1))


def test_missing_kontext_weights_are_a_message(editor, tmp_path):
    from withanyone.app.edit import Editor, KontextOptions

    missing = Editor(editor.studio, KontextOptions(base=str(tmp_path / "no-kontext"),
                                                   adapter=str(tmp_path / "no-ke.safetensors")))
    with pytest.raises(ValueError, match=r"could not be loaded: .*no-ke\.safetensors is missing") as err:
        missing.pipeline()
    assert "hf download" not in str(err.value) and "--kontext-adapter" in str(err.value)  # local paths: no hub hint
    with pytest.raises(ValueError, match="could not be loaded"):  # remembered, not retried on every click
        missing.pipeline()


def test_small_faces_left_unblurred_are_warned(editor, samples_dir, duo):
    """The bundled ≤ 512 px group photo: its faces are under the release's 100 px blur threshold."""
    done = list(editor.edit("x", duo, str(samples_dir / "group" / "2.jpg"), [None, "obama", None], steps=1,
                            guidance=4.0, seed=1))[-1]
    assert done["warning"].startswith("face 1 (") and "not blurred" in done["warning"]

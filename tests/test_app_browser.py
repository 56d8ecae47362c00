"""WithAnyone Studio in a real headless Chromium (Debian's ``chromium`` package, driven by Playwright):
``withanyone app --tiny`` on a free local port, two people from ../shared photos plus a photo without a face,
a box moved with the mouse, generate, then check the image size, the last progress step, the warning, the
sidecar download (seed + boxes), and non-blank screenshots of both tabs."""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.browser

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _not_blank(path: Path) -> None:
    arr = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32)
    assert arr.shape[0] > 300 and arr.shape[1] > 300
    assert arr.std() > 10, f"{path} looks blank (std {arr.std():.1f})"
    assert len(np.unique(arr.reshape(-1, 3)[::7], axis=0)) > 200, f"{path} has too few colours"


_GEOMETRY = """(sel) => [...document.querySelectorAll(sel + ' img')].map(img => {
    const r = img.getBoundingClientRect(), w = img.closest('.grid-wrap').getBoundingClientRect();
    return {fit: getComputedStyle(img).objectFit, img: [r.top, r.bottom, r.left, r.right],
            wrap: [w.top, w.bottom, w.left, w.right]};})"""


def _whole_images(page, galleries: list[str]) -> None:
    """Each gallery's first-row images lie wholly inside its visible area and are letterboxed, not cropped
    (Gradio's square thumbnails as wide as a column used to be clipped by the gallery's height)."""
    for sel in galleries:
        imgs = page.evaluate(_GEOMETRY, sel)
        assert imgs, f"{sel}: no image"
        top = min(i["img"][0] for i in imgs)
        for i in (i for i in imgs if i["img"][0] == top):
            (t, b, left, right), (wt, wb, wl, wr) = i["img"], i["wrap"]
            assert i["fit"] == "contain", (sel, i)
            assert wt - 0.5 <= t and b <= wb + 0.5 and wl - 0.5 <= left and right <= wr + 0.5, (sel, i)


@pytest.fixture(scope="module")
def studio_url(tmp_path_factory):
    if CHROMIUM is None:
        pytest.skip("headless Chromium not installed (apt-get install chromium)")
    pytest.importorskip("playwright.sync_api")
    pytest.importorskip("gradio")
    pytest.importorskip("gradio_image_annotation")
    out = tmp_path_factory.mktemp("studio-out")
    port = _free_port()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]),
               GRADIO_ANALYTICS_ENABLED="False", HF_HUB_OFFLINE="1")
    log = open(out / "app.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "withanyone", "app", "--tiny", "--host", "127.0.0.1", "--port",
                             str(port), "--out", str(out / "images")], env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 180
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail(f"app did not start: {(out / 'app.log').read_text()[-3000:]}")
        time.sleep(1)
    yield url
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


def test_studio_generates_in_a_real_browser(studio_url, samples_dir, tmp_path):
    from app_helpers import bench_results, faceless_photo
    from playwright.sync_api import expect, sync_playwright

    landscape = faceless_photo(tmp_path / "landscape.jpg")
    results = bench_results(samples_dir, tmp_path / "bench-results")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 1100})
        page.set_default_timeout(60_000)
        expect.set_options(timeout=60_000)
        page.goto(studio_url)
        expect(page.locator("#banner")).to_contain_text("images are noise from a tiny random model")

        page.fill("#name0 textarea, #name0 input", "obama")
        page.fill("#name1 textarea, #name1 input", "biden")
        page.locator("#photos0 input[type=file]").set_input_files(
            [str(samples_dir / "obama" / "1.jpg"), str(samples_dir / "obama" / "2.jpg")])
        page.locator("#photos1 input[type=file]").set_input_files(
            [str(samples_dir / "biden" / "1.jpg"), str(landscape)])
        expect(page.locator("#warn1")).to_contain_text("landscape.jpg: no face found")
        expect(page.locator("#warn0")).to_contain_text("2 usable photo(s): identity = their mean")
        expect(page.locator("#crops0 img")).to_have_count(2)
        expect(page.locator("#crops1 img")).to_have_count(1)

        # a layout photo showing the two people, biden left and obama right: assigned by identity, shown
        page.get_by_label("layout photo").check()
        page.locator("#layout input[type=file]").set_input_files(str(samples_dir / "group" / "2.jpg"))
        expect(page.locator("#layout_msg")).to_contain_text("matched by identity: obama (cos")
        expect(page.locator("#layout_view img")).to_be_visible()

        page.get_by_label("16:9 (224×128)").check()  # the 16:9 preset is 224×128 in --tiny
        expect(page.locator("#width input")).to_have_value("224")
        page.locator("#reset_boxes").click()
        page.get_by_label("boxes drawn on the canvas").check()
        page.locator("#steps input[type=number]").fill("3")
        page.locator("#steps input[type=number]").press("Enter")

        # move the first face box with the mouse: drag from its centre 24 canvas pixels right and 10 down
        canvas = page.locator("#board canvas")
        time.sleep(1.0)  # let the canvas draw the refreshed boxes
        bb = canvas.bounding_box()
        from withanyone.pipeline.layout import auto_boxes

        preset = auto_boxes(2, 128, 224)
        # the annotator fits the 224×128 image inside the canvas, centred, keeping the aspect ratio
        scale = min(bb["width"] / 224, bb["height"] / 128)
        ox, oy = bb["x"] + (bb["width"] - 224 * scale) / 2, bb["y"] + (bb["height"] - 128 * scale) / 2
        cx, cy = (preset[0][0] + preset[0][2]) / 2, (preset[0][1] + preset[0][3]) / 2
        page.mouse.move(ox + cx * scale, oy + cy * scale)
        page.mouse.down()
        page.mouse.move(ox + (cx + 12) * scale, oy + (cy + 5) * scale, steps=5)
        page.mouse.move(ox + (cx + 24) * scale, oy + (cy + 10) * scale, steps=5)
        page.mouse.up()
        time.sleep(0.5)

        page.locator("#generate").click()
        expect(page.locator("#status")).to_contain_text("done", timeout=120_000)
        status = page.inner_text("#status")
        assert "denoising step 3/3" in status, status
        shown_seed = int(page.locator("#seed input").input_value())
        assert f"seed {shown_seed}" in status

        img = page.locator("#gallery img").first
        expect(img).to_be_visible()
        size = page.evaluate("(el) => [el.naturalWidth, el.naturalHeight]", img.element_handle())
        assert size == [224, 128]
        _whole_images(page, ["#gallery", "#crops0", "#crops1"])

        links = page.locator("#downloads a")
        expect(links).to_have_count(2)
        hrefs = [links.nth(i).get_attribute("href") for i in range(2)]
        json_href = next(h for h in hrefs if h.split("?")[0].endswith(".json"))
        png_href = next(h for h in hrefs if h.split("?")[0].endswith(".png"))
        sidecar = json.loads(page.request.get(json_href).body())
        assert Image.open(io.BytesIO(page.request.get(png_href).body())).size == (224, 128)
        assert sidecar["seed"] == shown_seed and sidecar["box_mode"] == "explicit"
        assert sidecar["width"] == 224 and sidecar["height"] == 128 and sidecar["steps"] == 3
        assert sidecar["names"] == ["obama", "biden"] and len(sidecar["boxes"]) == 2
        moved, kept = sidecar["boxes"]
        assert kept == pytest.approx(list(preset[1]), abs=1.01)
        dx, dy = moved[0] - preset[0][0], moved[1] - preset[0][1]
        assert 18 <= dx <= 30 and 5 <= dy <= 15, (moved, preset[0])  # the mouse drag moved it
        assert moved[2] - moved[0] == pytest.approx(preset[0][2] - preset[0][0], abs=1.01)

        page.get_by_label("draw the face boxes on the results").check()
        shot_gen = tmp_path / "studio-generate.png"
        page.screenshot(path=str(shot_gen), full_page=True)
        _not_blank(shot_gen)

        page.get_by_role("tab", name="Bench explorer").click()
        page.fill("#bench_folder textarea, #bench_folder input", str(results))
        page.locator("#bench_open").click()
        expect(page.locator("#bench_msg")).to_contain_text("methods gt-copy, mirrored")
        expect(page.locator("#bench_info")).to_contain_text("duo")
        expect(page.locator("#bench_table")).to_contain_text("gt-copy")
        expect(page.locator("#bench_table")).to_contain_text("-1.000")
        _whole_images(page, ["#bench_refs", "#bench_outputs"])
        shot_bench = tmp_path / "studio-bench.png"
        page.screenshot(path=str(shot_bench), full_page=True)
        _not_blank(shot_bench)
        browser.close()
    keep = os.environ.get("WITHANYONE_SCREENSHOTS")
    if keep:  # how docs/app-*.png were made
        for shot in (shot_gen, shot_bench):
            shutil.copy(shot, Path(keep) / shot.name)


def test_edit_tab_replaces_a_face_in_a_real_browser(studio_url, shared_faces, tmp_path):
    """The Edit tab: people from the Generate tab's panel, a group photo uploaded, its faces numbered, one face
    given a person, edited; the result has the canvas size and the sidecar says which face was replaced."""
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 1100})
        page.set_default_timeout(60_000)
        expect.set_options(timeout=60_000)
        page.goto(studio_url)
        page.fill("#name0 textarea, #name0 input", "obama")
        page.fill("#name1 textarea, #name1 input", "biden")
        page.locator("#photos0 input[type=file]").set_input_files(str(shared_faces / "obama" / "1.jpg"))
        page.locator("#photos1 input[type=file]").set_input_files(str(shared_faces / "biden" / "1.jpg"))
        expect(page.locator("#warn0")).to_contain_text("1 usable photo(s)")
        expect(page.locator("#warn1")).to_contain_text("1 usable photo(s)")

        page.get_by_role("tab", name="Edit").click()
        page.locator("#edit_photo input[type=file]").set_input_files(str(shared_faces / "group" / "2.jpg"))
        expect(page.locator("#edit_faces_msg")).to_contain_text("3 face(s) found")
        expect(page.locator("#edit_faces img")).to_be_visible()
        expect(page.locator("#edit_face2")).to_be_visible()
        expect(page.locator("#edit_face3")).to_be_hidden()
        # face 1 (obama, in the middle) becomes biden; the others keep their faces
        picker = page.locator("#edit_face1 input")
        picker.click()
        picker.fill("biden")
        picker.press("Enter")
        expect(picker).to_have_value("biden")
        page.locator("#edit_steps input[type=number]").fill("2")
        page.locator("#edit_steps input[type=number]").press("Enter")
        page.locator("#edit_go").click()
        expect(page.locator("#edit_status")).to_contain_text("done", timeout=120_000)
        status = page.inner_text("#edit_status")
        assert "denoising step 2/2" in status and "face 1 → biden" in status, status

        for elem in ("#edit_after", "#edit_before"):
            img = page.locator(f"{elem} img").first
            expect(img).to_be_visible()
            assert page.evaluate("(el) => [el.naturalWidth, el.naturalHeight]", img.element_handle()) == [128, 128]
        links = page.locator("#edit_downloads a")
        expect(links).to_have_count(2)
        hrefs = [links.nth(i).get_attribute("href") for i in range(2)]
        sidecar = json.loads(page.request.get(next(h for h in hrefs if h.split("?")[0].endswith(".json"))).body())
        png = page.request.get(next(h for h in hrefs if h.split("?")[0].endswith(".png"))).body()
        assert Image.open(io.BytesIO(png)).size == (128, 128)
        assert sidecar["mode"] == "edit" and sidecar["replace"] == [1] and sidecar["names"] == ["biden"]
        assert sidecar["steps"] == 2 and sidecar["boxes"] == [sidecar["edit_plan"]["face_boxes"][1]]
        import hashlib

        # the upload reaches the pipeline byte for byte: the sidecar's hash is the user's file's
        assert sidecar["base_sha256"] == hashlib.sha256((shared_faces / "group" / "2.jpg").read_bytes()).hexdigest()

        page.get_by_text("what the model saw").click()
        expect(page.locator("#edit_condition img")).to_be_visible()
        shot = tmp_path / "studio-edit.png"
        page.screenshot(path=str(shot), full_page=True)
        _not_blank(shot)

        # renaming a person in the Generate tab's panel renames them in the Edit tab's dropdowns
        page.get_by_role("tab", name="Generate").click()
        page.fill("#name1 textarea, #name1 input", "joe")
        page.locator("#name1 textarea, #name1 input").blur()
        page.get_by_role("tab", name="Edit").click()
        expect(picker).to_have_value("nobody (not replaced)")  # biden is gone: that face goes back to nobody
        picker.click()
        picker.fill("joe")
        picker.press("Enter")
        expect(picker).to_have_value("joe")
        browser.close()
    keep = os.environ.get("WITHANYONE_SCREENSHOTS")
    if keep:  # how docs/app-edit.png was made
        shutil.copy(shot, Path(keep) / shot.name)

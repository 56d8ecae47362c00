"""Failure taxonomy (issue 19 item 4): rules on hand-made similarity vectors, the labels of real-photo
canvases on every face backend available, and the runner → report → explorer path with its counts.

The canvases hold aligned 256² crops of real photos (``real_faces``: ../shared/data/faces, else the bundled
samples/faces) in slots; the references are photo 1 of each person, padded as the runner pads them, the slot
faces other photos of them: a clean pair, the pair swapped, a repeated person, a 50/50 pixel blend of the two
people's aligned faces, a stranger (somebody with no reference) in a slot.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from withanyone.bench.taxonomy import (
    LABELS,
    MISSING_DATA,
    NONE,
    TaxonomyThresholds,
    aligned_crop,
    assign_slots,
    classify,
    classify_row,
    pixel_blend,
    place_in_slots,
    slot_boxes_for,
    slot_data,
    thresholds_for,
)

TH = TaxonomyThresholds(drift=0.5, blend_floor=0.45, blend_margin=0.05)


# --------------------------------------------------------------------------------------------- the rules


def test_rules_on_handmade_vectors():
    clean = classify([[0.9, 0.1], [0.2, 0.8]], 0, TH)
    assert (clean.labels, clean.primary, clean.slots) == ([], NONE, ["ok", "ok"])
    swap = classify([[0.1, 0.9], [0.8, 0.2]], 0, TH)
    assert (swap.labels, swap.primary, swap.best) == (["swap"], "swap", [1, 0])
    # a repeated person: reference 0 wins both slots; slot 1 is a swap too, dominance is the primary label
    dom = classify([[0.9, 0.1], [0.85, 0.3]], 0, TH)
    assert (dom.labels, dom.primary, dom.slots) == (["dominance", "swap"], "dominance", ["ok", "swap"])
    blend = classify([[0.6, 0.57], [0.2, 0.8]], 0, TH)
    assert (blend.labels, blend.slots) == (["blending"], ["blending", "ok"])
    # within the margin but the second below the floor: no blend; the best below drift: drift
    drift = classify([[0.44, 0.42], [0.2, 0.8]], 0, TH)
    assert (drift.labels, drift.slots) == (["drift"], ["drift", "ok"])
    # a blended slot never counts towards dominance
    assert classify([[0.58, 0.6], [0.2, 0.8]], 0, TH).labels == ["blending"]
    missing = classify([[0.9, 0.1], None], 0, TH)
    assert (missing.labels, missing.slots) == (["missing"], ["ok", "empty"])
    extra = classify([[0.1, 0.9], [0.8, 0.2]], 1, TH)
    assert (extra.labels, extra.primary) == (["extra", "swap"], "extra")
    one = classify([[0.3]], 0, TH)  # one person: only drift / missing / extra can happen
    assert one.labels == ["drift"]
    assert LABELS.index("missing") < LABELS.index("dominance") < LABELS.index("swap") < LABELS.index("drift")


def test_rows_and_thresholds():
    row = {"status": "ok", "num_persons": 2, "slot_sims": [[0.1, 0.9], [0.8, 0.2]], "extra_faces": 0}
    assert classify_row(row, TH).primary == "swap"
    assert classify_row({"status": "failed", "reason": "no face in output", "num_persons": 3}, TH).slots == ["empty"] * 3
    assert classify_row({"status": "failed", "reason": "no output for this sample"}, TH) is None
    assert classify_row({"status": "ok", "slot_sims": None}, TH) is None
    assert classify_row({"status": "ok", "slot_sims": [["x", None], 3]}, TH) is None  # malformed: unclassified
    assert thresholds_for("dlib").calibrated and not thresholds_for("antelopev2").calibrated
    assert thresholds_for("insightface") is thresholds_for("buffalo_l")
    with pytest.raises(ValueError, match="no failure-taxonomy thresholds"):
        thresholds_for("mystery")


def test_summary_counts_and_one_person_only():
    from withanyone.bench.taxonomy import taxonomy_html, taxonomy_md, taxonomy_summary

    def row(sample, n, sims, **kw):
        return {"sample": sample, "method": "m", "face_model": "dlib", "num_persons": n, "status": "ok",
                "slot_sims": sims, "extra_faces": 0, **kw}

    rows = [row("a", 2, [[0.8, 0.95], [0.95, 0.8]]), row("b", 2, [[0.95, 0.8], [0.8, 0.95]]),
            row("c", 1, [[0.7]]), row("d", 2, None),
            {"sample": "e", "method": "m", "face_model": "dlib", "num_persons": 3, "status": "failed",
             "reason": "no face in output"}]
    tax = taxonomy_summary(rows, [{"name": "dlib", "backend": "dlib"}], ["m"], "bench")
    e = tax["methods"]["dlib"]["m"]
    assert (e["n"], e["unclassified"], e["failed"]) == (3, 1, 2 / 3)
    assert e["rates"]["swap"] == 1 / 3 and e["rates"]["missing"] == 1 / 3 and e["rates"]["drift"] == 0
    by = tax["by_people"]["dlib"]["bench"]["m"]
    assert (by["1"]["drift"], by["2"]["swap"], by["2"]["none"], by["3"]["missing"]) == (1, 1, 1, 1)
    assert by["2"]["n"] == 2 and "0" not in by  # the unclassified row is in no bar
    one = taxonomy_summary(rows[2:3], [{"name": "dlib", "backend": "dlib"}], ["m"], "bench")
    assert "No multi-person samples." in "\n".join(taxonomy_md({"taxonomy": one}))
    assert "<table" not in taxonomy_html({"taxonomy": one})
    from withanyone.bench.taxonomy import taxonomy_lines

    assert taxonomy_lines({"taxonomy": tax}) == [
        "failure taxonomy (dlib, multi-person samples, primary labels): m: missing 1, swap 1 (n=3)"]


def test_slot_assignment():
    slots = [[0, 0, 100, 100], [200, 0, 300, 100]]
    # most of face 0 lies in slot 1; face 1 in slot 0
    assert assign_slots([[180, 10, 260, 90], [10, 10, 90, 90]], slots) == [1, 0]
    # a face overlapping no slot goes to the free slot whose centre is nearest; a face left over is extra
    assert assign_slots([[10, 10, 90, 90], [400, 0, 480, 80], [20, 20, 80, 80]], slots) == [0, 1]
    assert assign_slots([], slots) == [None, None]
    emb = np.eye(3)[:2]
    d = slot_data(emb, [[10, 10, 90, 90]], slots, np.eye(3)[:2])
    assert d["slot_faces"] == [0, None] and d["slot_sims"] == [[1.0, 0.0], None] and d["extra_faces"] == 0
    d = slot_data(np.eye(3), [[10, 10, 90, 90], [210, 0, 290, 90], [500, 0, 560, 60]], slots, np.eye(3)[:2])
    assert d["extra_faces"] == 1 and d["slot_faces"] == [0, 1]
    # boxes in another frame (a pose image's), as fractions, or in output pixels
    assert slot_boxes_for([[0, 0, 50, 50]], {"boxes_size": [100, 200]}, (200, 400), None) == [[0, 0, 100, 100]]
    assert slot_boxes_for([[0, 0, 0.5, 0.5]], {}, (200, 400), None) == [[0, 0, 100, 200]]
    assert slot_boxes_for([[0, 0, 50, 50]], {}, (200, 400), None) == [[0, 0, 50, 50]]
    assert slot_boxes_for(None, {}, (200, 400), [[1, 2, 3, 4]]) == [[1, 2, 3, 4]]
    assert slot_boxes_for(None, {}, (200, 400), None) is None


# ----------------------------------------------------------------------------------- real-photo canvases


def _analyzer(backend: str, dlib_analyzer):
    if backend == "dlib":
        return dlib_analyzer
    from withanyone.errors import ModelNotFoundError
    from withanyone.faces import FaceAnalyzer
    from withanyone.faces.packs import find_pack

    try:
        find_pack("antelopev2", hub=False)
    except ModelNotFoundError:
        pytest.skip("insightface antelopev2 pack not available offline (its thresholds are uncalibrated)")
    return FaceAnalyzer("insightface", pack="antelopev2")


def _largest(analyzer, image):
    faces = analyzer.detect(image)
    assert faces, "no face found"
    return max(faces, key=lambda f: f.area)


class Canvases:
    """Aligned crops, reference embeddings and the canvases of each case for one analyzer."""

    def __init__(self, analyzer, faces: Path):
        from withanyone.bench.cache import REF_PAD, pad_to_square
        from withanyone.faces import load_image

        self.analyzer = analyzer
        self.faces = faces

        def load(person: str, k: int) -> np.ndarray:  # ≤ 512 px (as samples/faces): quicker to detect on
            im = Image.fromarray(load_image(faces / person / f"{k}.jpg"))
            im.thumbnail((512, 512), Image.LANCZOS)
            return np.asarray(im)

        def crop(person: str, k: int) -> np.ndarray:
            im = load(person, k)
            return aligned_crop(im, _largest(analyzer, im).landmarks)

        self.refs = np.stack([_largest(analyzer, pad_to_square(load(p, 1), REF_PAD)[0]).embedding
                              for p in ("obama", "biden")])
        self.ref_images = {p: load(p, 1) for p in ("obama", "biden")}
        a, a3, b, s = crop("obama", 2), crop("obama", 3), crop("biden", 2), crop("kit_harington", 2)
        self.crops = {"obama": a, "obama3": a3, "biden": b, "stranger": s}
        self.cases = {"clean": [a, b], "swap": [b, a], "dominance": [a, a3], "blend": [pixel_blend(a, b), b],
                      "stranger": [s, b], "missing": [a, None]}

    def classify(self, case: str):
        canvas, slots = place_in_slots(self.cases[case])
        faces = self.analyzer.detect(canvas)
        emb = np.stack([f.embedding for f in faces]) if faces else np.zeros((0, self.refs.shape[1]))
        d = slot_data(emb, [f.bbox.tolist() for f in faces], slots, self.refs)
        return classify(d["slot_sims"], d["extra_faces"], thresholds_for(self.analyzer.backend_name)), d


_CANVASES: dict[str, Canvases] = {}


def _canvases(backend: str, dlib_analyzer, faces: Path) -> Canvases:
    if backend not in _CANVASES:
        _CANVASES[backend] = Canvases(_analyzer(backend, dlib_analyzer), faces)
    return _CANVASES[backend]


@pytest.fixture(scope="module", params=["dlib", "insightface"])
def canvases(request, dlib_analyzer, real_faces):
    return _canvases(request.param, dlib_analyzer, real_faces)


@pytest.mark.parametrize("case,labels", [("clean", []), ("swap", ["swap"]), ("dominance", ["dominance", "swap"]),
                                         ("blend", ["blending"]), ("stranger", ["drift"]),
                                         ("missing", ["missing"])])
def test_real_photo_cases(canvases, case, labels):
    tax, d = canvases.classify(case)
    assert tax.labels == labels, (case, tax, d["slot_sims"])
    assert tax.primary == (labels[0] if labels else NONE)
    if case == "blend":  # the blended slot resembles both people, within the margin
        s = d["slot_sims"][0]
        assert abs(s[0] - s[1]) < thresholds_for(canvases.analyzer.backend_name).blend_margin


# ------------------------------------------------------------------------------- runner, report, explorer


def _write_case(folder: Path, canvases: Canvases, case: str) -> Path:
    canvas, _ = place_in_slots(canvases.cases[case])
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(canvas).save(folder / f"{case}.png")
    return folder / f"{case}.png"


@pytest.fixture(scope="module")
def scored(tmp_path_factory, dlib_analyzer, real_faces):
    """A two-sample benchmark (GT = the clean canvas, bboxes = its slots) and five methods, scored and reported."""
    from withanyone.bench.readers import read_folder_layout, read_method_outputs
    from withanyone.bench.report import write_reports
    from withanyone.bench.runner import run_benchmark

    cv = _canvases("dlib", dlib_analyzer, real_faces)
    root = tmp_path_factory.mktemp("taxonomy")
    _, slots = place_in_slots(cv.cases["clean"])
    bench_dir = root / "bench"
    for sid in ("s1", "s2"):
        d = bench_dir / sid
        d.mkdir(parents=True)
        Image.fromarray(place_in_slots(cv.cases["clean"])[0]).save(d / "ori.png")
        for k, p in enumerate(("obama", "biden"), 1):
            Image.fromarray(cv.ref_images[p]).save(d / f"ref_{k}.png")
        (d / "meta.json").write_text(json.dumps({"prompt": "obama and biden", "num_persons": 2, "bboxes": slots}))
    bench, _ = read_folder_layout(bench_dir, gt_name="ori.png", ref_names=("ref_1.png", "ref_2.png"),
                                  output_name=None)
    # per method, the case of each sample
    plan = {"oracle": ("clean", "clean"), "swapper": ("swap", "clean"), "cloner": ("dominance", "dominance"),
            "blender": ("blend", "swap"), "dropper": ("missing", "stranger")}
    methods = []
    for m, cases in plan.items():
        for sid, case in zip(("s1", "s2"), cases, strict=True):
            p = _write_case(root / "cases", cv, case)
            (root / "methods" / m).mkdir(parents=True, exist_ok=True)
            (root / "methods" / m / f"{sid}.png").write_bytes(p.read_bytes())
        methods.append(read_method_outputs(root / "methods" / m, m, sample_ids=["s1", "s2"]))
    out = root / "results"
    stats = run_benchmark(bench, methods, out, face_models=["dlib"], progress=False)
    summary = write_reports(out)
    return {"bench": bench, "methods": methods, "out": out, "stats": stats, "summary": summary, "plan": plan}


def test_report_rates_table_and_plot(scored):
    s, out = scored["summary"], scored["out"]
    tax = s["taxonomy"]["methods"]["dlib"]
    expected = {  # labels per case, as the real-photo cases give them
        "clean": set(), "swap": {"swap"}, "dominance": {"dominance", "swap"}, "blend": {"blending"},
        "missing": {"missing"}, "stranger": {"drift"}}
    for m, cases in scored["plan"].items():
        e = tax[m]
        assert e["n"] == 2 and e["unclassified"] == 0
        for lab in LABELS:
            assert e["rates"][lab] == sum(lab in expected[c] for c in cases) / 2, (m, lab, e)
        assert e["failed"] == sum(bool(expected[c]) for c in cases) / 2
    assert s["taxonomy"]["thresholds"]["dlib"]["calibrated"] is True
    by = s["taxonomy"]["by_people"]["dlib"]
    (src,) = by
    assert by[src]["cloner"]["2"] == {**{lab: 0 for lab in (*LABELS, NONE)}, "dominance": 2, "n": 2}
    assert by[src]["dropper"]["2"]["missing"] == 1 and by[src]["dropper"]["2"]["drift"] == 1
    md = (out / "report.md").read_text()
    assert "## Failure taxonomy (multi-person samples)" in md
    assert "| swapper | 2 | 50 % | 0 % | 0 % | 0 % | 50 % | 0 % | 0 % | 0 |" in md
    assert "| cloner | 2 | 100 % | 0 % | 0 % | 100 % | 100 % | 0 % | 0 % | 0 |" in md
    assert "![failures by people count, dlib](failures_dlib.png)" in md
    png = Image.open(out / "failures_dlib.png")
    assert png.size[0] > 400 and png.size[1] > 300
    # the plot is drawn: its pixels hold the dominance and swap colours (stacked bars)
    px = np.asarray(png.convert("RGB")).reshape(-1, 3)
    for colour in ((214, 39, 40), (255, 127, 14), (148, 103, 189), (140, 86, 75)):
        assert (np.abs(px.astype(int) - colour).sum(1) < 12).sum() > 50, colour
    html = (out / "report.html").read_text()
    assert "<table class='taxonomy' data-face-model='dlib'>" in html
    assert html.count("alt='failures by people count, dlib'") == 1


def test_explorer_column_and_filter(scored):
    html = (scored["out"] / "report.html").read_text()
    assert "id='explorer_filter'" in html and "filterExplorer" in html
    assert "<option value='dominance'>dominance (2)</option>" in html
    assert "<option value='swap'>swap (4)</option>" in html  # swapper s1, cloner s1 + s2, blender s2
    assert html.count("data-labels='dominance swap'") == 2
    assert html.count("data-labels='none'") == 3  # oracle s1, s2; swapper s2


def test_old_rows_rescored_once(scored, tmp_path):
    """Rows without the taxonomy fields (an older version's) are rescored once, then reused."""
    import shutil

    from withanyone.bench.runner import RESULTS, load_results, run_benchmark

    out = tmp_path / "results"
    shutil.copytree(scored["out"], out)
    rows = load_results(out)
    old = [{k: v for k, v in r.items() if k not in ("slot_sims", "slot_faces", "slot_boxes", "extra_faces")}
           for r in rows]
    (out / RESULTS).write_text("".join(json.dumps(r) + "\n" for r in old))
    stats = run_benchmark(scored["bench"], scored["methods"], out, face_models=["dlib"], progress=False)
    assert stats.rows_rescored == 10 and stats.rescore_reasons == {MISSING_DATA: 10}
    assert stats.calls["dlib"]["detect"] == 0  # faces from the cache
    new = {(r["sample"], r["method"]): r["slot_sims"] for r in load_results(out)}
    assert new == {(r["sample"], r["method"]): r["slot_sims"] for r in rows}
    again = run_benchmark(scored["bench"], scored["methods"], out, face_models=["dlib"], progress=False)
    assert again.rows_rescored == 0 and again.rows_skipped == 10


def test_app_explorer_failure_filter(scored):
    from withanyone.app.bench_explorer import BenchResults

    res = BenchResults(scored["out"])
    ids = lambda items: [sid for _, sid in items]  # noqa: E731
    assert ids(res.sample_list("dlib", failure="dominance")) == ["s1", "s2"]  # cloner, both samples
    assert ids(res.sample_list("dlib", failure="missing")) == ["s1"]  # dropper s1
    assert ids(res.sample_list("dlib", method="swapper", failure="swap")) == ["s1"]
    assert ids(res.sample_list("dlib", method="swapper", failure="none")) == ["s2"]
    assert ids(res.sample_list("dlib", method="oracle", failure="blending")) == []
    assert ids(res.sample_list("dlib", failure="any")) == ["s1", "s2"]
    row = next(r for r in res.rows if r["method"] == "blender" and r["sample"] == "s1")
    assert res.failure(row).labels == ["blending"]


@pytest.mark.slow
@pytest.mark.browser
def test_explorer_filter_in_headless_chromium(scored):
    """The failure select hides the rows without the label (the report's inline script, in a real browser)."""
    import shutil

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("headless Chromium not installed (Debian package 'chromium')")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto((scored["out"] / "report.html").as_uri())
            rows = page.locator("#explorer > tbody > tr")
            visible = {}
            for label in ("dominance", "swap", "missing", "none", "all"):
                page.select_option("#explorer_filter", label)
                visible[label] = sum(rows.nth(i).is_visible() for i in range(rows.count()))
            assert visible == {"dominance": 2, "swap": 4, "missing": 1, "none": 3, "all": 10}
            assert errors == []
        finally:
            browser.close()


def test_sample_without_gt_uses_its_own_boxes(scored, tmp_path):
    """A MultiHuman-Testbench-like sample: no GT, boxes in another frame (``meta["boxes_size"]``), a source tag."""
    from withanyone.bench.report import summarize
    from withanyone.bench.runner import load_results, run_benchmark
    from withanyone.bench.samples import Benchmark, MethodOutputs, Sample

    s1 = scored["bench"].by_id()["s1"]
    canvas = Image.open(scored["methods"][1].outputs["s1"])  # swapper's s1: the pair swapped
    _, slots = place_in_slots([None, None])
    half = [[v / 2 for v in b] for b in slots]  # the boxes in a frame half the output's size
    sample = Sample("mh1", "two people", s1.references, gt=None, boxes=half, num_persons=2,
                    meta={"boxes_size": [canvas.width / 2, canvas.height / 2], "source": "multihuman-testbench"})
    out = tmp_path / "results"
    run_benchmark(Benchmark("mh", [sample]), [MethodOutputs("swapper", {"mh1": scored["methods"][1].outputs["s1"]})],
                  out, face_models=["dlib"], progress=False)
    (row,) = load_results(out)
    assert row["slot_boxes"] == [[round(v, 6) for v in b] for b in slots] and row["source"] == "multihuman-testbench"
    assert classify_row(row, thresholds_for("dlib")).labels == ["swap"]
    tax = summarize(out)["taxonomy"]
    assert tax["by_people"]["dlib"]["multihuman-testbench"]["swapper"]["2"]["swap"] == 1


@pytest.mark.slow
def test_multihuman_testbench_samples_are_classified(tmp_path, dlib_analyzer, real_faces):
    """MultiHuman-Testbench in the published layout (the mhtb tests' builder), converted: its slots are the
    pose image's head boxes (1024², rescaled to a 768 × 576 output). Each person's face pasted on its own
    head → no failure; the first two exchanged → swap; one panel of the plot per benchmark source."""
    from test_bench_multihuman import NUM_SIMPLE, build_repo

    from withanyone.bench.multihuman import SOURCE, convert_multihuman
    from withanyone.bench.readers import read_method_outputs
    from withanyone.bench.report import write_reports
    from withanyone.bench.runner import load_results, run_benchmark
    from withanyone.faces import load_image

    repo = build_repo(tmp_path, real_faces, dlib_analyzer)
    bench, _ = convert_multihuman(repo, tmp_path / "bench", progress=False, num_simple=NUM_SIMPLE)
    w, h, side = 768, 576, 160
    crops = {}
    for method, order in (("on-pose", None), ("swapped", (1, 0))):
        folder = tmp_path / method
        folder.mkdir()
        for s in bench:
            faces = []
            for r in s.references:
                if r not in crops:
                    im = load_image(r)
                    crops[r] = aligned_crop(im, _largest(dlib_analyzer, im).landmarks, size=side)
                faces.append(crops[r])
            if order and len(faces) > 1:
                faces[0], faces[1] = faces[1], faces[0]
            canvas = np.zeros((h, w, 3), np.uint8)
            fx, fy = w / s.meta["pose_size"][0], h / s.meta["pose_size"][1]
            for crop, b in zip(faces, s.boxes, strict=True):
                cx, cy = (b[0] + b[2]) / 2 * fx, (b[1] + b[3]) / 2 * fy
                x, y = int(cx - side / 2), int(min(max(cy - side / 2, 0), h - side))
                canvas[y:y + side, x:x + side] = crop
            Image.fromarray(canvas).save(folder / f"{s.id}.png")
    methods = [read_method_outputs(tmp_path / m, m, sample_ids=[s.id for s in bench]) for m in ("on-pose", "swapped")]
    out = tmp_path / "results"
    run_benchmark(bench, methods, out, face_models=["dlib"], progress=False)
    th = thresholds_for("dlib")
    for r in load_results(out):
        assert r["source"] == SOURCE and r["slot_sims"] is not None, r
        labels = classify_row(r, th).labels
        want = ["swap"] if r["method"] == "swapped" and r["num_persons"] > 1 else []
        assert labels == want, (r["sample"], r["method"], r["slot_sims"])
    summary = write_reports(out)
    tax = summary["taxonomy"]
    assert tax["methods"]["dlib"]["swapped"]["rates"]["swap"] == 1.0
    assert tax["methods"]["dlib"]["on-pose"]["failed"] == 0.0
    assert list(tax["by_people"]["dlib"]) == [SOURCE]
    assert sorted(tax["by_people"]["dlib"][SOURCE]["swapped"]) == ["1", "2", "3"]
    assert (out / "failures_dlib.png").is_file()

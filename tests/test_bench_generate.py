"""bench generate / reproduce: the loop on real photos with the tiny pipeline and oracle callables.

A tiny benchmark is built from ``../shared/data/faces``: three one-person samples (GT = one photo, reference
= another photo of the same person) and two two-person samples (a group photo as GT, each person's own
photo as reference), with the GT face boxes in ``meta.json`` in reference order.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
P1 = ["obama", "newton", "kit_harington"]
P2 = {"group/1.jpg": ["obama", "biden"], "group/3.jpg": ["rose_leslie", "kit_harington"]}


def build_tiny_bench(faces: Path, root: Path, analyzer) -> Path:
    """The authors' layout from the real photos, boxes from dlib on the GT, ordered as the references."""
    from withanyone.faces import load_image

    labels = json.loads((faces / "labels.json").read_text())
    root.mkdir(parents=True, exist_ok=True)
    for person in P1:
        d = root / f"p1_{person}"
        d.mkdir()
        shutil.copy(faces / person / "1.jpg", d / "ori.jpg")
        shutil.copy(faces / person / "2.jpg", d / "ref_1.jpg")
        f = max(analyzer.detect(load_image(d / "ori.jpg")), key=lambda f: f.bbox[2] - f.bbox[0])
        (d / "meta.json").write_text(json.dumps({"prompt": "a photo of a person", "num_persons": 1,
                                                 "bboxes": [[float(v) for v in f.bbox]]}))
    for k, (gt, people) in enumerate(P2.items()):
        d = root / f"p2_{k}"
        d.mkdir()
        shutil.copy(faces / gt, d / "ori.jpg")
        img = load_image(d / "ori.jpg")
        h, w = img.shape[:2]
        found = analyzer.detect(img)
        boxes = []
        for j, person in enumerate(people):
            shutil.copy(faces / person / ("2.jpg" if person != "kit_harington" else "3.jpg"), d / f"ref_{j + 1}.jpg")
            lab = next(p for p in labels[gt]["people"] if p["id"] == person)
            c = np.array([lab["cx"] * w, lab["cy"] * h])
            f = min(found, key=lambda f: np.linalg.norm((f.bbox[:2] + f.bbox[2:]) / 2 - c))
            boxes.append([float(v) for v in f.bbox])
        (d / "meta.json").write_text(json.dumps({"prompt": "a photo of two people", "num_persons": 2,
                                                 "bboxes": boxes}))
    return root


@pytest.fixture(scope="module")
def tiny_bench(samples_dir, dlib_analyzer, tmp_path_factory) -> Path:
    return build_tiny_bench(samples_dir, tmp_path_factory.mktemp("tinybench") / "bench", dlib_analyzer)


def _env() -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), RAY_DEDUP_LOGS="0", MPLBACKEND="Agg")
    return env


def _cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    res = subprocess.run([sys.executable, "-m", "withanyone", *args], capture_output=True, text=True, env=_env(),
                         timeout=600)
    if check:
        assert res.returncode == 0, res.stderr[-3000:]
    return res


def _ok_sidecars(folder: Path) -> set[str]:
    from withanyone.bench.generate import is_done

    return {p.stem for p in folder.glob("*.json") if p.name not in ("generate.json",) and is_done(folder, p.stem)}


# ------------------------------------------------------------------------------------------------ units


def test_seeds_boxes_and_requests(tiny_bench):
    from withanyone.bench.generate import make_requests, output_size, rescale_boxes, sample_seed, select_samples
    from withanyone.bench.readers import read_folder_layout

    assert sample_seed(0, "a") == sample_seed(0, "a") != sample_seed(1, "a")
    assert output_size((1000, 500), 64) == (64, 32)
    assert rescale_boxes([[100, 50, 300, 250]], (1000, 500), (64, 32)) == [[6.4, 3.2, 19.2, 16.0]]
    bench, _ = read_folder_layout(tiny_bench, output_name=None)
    assert [s.id for s in select_samples(bench, "p2")] == ["p2_0", "p2_1"]
    assert [s.id for s in select_samples(bench, "p1", limit=2)] == ["p1_kit_harington", "p1_newton"]
    reqs = make_requests(select_samples(bench, "p2"), long_side=64)
    gt_w, gt_h = Image.open(tiny_bench / "p2_0" / "ori.jpg").size
    meta = json.loads((tiny_bench / "p2_0" / "meta.json").read_text())
    r = reqs[0]
    assert max(r.width, r.height) == 64 and r.width % 16 == 0 and r.height % 16 == 0
    np.testing.assert_allclose(r.boxes[0][0], meta["bboxes"][0][0] * r.width / gt_w, atol=0.01)
    np.testing.assert_allclose(r.boxes[1][3], meta["bboxes"][1][3] * r.height / gt_h, atol=0.01)
    assert len(r.references) == 2 and r.seed == sample_seed(0, "p2_0")


def test_generate_resumes_skips_done_and_retries_torn(tiny_bench, tmp_path):
    """Local engine with an oracle: done samples are skipped, a torn image or sidecar is regenerated."""
    from withanyone.bench.generate import MethodSpec, generate, image_path
    from withanyone.bench.readers import read_folder_layout

    bench, _ = read_folder_layout(tiny_bench, output_name=None)
    spec = MethodSpec(pipeline="withanyone.bench.oracles:gt_copy")
    s1 = generate(bench, tmp_path, "gt", spec, progress=False)
    assert (s1.generated, s1.skipped, s1.failed) == (5, 0, 0)
    before = {p.name: p.read_bytes() for p in tmp_path.glob("*.png")}
    image_path(tmp_path, "p1_obama").write_bytes(before["p1_obama.png"][:100])  # torn image
    (tmp_path / "p2_0.json").write_text('{"status": "ok", "sha2')                  # torn sidecar
    s2 = generate(bench, tmp_path, "gt", spec, progress=False)
    assert (s2.generated, s2.skipped) == (2, 3)
    assert {p.name: p.read_bytes() for p in tmp_path.glob("*.png")} == before
    side = json.loads((tmp_path / "p1_obama.json").read_text())
    assert side["sha256"] == hashlib.sha256(before["p1_obama.png"]).hexdigest() and side["status"] == "ok"


def test_bad_sample_is_recorded_not_fatal(tiny_bench, tmp_path):
    from withanyone.bench.generate import MethodSpec, generate
    from withanyone.bench.readers import read_folder_layout

    bench, _ = read_folder_layout(tiny_bench, output_name=None)
    (tmp_path / "bench").mkdir()
    for s in bench:
        shutil.copytree(tiny_bench / s.id, tmp_path / "bench" / s.id)
    (tmp_path / "bench" / "p1_newton" / "ori.jpg").unlink()  # gt_copy cannot work on this one
    bench, _ = read_folder_layout(tmp_path / "bench", output_name=None)
    stats = generate(bench, tmp_path / "out", "gt", MethodSpec(pipeline="withanyone.bench.oracles:gt_copy"),
                     progress=False)
    assert (stats.generated, stats.failed) == (4, 1) and "no GT photo" in stats.failures["p1_newton"]
    assert json.loads((tmp_path / "out" / "p1_newton.json").read_text())["status"] == "failed"


class CountingMethod:
    """A method class: instantiated once per worker, called per sample; a seeded grey image."""

    instances = 0
    calls: list[int] = []

    def __init__(self):
        type(self).instances += 1

    def __call__(self, sample):
        type(self).calls.append(sample.seed)
        return Image.new("RGB", (sample.width, sample.height), (sample.seed % 256,) * 3)


def test_method_class_is_instantiated_once_and_called_per_sample(tiny_bench, tmp_path):
    import importlib

    from withanyone.bench.generate import MethodSpec, generate
    from withanyone.bench.readers import read_folder_layout

    cls = importlib.import_module("test_bench_generate").CountingMethod
    cls.instances, cls.calls = 0, []
    bench, _ = read_folder_layout(tiny_bench, output_name=None)
    stats = generate(bench, tmp_path, "grey", MethodSpec(pipeline="test_bench_generate:CountingMethod"),
                     long_side=32, progress=False)
    assert stats.generated == 5 and cls.instances == 1 and len(cls.calls) == 5
    side = json.loads((tmp_path / "p1_obama.json").read_text())
    assert Image.open(tmp_path / "p1_obama.png").getpixel((0, 0)) == (side["seed"] % 256,) * 3


def test_bad_callable_is_one_line_error(tiny_bench, tmp_path):
    res = _cli("bench", "generate", str(tiny_bench), "-m", "x", "--pipeline", "no_such_module_xyz:f",
               "--out", str(tmp_path), check=False)
    assert res.returncode == 1
    assert res.stderr.strip().count("\n") == 0 and "no_such_module_xyz" in res.stderr and "Traceback" not in res.stderr


# ------------------------------------------------------------------------------------ callable contract


@pytest.mark.parametrize("oracle,expected", [("reference_copy", 1.0), ("gt_copy", -1.0)])
def test_reproduce_with_oracle_callables(tiny_bench, tmp_path, oracle, expected):
    """Through ``bench reproduce``: a callable returning the reference scores CP ≈ +1, the GT CP ≈ −1."""
    res = _cli("bench", "reproduce", str(tiny_bench), "-m", oracle, "--pipeline",
               f"withanyone.bench.oracles:{oracle}", "--subset", "p1", "--out", str(tmp_path), "--no-progress",
               "--cp-normalisation", "exact")
    assert "paper layout" in res.stdout and "insightface buffalo_l" in res.stdout
    summary = json.loads((tmp_path / "results" / "summary.json").read_text())
    cp = summary["leaderboard"]["p1"]["dlib"][oracle]["cp_all"]
    assert cp["n"] == 3 and abs(cp["mean"] - expected) < 1e-6, cp
    assert (tmp_path / "results" / "paper_table.md").read_text().count("| p1 |") == 7


def test_release_normalisation_moves_gt_copy_cp_by_the_closed_form(tiny_bench, tmp_path, dlib_analyzer):
    """gt-copy: exact CP = −1; release CP = −1 + arccos(1/(1+1e-6)²)/θ_release(t, r) per face."""
    from withanyone.bench.cache import REF_PAD, EmbeddingCache
    from withanyone.bench.generate import MethodSpec, select_samples
    from withanyone.bench.metrics import angle
    from withanyone.bench.readers import read_folder_layout
    from withanyone.bench.reproduce import reproduce
    from withanyone.bench.runner import load_results

    bench, _ = read_folder_layout(tiny_bench, output_name=None)
    reproduce(bench, "gt", tmp_path, MethodSpec(pipeline="withanyone.bench.oracles:gt_copy"), subset="p1",
              progress=False)
    rows = load_results(tmp_path / "results")
    cache = EmbeddingCache(dlib_analyzer, tmp_path / "results" / "cache")
    assert len(rows) == 3
    for r, sample in zip(rows, select_samples(bench, "p1"), strict=True):
        assert r["cp_normalisation"] == "release" and r["sample"] == sample.id
        t = cache.faces(sample.gt).embeddings[0].astype(np.float64)
        rr = cache.faces(sample.references[0], pad=REF_PAD).embeddings[0].astype(np.float64)
        want = (np.arccos(np.clip(np.dot(t, t) / (np.linalg.norm(t) + 1e-6) ** 2, -1, 1))
                - angle(t, rr, "release")) / angle(t, rr, "release")
        assert abs(r["cp"] - want) < 1e-9 and r["cp"] > -1.0
        assert 1e-4 < r["cp"] + 1.0 < 0.02


# ------------------------------------------------------------------------------------------ end to end


@pytest.mark.slow
def test_e2e_tiny_ray_kill_resume_run_report(tiny_bench, tmp_path):
    """generate --tiny with 2 Ray workers, SIGKILL mid-way, rerun: byte-identical to an uninterrupted run, no
    sample generated twice; then bench run and report."""
    args = ["bench", "generate", str(tiny_bench), "-m", "tiny", "--tiny", "--workers", "2", "--no-progress"]
    full, killed = tmp_path / "full", tmp_path / "killed"
    _cli(*args, "--out", str(full))
    assert len(_ok_sidecars(full)) == 5

    proc = subprocess.Popen([sys.executable, "-m", "withanyone", *args, "--out", str(killed)], env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and len(_ok_sidecars(killed)) < 2 and proc.poll() is None:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    time.sleep(2)  # let Ray's worker processes notice their driver is gone
    done_first = _ok_sidecars(killed)
    assert 2 <= len(done_first) < 5, done_first
    log_first = [json.loads(x)["sample"] for x in (killed / "generate.log.jsonl").read_text().splitlines()]

    _cli(*args, "--out", str(killed))
    lines = [json.loads(x) for x in (killed / "generate.log.jsonl").read_text().splitlines()]
    ok = [x["sample"] for x in lines if x["status"] == "ok"]
    assert sorted(ok) == sorted(set(ok)) and set(ok) == {p.stem for p in full.glob("*.png")}, lines
    assert not set(log_first) & {x["sample"] for x in lines[len(log_first):]}
    for p in sorted(full.glob("p*.*")):
        assert p.read_bytes() == (killed / p.name).read_bytes(), p.name
    assert not list(killed.glob(".*.tmp"))

    res = tmp_path / "results"
    _cli("bench", "run", str(tiny_bench), "-m", f"tiny={killed}", "--out", str(res), "--clip", "", "--no-progress")
    _cli("bench", "report", str(res))
    rows = [json.loads(x) for x in (res / "results.jsonl").read_text().splitlines()]
    assert len({r["sample"] for r in rows}) == 5 and all(r["output"].startswith(str(killed)) for r in rows)
    html_text = (res / "report.html").read_text()
    assert "Per-sample explorer" in html_text and "Count acc." in html_text and "http" not in html_text


# ------------------------------------------------------------------------------- multi-person metrics


def test_identity_confusion_and_count_on_vectors():
    from withanyone.bench.multi_metrics import count_accuracy, identity_confusion

    refs = np.eye(3)
    people = [[0, 0, 10, 10], [20, 0, 30, 10], [40, 0, 50, 10]]
    right = identity_confusion(np.eye(3), people, people, refs)
    assert right[0] == 0.0 and [f["person"] for f in right[1]] == [0, 1, 2]
    swapped = identity_confusion(np.eye(3)[[1, 0, 2]], people, people, refs)  # persons 0 and 1 trade places
    assert swapped[0] == pytest.approx(2 / 3) and [f["confused"] for f in swapped[1]] == [True, True, False]
    far = identity_confusion(np.eye(3)[:1], [[100, 100, 110, 110]], people, refs)  # overlaps nobody
    assert far[0] is None and far[1][0]["person"] is None
    assert count_accuracy([(2, 2), (1, 2), (3, 3), (None, 1)]) == pytest.approx(2 / 3)


def _swap_faces(img: np.ndarray, a: list[float], b: list[float], grow: float = 1.4) -> Image.Image:
    def region(box):
        cx, cy, w, h = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2, (box[2] - box[0]) * grow, (box[3] - box[1]) * grow
        return [int(cx - w / 2), int(cy - h / 2), int(cx + w / 2), int(cy + h / 2)]

    im = Image.fromarray(img)
    out = im.copy()
    ra, rb = region(a), region(b)
    out.paste(im.crop(rb).resize((ra[2] - ra[0], ra[3] - ra[1])), tuple(ra[:2]))
    out.paste(im.crop(ra).resize((rb[2] - rb[0], rb[3] - rb[1])), tuple(rb[:2]))
    return out


def test_confusion_and_count_accuracy_on_constructed_outputs(tiny_bench, tmp_path):
    """Two-person samples: the GT copy (confusion 0), the GT with the two faces swapped (confusion 1.0), and
    the GT with one face painted over in one of the two samples (count accuracy 1.0 → 0.5)."""
    from PIL import ImageDraw

    from withanyone.bench.readers import read_folder_layout
    from withanyone.bench.report import summarize
    from withanyone.bench.runner import run_benchmark
    from withanyone.bench.samples import Benchmark, MethodOutputs
    from withanyone.faces import load_image

    bench, _ = read_folder_layout(tiny_bench, output_name=None)
    p2 = Benchmark("p2", [s for s in bench if s.subset == "p2"], bench.root)
    methods = {m: {} for m in ("gt", "swapped", "missing")}
    for s in p2:
        img = load_image(s.gt)
        for m in methods:
            if m == "gt" or (m == "missing" and s.id != "p2_0"):
                out = Image.fromarray(img)
            elif m == "swapped":
                out = _swap_faces(img, *s.boxes)
            else:
                out = Image.fromarray(img)
                x1, y1, x2, y2 = s.boxes[1]
                pad = 0.3 * (x2 - x1)
                ImageDraw.Draw(out).rectangle([x1 - pad, y1 - pad, x2 + pad, y2 + pad], fill=(128, 128, 128))
            path = tmp_path / m / f"{s.id}.png"
            path.parent.mkdir(exist_ok=True)
            out.save(path)
            methods[m][s.id] = path
    run_benchmark(p2, [MethodOutputs(m, o) for m, o in methods.items()], tmp_path / "res", progress=False)
    board = summarize(tmp_path / "res")["leaderboard"]["p2"]["dlib"]
    assert board["gt"]["identity_confusion"]["mean"] == 0.0 and board["gt"]["count_acc"]["mean"] == 1.0
    assert board["swapped"]["identity_confusion"]["mean"] == 1.0 and board["swapped"]["identity_confusion"]["n"] == 2
    assert board["swapped"]["count_acc"]["mean"] == 1.0
    assert board["missing"]["count_acc"]["mean"] == 0.5 and board["missing"]["count_acc"]["n"] == 2


@pytest.mark.gpu
def test_generate_one_actor_per_gpu(tiny_bench, tmp_path):
    """--num-gpus: one Ray actor per device; the tiny pipeline on CUDA writes every sample."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from withanyone.bench.generate import MethodSpec, generate
    from withanyone.bench.readers import read_folder_layout

    bench, _ = read_folder_layout(tiny_bench, output_name=None)
    stats = generate(bench, tmp_path, "tiny", MethodSpec(tiny=True), long_side=64, num_gpus=1, progress=False)
    assert (stats.engine, stats.workers, stats.generated) == ("ray", 1, 5)
    assert _ok_sidecars(tmp_path) == {s.id for s in bench}

"""MultiHuman-Testbench: a mini testbench in the published layout, converted, scored by oracle methods, and
checked against an independent re-implementation of ``benchmarking/compute_scores.py``'s arithmetic.

The published files are written here from their documented shapes (no checkout of the benchmark needed):
``data/multihuman_metadata.json`` (a list of entries with ``people``, ``prompt``, ``identifier``,
``vlm_questions``, ``attributes``, ``pose_image``), ``data/faces/<name>.jpg`` (512-px face crops there, smaller
here), ``data/poses.zip`` (pose PNGs) and ``data/poses_metadata_final.json`` (DWPose keypoints per pose:
``bodies.candidate`` normalised x, y rows, ``bodies.subset`` 18 indices per body, −1 = absent, ``faces`` 68
normalised landmarks per body, ≤ 0.01 = absent).
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw
from typer.testing import CliRunner

from withanyone.bench.cache import REF_PAD, pad_to_square
from withanyone.bench.calibration import side_by_side
from withanyone.bench.multihuman import (
    ActionScorer,
    HPSScorer,
    MultiHumanFormatError,
    action_scores,
    convert_multihuman,
    head_boxes,
    head_boxes_from_image,
    hungarian_id,
    read_metadata,
    release_assignment,
)
from withanyone.bench.readers import read_method_outputs
from withanyone.bench.report import write_reports
from withanyone.bench.runner import load_results, run_benchmark
from withanyone.faces import load_image

PEOPLE = ["obama", "biden", "scarlett", "yangmi", "kit_harington", "newton"]
NUM_SIMPLE = 3  # the published benchmark: 1500; a mini bench needs complex entries after a few simple ones
#: index → people of the mini bench: 1, 2, 3 people simple; 2 and 3 people complex
ENTRIES = [["obama"], ["biden", "scarlett"], ["yangmi", "kit_harington", "newton"], ["obama", "yangmi"],
           ["scarlett", "newton", "biden"]]


# ---------------------------------------------------------------------------------------- published format


def _face_name(person: str) -> str:
    return f"sfhq_{PEOPLE.index(person) + 100}.jpg"


def _write_faces(real_faces: Path, analyzer, faces_dir: Path, side: int = 150) -> None:
    """Each person's photo cropped around the face and resized (download_faces.py writes 512 × 512 crops)."""
    faces_dir.mkdir(parents=True, exist_ok=True)
    for person in PEOPLE:
        im = Image.open(real_faces / person / "1.jpg").convert("RGB")
        im.thumbnail((480, 480))  # detection on a small copy: fast
        img = np.asarray(im)
        f = analyzer.detect(img, embed=False)[0]
        cx, cy = f.center
        half = 1.1 * max(f.width, f.height)
        box = (int(max(0, cx - half)), int(max(0, cy - half)), int(min(img.shape[1], cx + half)),
               int(min(img.shape[0], cy + half)))
        Image.fromarray(img).crop(box).resize((side, side)).save(faces_dir / _face_name(person), quality=95)


def _draw_pose(pose: dict, w: int, h: int) -> bytes:
    """A pose PNG in the DWPose drawing convention (coloured body joints, white face landmarks)."""
    import io

    im = Image.new("RGB", (w, h))
    d = ImageDraw.Draw(im)
    cand = pose["bodies"]["candidate"]
    for row in pose["bodies"]["subset"]:
        for k, idx in enumerate(row[:18]):
            if idx >= 0:
                x, y = cand[int(idx)][0] * w, cand[int(idx)][1] * h
                d.ellipse([x - 4, y - 4, x + 4, y + 4], fill=(255, 13 * k, 0))
    for lms in pose.get("faces", []):
        for x, y in lms:
            if x > 0.01 and y > 0.01:
                d.ellipse([x * w - 2, y * h - 2, x * w + 2, y * h + 2], fill=(255, 255, 255))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def _pose_from_faces(faces, w: int, h: int, with_landmarks: Sequence[bool] | None = None) -> dict:
    """A DWPose keypoint dict for detected faces: nose, eyes, neck per body (others −1); 68 face landmarks on
    the face's ellipse where ``with_landmarks[n]``, else all −1 (absent)."""
    cand, subset, lms = [], [], []
    for n, f in enumerate(faces):
        row = [-1.0] * 18
        le, re, nose = f.landmarks[0], f.landmarks[1], f.landmarks[2]
        neck = np.array([nose[0], nose[1] + 1.0 * f.height])
        for k, p in ((0, nose), (1, neck), (14, re), (15, le)):
            row[k] = float(len(cand))
            cand.append([float(p[0]) / w, float(p[1]) / h])
        subset.append(row + [float(len(row)), 4.0])  # OpenPose's 18 indices + score + count
        if with_landmarks is not None and with_landmarks[n]:
            t = np.linspace(0, 2 * np.pi, 68, endpoint=False)
            x1, y1, x2, y2 = f.bbox
            pts = np.stack([(x1 + x2) / 2 + (x2 - x1) / 2 * np.cos(t), (y1 + y2) / 2 + (y2 - y1) / 2 * np.sin(t)], 1)
            lms.append([[float(x) / w, float(y) / h] for x, y in pts])
        else:
            lms.append([[-1.0, -1.0]] * 68)
    return {"bodies": {"candidate": cand, "subset": subset}, "faces": lms, "hands": []}


def _entry(i: int, people: list[str]) -> dict:
    n = len(people)
    return {"people": [f"data/faces/{_face_name(p)}" for p in people],
            "prompt": f"{n} people having a picnic in a park, faces clearly visible. Ultra-Realistic. 8K.",
            "attributes": [[1, 2, 1]] * n, "omnigen_prompt": "…", "identifier": ["person"] * n,
            "vlm_questions": ["are the people having a picnic? Choices: 0(No), 9(Yes), 4(Partially).",
                              "is this in a park? Choices: 0(No), 9(Yes), 4(Partially)."],
            "pose_image": f"data/poses/{i}.png", "omnigen_pose_prompt": "…"}


def build_repo(root: Path, real_faces: Path, analyzer, entries=ENTRIES) -> Path:
    """A MultiHuman-Testbench checkout in the published layout: metadata, faces, poses.zip, keypoints."""
    repo = root / "MultiHuman-Testbench"
    (repo / "data").mkdir(parents=True)
    _write_faces(real_faces, analyzer, repo / "data" / "faces")
    meta = [_entry(i, p) for i, p in enumerate(entries)]
    (repo / "data" / "multihuman_metadata.json").write_text(json.dumps(meta, indent=1))
    keypoints = {}
    with zipfile.ZipFile(repo / "data" / "poses.zip", "w") as z:
        for i, people in enumerate(entries):
            n = len(people)
            # n bodies side by side: heads at 1/(n+1) … of a 1024 × 1024 canvas
            cand, subset = [], []
            for k in range(n):
                x = (k + 1) / (n + 1)
                row = [-1.0] * 18
                for j, (dx, dy) in ((0, (0, 0.30)), (1, (0, 0.40)), (14, (-0.02, 0.28)), (15, (0.02, 0.28))):
                    row[j] = float(len(cand))
                    cand.append([x + dx, dy])
                subset.append(row)
            pose = {"bodies": {"candidate": cand, "subset": subset}, "faces": [[[-1, -1]] * 68] * n, "hands": []}
            keypoints[str(i)] = pose
            z.writestr(f"poses/{i}.png", _draw_pose(pose, 1024, 1024))
    (repo / "data" / "poses_metadata_final.json").write_text(json.dumps(keypoints))
    return repo


# ------------------------------------------------------- independent re-implementation of compute_scores.py


def release_hungarian(cost: np.ndarray) -> dict[int, int]:
    """compute_scores.py's utils.hungarian_algorithm, written out again from its description: zero-pad to a
    square, turn maximisation into costs (max − c), row then column reduction, then loop: cover rows and
    columns of greedily chosen zeros (row order, first column), stop when the covered lines reach the size,
    else subtract the smallest uncovered value from uncovered rows and add it to covered columns; rows left
    over take the free columns in order."""
    rows, cols = cost.shape
    size = max(rows, cols)
    m = np.zeros((size, size))
    m[:rows, :cols] = cost
    top = m.max()
    m = top - m
    for r in range(size):
        m[r, :] = m[r, :] - m[r, :].min()
    for c in range(size):
        m[:, c] = m[:, c] - m[:, c].min()
    while True:
        row_cov = [False] * size
        col_cov = [False] * size
        chosen = []
        progress = True
        while progress:
            progress = False
            for r in range(size):
                if row_cov[r]:
                    continue
                hit = next((c for c in range(size) if not col_cov[c] and m[r, c] == 0), None)
                if hit is not None:
                    chosen.append((r, hit))
                    row_cov[r] = col_cov[hit] = True
                    progress = True
                    break
        if sum(row_cov) + sum(col_cov) >= size:
            break
        low = min(m[r, c] for r in range(size) for c in range(size) if not row_cov[r] and not col_cov[c])
        for r in range(size):
            if not row_cov[r]:
                m[r, :] -= low
        for c in range(size):
            if col_cov[c]:
                m[:, c] += low
    free_r = [r for r in range(size) if r not in {a for a, _ in chosen}]
    free_c = [c for c in range(size) if c not in {b for _, b in chosen}]
    chosen += list(zip(free_r, free_c[:len(free_r)], strict=False))
    return {r: c for r, c in reversed(chosen)}


def compute_scores_reference(entries, outputs: dict[int, Path | None], analyzer, num_simple: int,
                             cache_dir: Path | None = None) -> dict:
    """compute_scores.py's loop and its accumulators, on embeddings of ``analyzer`` (references padded to
    their square first, as our runner detects them). With ``cache_dir`` (a run's ``cache/``) the faces the
    run detected are read back instead of detected again: what is checked here is the arithmetic."""
    from withanyone.bench.cache import EmbeddingCache

    cache = EmbeddingCache(analyzer, cache_dir) if cache_dir is not None else None
    memo: dict[tuple[bytes, bool], list[np.ndarray]] = {}

    def embed(path: Path, pad: bool) -> list[np.ndarray]:
        if cache is not None:
            return [np.asarray(f["embedding"], np.float64) for f in cache.faces(path, pad=REF_PAD if pad else None).faces]
        key = (path.read_bytes(), pad)
        if key not in memo:
            img = load_image(path)
            memo[key] = [f.embedding.astype(np.float64)
                         for f in analyzer.detect(pad_to_square(img, REF_PAD)[0] if pad else img)]
        return memo[key]

    acc = face_sim = total = 0.0
    split = {k: [0.0, 0.0] for k in range(1, 6)}  # [face_sim, accuracy]
    people_total = dict.fromkeys(range(1, 6), 0)
    snap = None
    per_image = {}
    for idx, people in enumerate(entries):
        n = len(people)
        path = outputs.get(idx)
        if path is not None and path.is_file():
            total += 1
            people_total[n] += 1
            gen = embed(path, False)
            if gen:
                refs = [embed(p, True)[0] for p in people]
                cost = np.array([[float(np.dot(r, g) / np.linalg.norm(r) / np.linalg.norm(g)) for g in gen]
                                 for r in refs])
                assign = release_hungarian(cost)
                matched = sum(cost[p, assign[p]] for p in range(n) if assign[p] < len(gen))
                face_sim += matched / n
                split[n][0] += matched / n
                acc += int(n == len(gen))
                split[n][1] += int(n == len(gen))
                per_image[idx] = (matched / n, int(n == len(gen)))
            else:
                per_image[idx] = (0.0, 0)
        if idx == num_simple - 1:
            snap = (acc, face_sim, total)
    out = {"all": (acc / total, face_sim / total), "simple": (snap[0] / snap[2], snap[1] / snap[2]),
           "complex": ((acc - snap[0]) / (total - snap[2]), (face_sim - snap[1]) / (total - snap[2])),
           "people": {k: (split[k][1] / people_total[k], split[k][0] / people_total[k])
                      for k in people_total if people_total[k]}, "per_image": per_image}
    return out


# ----------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def mini(tmp_path_factory, real_faces, dlib_analyzer):
    """The mini testbench converted, two oracle methods generated and scored (one run, reused)."""
    root = tmp_path_factory.mktemp("mhtb")
    repo = build_repo(root, real_faces, dlib_analyzer)
    bench, report = convert_multihuman(repo, root / "bench", progress=False, num_simple=NUM_SIMPLE)
    paste, drop = root / "paste", root / "drop"
    paste.mkdir()
    drop.mkdir()
    for s in bench:  # the references pasted side by side into the canvas, each padded as the runner detects it
        Image.fromarray(side_by_side(list(s.references), pad=REF_PAD)).save(paste / f"{s.id}.png")
        if len(s.references) > 1:
            Image.fromarray(side_by_side(list(s.references[:-1]), pad=REF_PAD)).save(drop / f"{s.id}.png")
        else:
            Image.new("RGB", (300, 300), (90, 90, 90)).save(drop / f"{s.id}.png")
    gappy = root / "gappy"  # the paste outputs with one missing: left out of every mean, as the release does
    gappy.mkdir()
    for p in paste.iterdir():
        if p.stem != "3":
            (gappy / p.name).write_bytes(p.read_bytes())
    ids = [s.id for s in bench]
    methods = [read_method_outputs(paste, "paste", sample_ids=ids), read_method_outputs(drop, "drop", sample_ids=ids),
               read_method_outputs(gappy, "gappy", sample_ids=ids)]
    out = root / "run"
    stats = run_benchmark(bench, methods, out, face_models=["dlib"], progress=False)
    summary = write_reports(out)
    return {"root": root, "repo": repo, "bench": bench, "report": report, "out": out, "stats": stats,
            "summary": summary, "paste": paste, "drop": drop, "gappy": gappy}


# ------------------------------------------------------------------------------------------------- tests


def test_convert_published_layout(mini):
    bench, report = mini["bench"], mini["report"]
    assert [s.id for s in bench] == ["0", "1", "2", "3", "4"]
    assert [s.num_persons for s in bench] == [1, 2, 3, 2, 3]
    assert [s.meta["split"] for s in bench] == ["simple"] * 3 + ["complex"] * 2
    assert all(s.meta["source"] == "multihuman-testbench" for s in bench)
    s = bench.by_id()["2"]
    assert s.prompt == _entry(2, ENTRIES[2])["prompt"]
    assert [p.name for p in s.references] == ["ref_1.jpg", "ref_2.jpg", "ref_3.jpg"]
    assert s.references[1].read_bytes() == (mini["repo"] / "data/faces" / _face_name("kit_harington")).read_bytes()
    assert (s.references[0].parent / "pose.png").is_file() and s.meta["pose_size"] == [1024, 1024]
    assert len(s.boxes) == 3 and [b[0] for b in s.boxes] == sorted(b[0] for b in s.boxes)
    assert report.missing_faces == [] and report.written == 5
    from withanyone.bench.generate import select_samples

    assert [x.id for x in select_samples(bench, "complex")] == ["3", "4"]
    assert [x.id for x in select_samples(bench, "simple", limit=2)] == ["0", "1"]
    again, rep2 = convert_multihuman(mini["repo"], mini["root"] / "bench", progress=False, num_simple=NUM_SIMPLE)
    assert rep2.kept == 5 and rep2.written == 0 and [x.id for x in again] == [x.id for x in bench]


def test_paste_oracle_scores_as_compute_scores(mini, dlib_analyzer):
    """Pasting the references: count accuracy 1, ID similarity ≈ self-similarity (1); dropping a person:
    count accuracy 0 and that person 0 in the mean; both equal to compute_scores.py's arithmetic."""
    mh = mini["summary"]["multihuman"]["table"]["dlib"]
    entries = [[r for r in s.references] for s in mini["bench"]]
    for method, folder in (("paste", mini["paste"]), ("drop", mini["drop"]), ("gappy", mini["gappy"])):
        outs = {int(s.id): (folder / f"{s.id}.png") for s in mini["bench"]}
        ref = compute_scores_reference(entries, outs, dlib_analyzer, NUM_SIMPLE, mini["out"] / "cache")
        got = mh[method]
        for split in ("simple", "complex", "all"):
            assert got["splits"][split]["count_acc"] == pytest.approx(ref[split][0], abs=1e-12), (method, split)
            assert got["splits"][split]["id_sim"] == pytest.approx(ref[split][1], abs=1e-9), (method, split)
        for k, (ca, ids) in ref["people"].items():
            assert got["people"][str(k)]["count_acc"] == pytest.approx(ca, abs=1e-12)
            assert got["people"][str(k)]["id_sim"] == pytest.approx(ids, abs=1e-9)
    paste = mh["paste"]["splits"]["all"]
    assert paste["count_acc"] == 1.0 and paste["images"] == 5
    assert paste["id_sim"] == pytest.approx(1.0, abs=2e-3)  # a face against itself
    drop = mh["drop"]["splits"]
    assert drop["all"]["count_acc"] == 0.0
    rows = {r["sample"]: r for r in load_results(mini["out"]) if r["method"] == "drop"}
    for r in rows.values():
        n = r["num_persons"]
        assert r["mhtb_all_ids"][:n - 1] == pytest.approx([1.0] * (n - 1), abs=3e-3) or n == 1
        assert sorted(r["mhtb_all_ids"])[0] == 0.0  # the dropped person counts 0 …
        assert r["mhtb_id"] == pytest.approx(sum(r["mhtb_all_ids"]) / n)  # … in the mean over people
    assert rows["0"]["mhtb_id"] == 0.0 and rows["0"]["mhtb_count_acc"] == 0  # no face at all
    gappy = mh["gappy"]["splits"]
    assert gappy["complex"]["images"] == 1 and gappy["complex"]["missing"] == 1 and gappy["all"]["images"] == 4


def test_one_detection_per_image_and_resume(mini, dlib_analyzer):
    stats = mini["stats"]
    refs = {p.read_bytes() for s in mini["bench"] for p in s.references}
    outs = {p.read_bytes() for f in (mini["paste"], mini["drop"], mini["gappy"]) for p in f.iterdir()}
    assert stats.calls["dlib"]["detect"] == len(refs) + len(outs)
    ids = [s.id for s in mini["bench"]]
    again = run_benchmark(mini["bench"], [read_method_outputs(mini["paste"], "paste", sample_ids=ids)],
                          mini["out"], face_models=["dlib"], progress=False)
    assert again.rows_written == 0 and again.calls["dlib"]["detect"] == 0


def test_report_table_and_not_computed(mini):
    md = (mini["out"] / "report.md").read_text()
    assert "## MultiHuman-Testbench" in md and "Hungarian ID ↑ (S)" in md and "Count Acc. ↑ (C)" in md
    line = next(ln for ln in md.splitlines() if ln.startswith("| paste | 1.000"))
    assert line.count("|") == 2 + 3 * 4 + 1
    nc = mini["summary"]["multihuman"]["not_computed"]
    assert "HPSv2 weights" in nc["hps"] and "Gemini" in nc["action"]
    html = (mini["out"] / "report.html").read_text()
    assert "id='multihuman'" in html and "not computed" in html


def test_release_assignment_is_not_always_optimal():
    s = np.array([[0.9, 0.85], [0.8, 0.1]])
    assert release_assignment(s) == release_hungarian(s) == {0: 0, 1: 1}
    assert hungarian_id(s, 2, "release")[0] == pytest.approx(0.5)
    assert hungarian_id(s, 2, "optimal")[0] == pytest.approx(0.825)
    rng = np.random.default_rng(0)
    for _ in range(300):
        n, m = rng.integers(1, 6), rng.integers(1, 7)
        s = rng.uniform(-0.3, 1.0, size=(n, m)).round(int(rng.integers(1, 4)))
        assert release_assignment(s) == release_hungarian(s), s
        value, per = hungarian_id(s, n)
        assert value == pytest.approx(sum(per) / n) and sum(p == 0.0 for p in per) >= max(0, n - m)


def test_pose_keypoints_to_head_boxes_land_on_heads(mini, dlib_analyzer, tmp_path):
    """Poses in the published keypoint format, made from real faces: each head box covers its face."""
    from withanyone.bench.generate import make_requests
    from withanyone.bench.multi_metrics import box_iou

    people = [mini["repo"] / "data" / "faces" / _face_name(p) for p in ("kit_harington", "obama", "scarlett")]
    canvas = side_by_side(people, pad=REF_PAD, gap=40)
    h, w = canvas.shape[:2]
    faces = sorted(dlib_analyzer.detect(canvas, embed=False), key=lambda f: f.center[0])
    assert len(faces) == 3
    pose = _pose_from_faces(faces, w, h, with_landmarks=[True, False, False])
    boxes = head_boxes(json.loads(json.dumps(pose)), w, h)
    assert len(boxes) == 3
    for b, f in zip(boxes, faces, strict=True):
        assert box_iou([b], [f.bbox])[0, 0] > 0.45, (b, f.bbox)
        assert b[0] < f.center[0] < b[2] and b[1] < f.center[1] < b[3]
    # through convert: poses.zip + poses_metadata_final.json → meta bboxes → generate's prior boxes
    repo = tmp_path / "repo"
    (repo / "data" / "faces").mkdir(parents=True)
    for k, p in enumerate(people):
        (repo / "data" / "faces" / f"ffhq_{k}.jpg").write_bytes(p.read_bytes())
    meta = [{"people": [f"data/faces/ffhq_{k}.jpg" for k in range(3)], "prompt": "three friends", "pose_image":
             "data/poses/7.png", "vlm_questions": [], "identifier": ["man", "man", "woman"], "attributes": []}]
    (repo / "data" / "multihuman_metadata.json").write_text(json.dumps(meta))
    (repo / "data" / "poses_metadata_final.json").write_text(json.dumps({"7": [pose]}))
    with zipfile.ZipFile(repo / "data" / "poses.zip", "w") as z:
        z.writestr("poses/7.png", _draw_pose(pose, w, h))
    bench, _ = convert_multihuman(repo, tmp_path / "bench", progress=False)
    s = bench.samples[0]
    assert s.meta["pose_size"] == [w, h] and s.boxes == boxes
    req = make_requests([s], long_side=512, layout="prior")[0]
    assert (req.width, req.height) == (512, round(512 * h / w / 16) * 16)
    for b, f in zip(req.boxes, faces, strict=True):
        sx, sy = req.width / w, req.height / h
        assert box_iou([b], [[f.bbox[0] * sx, f.bbox[1] * sy, f.bbox[2] * sx, f.bbox[3] * sy]])[0, 0] > 0.45
    assert make_requests([s], long_side=512, layout="auto")[0].boxes is None
    # without keypoints: the face landmarks drawn (white) in the pose image give the boxes
    full = _pose_from_faces(faces, w, h, with_landmarks=[True, True, True])
    from_image = head_boxes_from_image(_draw_pose(full, w, h))
    assert len(from_image) == 3 and len(head_boxes_from_image(_draw_pose(pose, w, h))) == 1
    for b, k in zip(from_image, head_boxes(full, w, h), strict=True):
        assert box_iou([b], [k])[0, 0] > 0.8
    (repo / "data" / "poses_metadata_final.json").unlink()
    with zipfile.ZipFile(repo / "data" / "poses.zip", "w") as z:
        z.writestr("poses/7.png", _draw_pose(full, w, h))
    bench, rep = convert_multihuman(repo, tmp_path / "bench2", progress=False)
    assert bench.samples[0].boxes == from_image and "no pose keypoints" in rep.notes[0]


def test_missing_faces_listed_and_malformed_metadata_named(mini, tmp_path):
    repo = mini["repo"]
    meta = json.loads((repo / "data" / "multihuman_metadata.json").read_text())
    meta[1]["people"].append("data/faces/celeba_hq_404.jpg")
    (tmp_path / "m.json").write_text(json.dumps(meta))
    bench, rep = convert_multihuman(repo, tmp_path / "b", metadata=tmp_path / "m.json", progress=False)
    assert rep.missing_faces == [(1, "data/faces/celeba_hq_404.jpg")]
    s = bench.by_id()["1"]
    assert s.num_persons == 3 and not s.references[2].exists()
    assert s.meta["missing_references"] == ["data/faces/celeba_hq_404.jpg"]
    meta[2]["people"] = "data/faces/sfhq_1.jpg"
    (tmp_path / "bad.json").write_text(json.dumps(meta))
    with pytest.raises(MultiHumanFormatError, match=r"bad\.json: entry 2: 'people' must be a non-empty list"):
        read_metadata(tmp_path / "bad.json")
    from withanyone.bench.cli import app

    (tmp_path / "lfs").mkdir()
    (tmp_path / "lfs" / "data").mkdir()
    (tmp_path / "lfs" / "data" / "multihuman_metadata.json").write_text(
        "version https://git-lfs.github.com/spec/v1\noid sha256:00\nsize 1\n")
    (tmp_path / "lfs" / "data" / "faces").mkdir()
    res = CliRunner().invoke(app, ["convert", "multihuman-testbench", "--repo", str(tmp_path / "lfs"),
                                   "--out", str(tmp_path / "o")])
    assert res.exit_code == 1 and "git-LFS pointer" in res.output and len(res.output.strip().splitlines()) == 1
    res = CliRunner().invoke(app, ["convert", "multihuman-testbench", "--repo", str(repo), "--out",
                                   str(tmp_path / "cli"), "--limit", "2", "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "2 samples" in res.output and sorted(p.name for p in (tmp_path / "cli").iterdir() if p.is_dir()) == ["0", "1"]
    res = CliRunner().invoke(app, ["convert", "multihuman-testbench", "--repo", str(repo), "--out",
                                   str(tmp_path / "neg"), "--limit", "-2"])
    assert res.exit_code == 1 and "--limit must be at least 1" in res.output and not (tmp_path / "neg").exists()


def test_action_and_hps_not_computed_without_local_models(tmp_path):
    assert action_scores("909", 3) == [10, 1, 10]
    assert action_scores("9\n4", 2) == [10, 5]
    assert action_scores("9x9", 3) == [10]  # as the release: scores before an unparsable answer count
    assert not HPSScorer(None).available and "nothing is downloaded" in HPSScorer(None).reason
    assert "not found" in HPSScorer(tmp_path / "HPS_v2.1_compressed.pt").reason
    assert not ActionScorer("").available and "Gemini" in ActionScorer("").reason
    assert "cannot import" in ActionScorer("no_such_module_x:f").reason


def test_insightface_backend_same_arithmetic(mini, tmp_path, monkeypatch):
    """The other face backend (insightface-format ONNX; a tiny pack whose "faces" are key-coloured squares):
    its own rows, and the same compute_scores.py arithmetic on its embeddings."""
    pytest.importorskip("onnxruntime")
    from tiny_models.insightface_pack import build_tiny_pack, paint_key

    from withanyone.bench.runner import FaceModelSpec
    from withanyone.faces import FaceAnalyzer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pack = build_tiny_pack(tmp_path / "pack" / "antelopev2", extras=False)
    repo = tmp_path / "repo"
    (repo / "data" / "faces").mkdir(parents=True)
    people = ["obama", "biden", "scarlett"]
    for k, p in enumerate(people):  # each face crop gets a key square of its own size: distinct embeddings
        img = np.asarray(Image.open(mini["repo"] / "data" / "faces" / _face_name(p)).convert("RGB"))
        Image.fromarray(paint_key(img, 16, 16, 16 + 64 + 32 * k, 16 + 64 + 16 * k)).save(
            repo / "data" / "faces" / _face_name(p), quality=95)
    entries = [["obama"], ["biden", "scarlett", "obama"]]
    (repo / "data" / "multihuman_metadata.json").write_text(json.dumps([_entry(i, e) for i, e in enumerate(entries)]))
    bench, _ = convert_multihuman(repo, tmp_path / "bench", progress=False, num_simple=1)
    outs = tmp_path / "outs"
    outs.mkdir()
    for s in bench:
        Image.fromarray(side_by_side(list(s.references[:2]), pad=REF_PAD)).save(outs / f"{s.id}.png")
    spec = FaceModelSpec("insightface", {"pack": str(pack.folder)}, label="arc-tiny")
    run_benchmark(bench, [read_method_outputs(outs, "paste2")], tmp_path / "run", face_models=[spec], progress=False)
    got = write_reports(tmp_path / "run", gallery=False)["multihuman"]["table"]["arc-tiny"]["paste2"]
    ref = compute_scores_reference([list(s.references) for s in bench], {int(s.id): outs / f"{s.id}.png" for s in bench},
                                   FaceAnalyzer("insightface", pack=str(pack.folder)), 1)
    for split in ("simple", "complex", "all"):
        assert got["splits"][split]["count_acc"] == pytest.approx(ref[split][0], abs=1e-12)
        assert got["splits"][split]["id_sim"] == pytest.approx(ref[split][1], abs=1e-6)
    assert got["splits"]["complex"]["id_sim"] > 0  # faces were found and matched

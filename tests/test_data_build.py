"""End-to-end MultiID-2M builds on real photos with Ray: the bank and assignment on ``../shared/data/faces``,
round trip through ``webdataset``, idempotent reruns, and a real SIGKILL mid-run followed by a resume."""

from __future__ import annotations

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

ray = pytest.importorskip("ray")
pytest.importorskip("faiss")
pytest.importorskip("webdataset")

from withanyone.data.pipeline import build_dataset  # noqa: E402
from withanyone.data.reader import iter_references, iter_samples, read_cluster_centers, read_negative_pool  # noqa: E402
from withanyone.data.report import load_assignments  # noqa: E402
from withanyone.faces import Face  # noqa: E402
from withanyone.faces.labels import check_names, load_labels  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
OUTPUT_PARTS = ("train_rec", "train_cp", "ref", "identities.json", "negatives.safetensors")


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole test session (2 CPUs, small object store)."""
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                 object_store_memory=300 * 1024 * 1024)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def shared_build(ray_session, real_faces, tmp_path_factory):
    out = tmp_path_factory.mktemp("multiid") / "out"
    res = build_dataset([real_faces], out, workers=2, unit_size=4, progress=False)
    return res, out


def output_bytes(out: Path) -> dict[str, bytes]:
    """Every output file (shards, tables, pool) by relative path, excluding the work folder and report."""
    files = {}
    for part in OUTPUT_PARTS:
        p = out / part
        for f in sorted([p] if p.is_file() else p.rglob("*")):
            if f.is_file():
                files[str(f.relative_to(out))] = f.read_bytes()
    return files


def test_bank_has_one_identity_per_person_with_two_photos(shared_build, real_faces):
    res, out = shared_build
    people = {p.name: len(list(p.glob("*.jpg"))) for p in real_faces.iterdir() if p.is_dir() and p.name != "group"}
    expected = {name for name, n in people.items() if n >= 2}
    table = json.loads((out / "identities.json").read_text())
    assert {v["search_name"] for v in table.values()} == expected
    assert len(table) == len(expected) == res.identities
    for ident, v in table.items():
        assert v["members"] == people[v["search_name"]], ident  # these folders hold no outliers
    assert set(read_cluster_centers(out / "ref" / "cluster_centers.tar")) == set(table)
    refs = list(iter_references(out / "ref" / "tars"))
    assert len(refs) == sum(v["members"] for v in table.values())
    assert all(r.identity in table and r.embeddings.shape == (1, 128) and r.image_bytes for r in refs)
    pool = read_negative_pool(out / "negatives.safetensors")
    assert sorted(pool.ids) == sorted(table) and pool.embeddings.shape[1] == 128


def test_every_labelled_face_gets_its_person_and_unknowns_stay_unknown(shared_faces, shared_build):
    """Full-size photos only: at 512 px the child in group/2.jpg is below the 48-px face filter."""
    _, out = shared_build
    labels = load_labels(shared_faces / "labels.json")
    by_rel = {str(Path(a["source"]).relative_to(shared_faces)): a for a in load_assignments(out)}
    checks = []
    for rel, label in labels.items():
        a = by_rel[rel]
        faces = [Face(bbox=f["bbox"], score=1.0, landmarks=np.zeros((5, 2))) for f in a["faces"]]
        checks += check_names(rel, tuple(a["size"]), faces, [f["name"] for f in a["faces"]], label)
    wrong = [c for c in checks if not c.ok]
    assert not wrong, wrong
    assert sum(c.expected is not None for c in checks) == 6  # six labelled people in groups 1–3
    g2 = [f["name"] for f in by_rel["group/2.jpg"]["faces"]]
    assert len(g2) == 3 and g2.count(None) == 1  # the child stays unknown
    g4 = by_rel["group/4.jpg"]
    assert len(g4["faces"]) == 6 and all(f["name"] is None for f in g4["faces"])
    assert g4["reason"] == "too_many_faces" and not g4["train_rec"]


def test_round_trip_through_webdataset_matches_the_records(shared_faces, shared_build):
    """Full-size photos only: at 512 px the child in group/2.jpg is below the 48-px face filter."""
    res, out = shared_build
    outcomes = {a["index"]: a for a in load_assignments(out)}
    records = {}
    for f in sorted((out / "_work" / "faces").glob("unit-*.json")):
        for r in json.loads(f.read_text()):
            records[r["index"]] = r
    rec = list(iter_samples(out / "train_rec"))
    cp = list(iter_samples(out / "train_cp"))
    assert len(rec) == res.train_rec == sum(a["train_rec"] for a in outcomes.values())
    assert len(cp) == res.train_cp and 0 < len(cp) < len(rec)
    for s in rec:
        a = outcomes[int(s.key)]
        assert s.url == a["source"] and s.names == [f["name"] for f in a["faces"]]
        kept = [f for f in records[int(s.key)]["faces"] if f["size"] >= 48]
        np.testing.assert_array_equal(s.embeddings, np.array([f["embedding"] for f in kept], np.float32))
        np.testing.assert_array_equal(s.bboxes, np.array([f["bbox"] for f in kept], np.float32))
        assert s.image_bytes == Path(a["source"]).read_bytes()
        assert s.labels["ram_score"] is None and s.labels["aesthetics_score"] is None
    rec_by_key = {s.key: s for s in rec}
    for s in cp:
        assert s.identified and s.image_bytes == rec_by_key[s.key].image_bytes
    cp_sources = {Path(s.url).relative_to(shared_faces).as_posix() for s in cp}
    assert {"group/1.jpg", "group/3.jpg"} <= cp_sources and "group/2.jpg" not in cp_sources
    rep = json.loads((out / "report.json").read_text())
    assert rep["rejected"] == {"too_many_faces": 1} and rep["identities"] == res.identities
    assert (out / "report_scores.png").stat().st_size > 1000
    assert rep["optional_stages"]["aesthetics"].startswith("skipped")


def test_rerun_is_idempotent(shared_build, real_faces):
    _, out = shared_build
    before = output_bytes(out)
    lines = (out / "_work" / "faces.manifest.jsonl").read_text()
    build_dataset([real_faces], out, workers=2, unit_size=4, progress=False)
    assert (out / "_work" / "faces.manifest.jsonl").read_text() == lines  # nothing recomputed
    assert output_bytes(out) == before


KILL_SCRIPT = """
import sys
from withanyone.data.pipeline import build_dataset
build_dataset(sys.argv[2:], sys.argv[1], workers=1, unit_size=1, progress=False)
"""


def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the build subprocess and every process it started (Ray's raylet, GCS, workers)."""
    import psutil

    try:
        kids = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        kids = []
    os.killpg(proc.pid, signal.SIGKILL)
    for k in kids:
        try:
            os.kill(k.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=30)


def _run_and_kill(out: Path, inputs: list[str], manifest: Path, after: int, poll: float = 0.05) -> None:
    """Run a build in a subprocess and SIGKILL it once ``manifest`` lists ``after`` completed units."""
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(out), *inputs], env=env,
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 150
    try:
        while time.time() < deadline:
            if manifest.exists() and manifest.read_text().count("\n") >= after:
                break
            if proc.poll() is not None:
                pytest.fail("build subprocess ended before it could be killed")
            time.sleep(poll)
        else:
            pytest.fail("build subprocess made no progress")
    finally:
        _kill_tree(proc)
    assert proc.returncode == -signal.SIGKILL


@pytest.mark.slow  # > 20 s; CI runs it (make test SLOW=1)
def test_sigkill_mid_run_then_resume_gives_identical_shards(ray_session, samples_dir, tmp_path):
    src = tmp_path / "photos"
    for person in ("obama", "biden", "kit_harington", "rose_leslie"):
        shutil.copytree(samples_dir / person, src / person)
    (src / "group").mkdir()
    for g in ("1.jpg", "3.jpg"):
        shutil.copy(samples_dir / "group" / g, src / "group" / g)
    (src / "obama" / "9.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    inputs = [str(src)]

    ref_out = tmp_path / "uninterrupted"
    res = build_dataset(inputs, ref_out, workers=1, unit_size=1, progress=False)
    corrupt = res.report["corrupt_inputs"]
    assert [c["source"] for c in corrupt] == [str(src / "obama" / "9.jpg")] and corrupt[0]["reason"]
    assert res.identities == 4 and res.train_cp >= 2

    out = tmp_path / "killed"
    manifest = out / "_work" / "faces.manifest.jsonl"
    _run_and_kill(out, inputs, manifest, 3)
    n_units = len(list((ref_out / "_work" / "faces").glob("unit-*.json")))
    done_before = manifest.read_text().count("\n")
    assert 3 <= done_before < n_units and not (out / "report.json").exists()

    build_dataset(inputs, out, workers=1, unit_size=1, progress=False)
    assert not list(out.rglob(".*.tmp"))
    assert output_bytes(out) == output_bytes(ref_out)

    # A real SIGKILL in the write stage: start from the finished face stage, kill after 2 shards.
    out2 = tmp_path / "killed_in_write"
    (out2 / "_work").mkdir(parents=True)
    shutil.copytree(ref_out / "_work" / "faces", out2 / "_work" / "faces")
    for name in ("faces.manifest.jsonl", "settings.json"):
        shutil.copy(ref_out / "_work" / name, out2 / "_work" / name)
    write_manifest = out2 / "_work" / "write.manifest.jsonl"
    _run_and_kill(out2, inputs, write_manifest, 2, poll=0.005)
    assert write_manifest.read_text().count("\n") < n_units and not (out2 / "report.json").exists()
    build_dataset(inputs, out2, workers=1, unit_size=1, progress=False)
    assert output_bytes(out2) == output_bytes(ref_out)

    # An interruption in the write stage: a shard and its manifest line lost, a temporary left behind.
    wm = out / "_work" / "write.manifest.jsonl"
    lines = wm.read_text().splitlines(keepends=True)
    victim = json.loads(lines[-1])["unit"]
    wm.write_text("".join(lines[:-1]) + lines[-1][:10])
    shard = out / "train_rec" / f"{victim:06d}.tar"
    shard.unlink(missing_ok=True)
    (out / "train_rec" / f".{victim:06d}.tar.12345.tmp").write_bytes(b"half a shard")
    build_dataset(inputs, out, workers=1, unit_size=1, progress=False)
    assert output_bytes(out) == output_bytes(ref_out)
    assert not list(out.rglob(".*.tmp"))


def test_cli_builds_from_a_webdataset_tar_input(ray_session, samples_dir, tmp_path):
    import tarfile

    from typer.testing import CliRunner

    from withanyone.cli import app

    tar = tmp_path / "crawl-000.tar"
    with tarfile.open(tar, "w") as tf:
        def add(name: str, data: bytes) -> None:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, __import__("io").BytesIO(data))

        for person in ("obama", "biden"):
            for p in sorted((samples_dir / person).glob("*.jpg")):
                add(f"{person}_{p.stem}.jpg", p.read_bytes())
                add(f"{person}_{p.stem}.json", json.dumps({"search_name": person}).encode())
        add("g1.jpg", (samples_dir / "group" / "1.jpg").read_bytes())
        add("g1.txt", b"two men in suits")
        add("zz.jpg", b"\xff\xd8\xff broken")
    out = tmp_path / "out"
    runner = CliRunner()
    r = runner.invoke(app, ["build-dataset", "--input", str(tar), "--out", str(out), "--unit-size", "3",
                            "--no-progress"])
    assert r.exit_code == 0, r.output
    assert sorted(json.loads((out / "identities.json").read_text())) == ["biden", "obama"]
    g1 = [s for s in iter_samples(out / "train_cp") if s.url == f"{tar}#g1.jpg"]
    assert len(g1) == 1 and sorted(g1[0].names) == ["biden", "obama"] and g1[0].caption == "two men in suits"
    refs = list(iter_references(out / "ref" / "tars"))
    assert {r.identity for r in refs} == {"biden", "obama"} and all(r.image_bytes[:2] == b"\xff\xd8" for r in refs)
    rep = json.loads((out / "report.json").read_text())
    assert [c["source"] for c in rep["corrupt_inputs"]] == [f"{tar}#zz.jpg"]
    r = runner.invoke(app, ["build-dataset", "--input", str(tmp_path / "missing"), "--out", str(out)])
    assert r.exit_code == 1 and "no such file" in " ".join(r.output.split())
    r = runner.invoke(app, ["build-dataset", "--input", str(tar), "--out", str(out), "--unit-size", "5",
                            "--no-progress"])
    msg = " ".join(r.output.split())
    assert r.exit_code == 1 and "settings differ (unit_size)" in msg and "--overwrite" in msg


def test_photo_replaced_under_the_same_name_is_reprocessed(ray_session, samples_dir, tmp_path):
    """Inputs are fingerprinted by content: a replaced photo is redone (its unit only), a touched one is not."""
    from PIL import Image

    src = tmp_path / "photos"
    for person, n in (("obama", 3), ("biden", 2)):
        (src / person).mkdir(parents=True)
        for k in range(1, n + 1):
            shutil.copyfile(samples_dir / person / f"{k}.jpg", src / person / f"{k}.jpg")
    out = tmp_path / "out"
    build_dataset([src], out, workers=1, unit_size=2, progress=False)  # units: biden 1-2 | obama 1-2 | obama 3
    manifest = out / "_work" / "faces.manifest.jsonl"
    lines = manifest.read_text().count("\n")
    victim = src / "obama" / "3.jpg"
    old = {s.url: s.image_bytes for s in iter_samples(out / "train_rec")}[str(victim)]

    later = time.time() + 10
    os.utime(victim, (later, later))  # touched, same bytes: the hash confirms nothing changed
    res = build_dataset([src], out, workers=1, unit_size=2, progress=False)
    assert manifest.read_text().count("\n") == lines and res.report["inputs_changed"] == []

    Image.open(victim).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(victim, quality=90)  # same name, new photo
    res = build_dataset([src], out, workers=1, unit_size=2, progress=False)
    assert res.report["inputs_changed"] == [str(victim)]
    redone = [json.loads(ln) for ln in manifest.read_text().splitlines()[lines:]]
    assert [r["unit"] for r in redone] == [2]  # only the unit holding the replaced photo
    new = {s.url: s for s in iter_samples(out / "train_rec")}[str(victim)]
    assert new.image_bytes == victim.read_bytes() != old
    assert new.names == ["obama"]

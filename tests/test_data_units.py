"""Fast tests of the MultiID-2M builder's parts (no Ray, no face model): restricted unpickling, published
schema reading, bank clustering, assignment, filters, ingest, shards and manifests."""

from __future__ import annotations

import io
import json
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest

from withanyone.data.assign import CenterIndex, Thresholds, thresholds_for
from withanyone.data.bank import BankMember, build_bank, slugify
from withanyone.data.errors import ConfigMismatchError, DatasetError, InputError, UnsafePickleError
from withanyone.data.faces_stage import FaceRecord, PhotoRecord, yaw_proxy
from withanyone.data.filters import FilterConfig, filter_photo
from withanyone.data.ingest import InputItem, image_extension, ingest, read_item_bytes
from withanyone.data.manifest import UnitManifest, check_settings, make_units
from withanyone.data.reader import (
    iter_references,
    iter_samples,
    load_npy_restricted,
    read_cluster_centers,
    read_negative_pool,
)
from withanyone.data.shards import (
    image_label,
    json_bytes,
    npy_bytes,
    remove_stale_temporaries,
    write_cluster_centers,
    write_negative_pool,
    write_shard,
)

JPEG = b"\xff\xd8\xff\xe0" + b"\x00" * 60  # enough for format sniffing; never decoded in these tests


def unit(v: np.ndarray) -> np.ndarray:
    return (v / np.linalg.norm(v, axis=-1, keepdims=True)).astype(np.float32)


def _tar(path: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as tf:
        for name, data in members.items():
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))


# ---------------------------------------------------------------- restricted unpickler


def test_npy_pickled_dict_reads_back_exactly():
    emb = np.random.default_rng(0).normal(size=(3, 512)).astype(np.float32)
    data = npy_bytes({"embeddings": emb, "name": "id_7", "scores": [0.5, 1], "n": np.int64(3)})
    got = load_npy_restricted(data, "x.npy")
    assert set(got) == {"embeddings", "name", "scores", "n"}
    np.testing.assert_array_equal(got["embeddings"], emb)
    assert got["embeddings"].dtype == np.float32 and got["name"] == "id_7" and got["scores"] == [0.5, 1]
    plain = load_npy_restricted(npy_bytes(emb[0]), "c.npy")
    np.testing.assert_array_equal(plain, emb[0])


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_malicious_pickle_is_refused(tmp_path):
    # An object array whose pickle calls os.system when loaded with allow_pickle=True.
    arr = np.empty((), dtype=object)
    arr[()] = {"embeddings": np.zeros(4, np.float32), "payload": _Evil()}
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=True)
    with pytest.raises(UnsafePickleError) as ei:
        load_npy_restricted(buf.getvalue(), "evil.npy")
    assert "posix.system" in str(ei.value) or "os.system" in str(ei.value)
    assert ei.value.source == "evil.npy"
    # A bare pickle of builtins.eval smuggled inside an .npy header of object dtype is refused too.
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "|O", "fortran_order": False, "shape": ()})
    assert header.getvalue().startswith(b"\x93NUMPY")
    evil = header.getvalue() + pickle.dumps(eval)
    with pytest.raises(UnsafePickleError):
        load_npy_restricted(evil, "eval.npy")


def test_npy_garbage_is_a_typed_error():
    with pytest.raises(DatasetError, match="not a .npy file"):
        load_npy_restricted(b"hello world", "bad.npy")


# ---------------------------------------------------------------- published schema


def test_published_label_schema_reads(tmp_path):
    rng = np.random.default_rng(1)
    emb = unit(rng.normal(size=(2, 512)))
    label = {"url": "https://example.com/a.jpg", "ram_score": 0.81, "bboxes": [[10, 20, 110, 140], [200, 30, 290, 150]],
             "aesthetics_score": 5.5, "caption_en": "two people on a stage", "name": ["12345", None],
             "embeddings": emb.tolist()}
    label_none = {**label, "name": None, "bboxes": [[1, 2, 3, 4]], "embeddings": emb[:1].tolist()}
    _tar(tmp_path / "train_cp-000.tar", {"abc.jpg": JPEG, "abc.json": json.dumps(label).encode(),
                                         "abd.jpg": JPEG, "abd.json": json.dumps(label_none).encode()})
    samples = list(iter_samples(tmp_path / "train_cp-000.tar"))
    assert [s.key for s in samples] == ["abc", "abd"]
    s = samples[0]
    assert s.url == label["url"] and s.caption == label["caption_en"] and s.ram_score == 0.81
    assert s.names == ["12345", None] and not s.identified and s.num_faces == 2
    np.testing.assert_array_equal(s.bboxes, np.array(label["bboxes"], np.float32))
    np.testing.assert_array_equal(s.embeddings, emb)
    assert s.image_bytes == JPEG and s.image_ext == "jpg"
    assert samples[1].names == [None]
    # published reference shard: image + .npy pickled dict with key "embedding"
    ref_dict = npy_bytes({"embedding": emb[0]})
    _tar(tmp_path / "ref.tar", {"12345_0.jpg": JPEG, "12345_0.npy": ref_dict})
    refs = list(iter_references(tmp_path / "ref.tar"))
    assert len(refs) == 1 and refs[0].embeddings.shape == (1, 512)
    np.testing.assert_array_equal(refs[0].embeddings[0], emb[0])
    # cluster centres: one .npy per identity id
    _tar(tmp_path / "cluster_centers.tar", {"12345.npy": npy_bytes(emb[0]), "678.npy": npy_bytes(emb[1])})
    centres = read_cluster_centers(tmp_path / "cluster_centers.tar")
    assert sorted(centres) == ["12345", "678"]
    np.testing.assert_array_equal(centres["678"], emb[1])


def test_reader_errors_name_the_sample(tmp_path):
    _tar(tmp_path / "bad.tar", {"k1.jpg": JPEG, "k1.json": b'{"bboxes": [[1,2,3,4]], "name": ["a", "b"]}'})
    with pytest.raises(DatasetError, match="bad.tar#k1"):
        list(iter_samples(tmp_path / "bad.tar"))
    with pytest.raises(DatasetError, match="no such shard"):
        list(iter_samples(tmp_path / "missing.tar"))


# ---------------------------------------------------------------- shards


def test_shards_are_atomic_reproducible_and_round_trip(tmp_path):
    rng = np.random.default_rng(2)
    emb = unit(rng.normal(size=(2, 128)))
    lab = image_label("/photos/x.jpg", [[1.5, 2, 30, 40], [50, 60, 90, 99.25]], ["obama", None], emb.tolist(),
                      caption="c", landmarks=[[[1, 2]] * 5] * 2)
    samples = [{"__key__": "00000001", "jpg": JPEG, "json": json_bytes(lab)}]
    a, b = tmp_path / "a" / "000000.tar", tmp_path / "b" / "000000.tar"
    assert write_shard(a, samples) == 1
    write_shard(b, samples)
    assert a.read_bytes() == b.read_bytes()  # fixed mtime/owner → byte-identical reruns
    assert not list(a.parent.glob(".*"))      # no temporary left behind
    (s,) = list(iter_samples(a))
    assert s.names == ["obama", None] and s.labels["landmarks"] == lab["landmarks"]
    np.testing.assert_array_equal(s.embeddings, emb)  # float32 → JSON → float32 is exact
    stale = a.parent / ".000001.tar.999.tmp"
    stale.write_bytes(b"partial")
    assert remove_stale_temporaries(tmp_path) == 1 and not stale.exists()


def test_writer_crash_leaves_no_partial_shard(tmp_path):
    def boom():
        yield {"__key__": "a", "jpg": JPEG}
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        write_shard(tmp_path / "x.tar", boom())
    assert list(tmp_path.iterdir()) == []


def test_centres_and_negative_pool_round_trip(tmp_path):
    rng = np.random.default_rng(3)
    c = unit(rng.normal(size=(3, 128)))
    write_cluster_centers(tmp_path / "cc.tar", ["a", "b", "c"], c)
    got = read_cluster_centers(tmp_path / "cc.tar")
    np.testing.assert_array_equal(np.stack([got[k] for k in "abc"]), c)
    pools = [unit(rng.normal(size=(n, 128))) for n in (2, 4, 1)]
    write_negative_pool(tmp_path / "neg.safetensors", ["a", "b", "c"], pools, "dlib")
    pool = read_negative_pool(tmp_path / "neg.safetensors")
    assert pool.ids == ["a", "b", "c"] and pool.backend == "dlib" and pool.embeddings.shape == (7, 128)
    np.testing.assert_array_equal(pool.of("b"), pools[1])
    assert len(pool.negatives_for(["b"])) == 3


# ---------------------------------------------------------------- bank and assignment


def _cloud(rng, centre, n, spread):
    return unit(centre + spread * rng.normal(size=(n, centre.size)))


def test_bank_dominant_cluster_outliers_min_photos_and_merge():
    rng = np.random.default_rng(4)
    d = 128
    ca, cb, cc = (unit(rng.normal(size=d)) for _ in range(3))
    th = thresholds_for("insightface")
    cand = {
        # 8 photos of A plus 2 photos of someone else under A's name → outliers
        "Person A": [BankMember(i, 0, e, f"a{i}") for i, e in enumerate(np.concatenate(
            [_cloud(rng, ca * 3, 8, 0.1), _cloud(rng, cc * 3, 2, 0.1)]))],
        "B": [BankMember(100 + i, 0, e, f"b{i}") for i, e in enumerate(_cloud(rng, cb * 3, 5, 0.1))],
        "B alias": [BankMember(200 + i, 0, e, f"bb{i}") for i, e in enumerate(_cloud(rng, cb * 3, 3, 0.1))],
        "lonely": [BankMember(300, 0, unit(rng.normal(size=d)), "l0")],
    }
    bank = build_bank(cand, th.member, th.merge, min_photos=2)
    table = bank.table()
    assert sorted(table) == ["b", "person_a"]
    assert table["person_a"]["members"] == 8 and bank.outliers == 2
    assert table["b"]["search_names"] == ["B", "B alias"] and table["b"]["members"] == 8
    assert bank.merged == [["B", "B alias"]]
    assert "lonely" in bank.dropped
    assert {m.photo for m in bank.identities[1].members} == set(range(8))
    assert slugify("Kit Harington!") == "kit_harington"


def test_assignment_threshold_margin_and_one_face_per_identity():
    th = Thresholds(assign=0.5, margin=0.1, member=0.5, merge=0.8)
    c = np.eye(4, dtype=np.float32)[:3]
    idx = CenterIndex(["a", "b", "c"], c, th)
    faces = unit(np.array([
        [1.0, 0.1, 0.0, 0.0],   # clearly a
        [0.0, 0.0, 0.1, 1.0],   # nobody
        [0.7, 0.68, 0.0, 0.1],  # a or b: ambiguous
        [0.0, 0.2, 1.0, 0.0],   # clearly c
    ]))
    got = idx.assign(faces)
    assert [g.id for g in got] == ["a", None, None, "c"]
    assert [g.reason for g in got] == [None, "below_threshold", "ambiguous", None]
    assert got[0].score == pytest.approx(float(faces[0] @ c[0]), abs=1e-6)
    dup = idx.assign(unit(np.array([[1.0, 0.05, 0, 0], [1.0, 0.2, 0, 0]])))
    assert [g.id for g in dup] == ["a", None] and dup[1].reason == "duplicate_in_photo"
    assert idx.assign(np.zeros((0, 4))) == []
    with pytest.raises(ValueError, match="embedding size"):
        idx.assign(np.ones((1, 5)))


def test_dlib_thresholds_sit_in_the_measured_gap():
    t = thresholds_for("dlib")
    assert 0.919 < t.assign < 0.929 and t.merge > 0.915
    assert thresholds_for("buffalo_l").assign == pytest.approx(0.45)


# ---------------------------------------------------------------- filters


def _face(size: float, sharp: float = 100.0) -> FaceRecord:
    lm = [[30, 40], [70, 40], [50, 60], [35, 80], [65, 80]]
    return FaceRecord([0, 0, size, size], 1.0, lm, [1.0, 0.0], size, sharp, yaw_proxy(np.array(lm)))


def test_filters_count_size_sharpness():
    cfg = FilterConfig()
    item = InputItem("x.jpg", "n")
    assert filter_photo(PhotoRecord(0, item, (9, 9), [_face(100), _face(20)]), cfg).kept == [0]
    assert filter_photo(PhotoRecord(0, item, (9, 9), [_face(20)]), cfg).reason == "no_face"
    assert filter_photo(PhotoRecord(0, item, (9, 9), [_face(100)] * 6), cfg).reason == "too_many_faces"
    assert filter_photo(PhotoRecord(0, item, (9, 9), [_face(100, 5.0)]), cfg).reason == "blurry"
    assert filter_photo(PhotoRecord(0, item, error="boom"), cfg).reason == "unreadable"
    assert _face(100).frontal and yaw_proxy(np.array([[30, 40], [70, 40], [70, 60], [0, 0], [0, 0]])) == 0.5


# ---------------------------------------------------------------- ingest and manifests


def test_ingest_folders_globs_tars_and_manifests(tmp_path):
    (tmp_path / "photos" / "Ann").mkdir(parents=True)
    (tmp_path / "photos" / "group").mkdir()
    (tmp_path / "photos" / "Ann" / "1.jpg").write_bytes(JPEG)
    (tmp_path / "photos" / "group" / "g.jpg").write_bytes(JPEG)
    (tmp_path / "photos" / "loose.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    items = ingest([tmp_path / "photos"])
    assert [(Path(i.source).name, i.search_name) for i in items] == [("1.jpg", "Ann"), ("g.jpg", None),
                                                                     ("loose.png", None)]
    assert [i.search_name for i in ingest([str(tmp_path / "photos" / "*" / "*.jpg")])] == ["Ann", None]
    _tar(tmp_path / "in.tar", {"s1.jpg": JPEG, "s1.json": b'{"search_name": "Bo", "caption": "hi"}',
                               "s2.png": b"\x89PNG\r\n\x1a\nxx", "s3.txt": b"orphan"})
    t = ingest([tmp_path / "in.tar"])
    assert [(i.search_name, i.caption) for i in t] == [("Bo", "hi"), (None, None)]
    assert read_item_bytes(t[0]) == JPEG and image_extension(read_item_bytes(t[1])) == "png"
    (tmp_path / "m.csv").write_text("path,search_name,caption\nphotos/Ann/1.jpg,Ann,a caption\n"
                                    "https://example.com/x.jpg,,\n")
    m = ingest([tmp_path / "m.csv"])
    assert m[0].source == str(tmp_path / "photos/Ann/1.jpg") and m[0].caption == "a caption"
    with pytest.raises(ValueError, match="fetch stage is off"):
        read_item_bytes(m[1])
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"path": ["photos/Ann/1.jpg"], "name": ["Ann"]}), tmp_path / "m.parquet")
    assert ingest([tmp_path / "m.parquet"])[0].search_name == "Ann"
    with pytest.raises(InputError, match="no such file"):
        ingest([tmp_path / "nope"])
    (tmp_path / "bad.csv").write_text("file_name\nx\n")
    with pytest.raises(InputError, match="'path'"):
        ingest([tmp_path / "bad.csv"])


def test_manifest_units_keys_and_settings(tmp_path):
    assert [list(r) for r in make_units(5, 2)] == [[0, 1], [2, 3], [4]]
    m = UnitManifest(tmp_path / "m.jsonl", "k1")
    m.mark(0)
    m.mark(2)
    with open(tmp_path / "m.jsonl", "ab") as f:
        f.write(b'{"unit": 3, "key": "k1"')  # torn last line of a killed run
    assert m.done() == {0, 2}
    assert UnitManifest(tmp_path / "m.jsonl", "k2").done() == set()  # upstream changed → redo
    check_settings(tmp_path, {"a": 1}, [{"source": "x"}])
    check_settings(tmp_path, {"a": 1}, [{"source": "x"}])
    with pytest.raises(ConfigMismatchError, match="settings differ \\(a\\)"):
        check_settings(tmp_path, {"a": 2}, [{"source": "x"}])
    check_settings(tmp_path, {"a": 2}, [{"source": "x"}], overwrite=True)


def test_face_stage_turns_bad_photos_into_error_records(tmp_path, samples_dir):
    from withanyone.data.faces_stage import analyze_photo

    class Exploding:
        def detect(self, image):
            raise RuntimeError("backend blew up")

    photo = next((samples_dir / "obama").glob("*.jpg"))
    rec = analyze_photo(Exploding(), 3, InputItem(str(photo), "obama"))
    assert rec.error == "face backend failed: RuntimeError: backend blew up" and rec.size[0] > 0
    (tmp_path / "trunc.jpg").write_bytes(photo.read_bytes()[:200])
    bad = analyze_photo(Exploding(), 4, InputItem(str(tmp_path / "trunc.jpg")))
    assert bad.error and "backend" not in bad.error and bad.faces == []
    missing = analyze_photo(Exploding(), 5, InputItem(str(tmp_path / "gone.jpg")))
    assert missing.error.startswith("FileNotFoundError")


def test_non_ascii_names_get_readable_ids_and_keep_the_original():
    # was "n_c_d" (Nicolás → n_col_s…), "id", "id_2": ids must stay readable and distinct
    assert slugify("Nicolás Cage D'Ávila") == "nicolas_cage_d_avila"
    assert slugify("杨幂") == "yangmi" and slugify("Владимир Путин") == "vladimir_putin"
    rng = np.random.default_rng(7)
    cand = {name: [BankMember(10 * k + i, 0, e, f"{k}{i}") for i, e in
                   enumerate(_cloud(rng, unit(rng.normal(size=64)) * 3, 3, 0.05))]
            for k, name in enumerate(["杨幂", "김연아", "Björk"])}
    th = thresholds_for("insightface")
    table = build_bank(cand, th.member, th.merge, min_photos=2).table()
    assert sorted(table) == ["bjork", "gimyeona", "yangmi"]
    assert {v["search_name"] for v in table.values()} == {"杨幂", "김연아", "Björk"}


def test_faces_stage_keeps_the_raw_norm_for_labels(samples_dir):
    """insightface faces carry their raw ArcFace norm; labels store the raw vector (as the published ones and
    generation's adapter input), the builder's matching keeps the unit vector; old records default to norm 1."""
    from withanyone.data.faces_stage import analyze_photo
    from withanyone.faces.types import Face

    unit_vec = unit(np.arange(1, 9, dtype=np.float32))

    class RawNormAnalyzer:  # an insightface-like backend: unit embedding + its raw norm in extra
        def detect(self, image):
            lm = np.array([[40, 50], [80, 50], [60, 70], [45, 90], [75, 90]], np.float32)
            return [Face(bbox=np.array([20, 20, 100, 110], np.float32), score=0.9, landmarks=lm,
                         embedding=unit_vec, backend="insightface", extra={"embedding_norm": 23.5})]

    rec = analyze_photo(RawNormAnalyzer(), 0, InputItem(str(samples_dir / "obama" / "1.jpg")))
    face = rec.faces[0]
    np.testing.assert_allclose(face.embedding_array(), unit_vec, rtol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(face.raw_embedding()), 23.5, rtol=1e-5)
    old = FaceRecord(**{k: v for k, v in face.__dict__.items() if k != "embedding_norm"})
    assert old.embedding_norm == 1.0 and old.raw_embedding() == face.embedding


def test_reference_tars_store_the_raw_norm(samples_dir):
    """Reference-bank samples store embedding × raw norm (insightface's raw vector, as training feeds the adapter)."""
    from withanyone.data.bank import BankIdentity, BankMember
    from withanyone.data.pipeline import _reference_samples
    from withanyone.data.reader import load_npy_restricted

    v = unit(np.arange(1, 9, dtype=np.float32))
    src = str(samples_dir / "obama" / "1.jpg")
    members = [BankMember(0, 0, v, src, item=InputItem(src), embedding_norm=21.0),
               BankMember(1, 0, v, src, item=InputItem(src))]  # dlib-like: norm 1
    (raw, plain) = list(_reference_samples([BankIdentity("id_a", ["a"], v, members)], fetch=False))
    for sample, norm in ((raw, 21.0), (plain, 1.0)):
        emb = np.asarray(load_npy_restricted(sample["npy"])["embeddings"])
        np.testing.assert_allclose(emb[0], v * norm, rtol=1e-6)

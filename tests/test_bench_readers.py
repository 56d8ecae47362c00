"""Benchmark readers: the authors' folder layout, hub parquet (pyarrow and datasets paths), method folders."""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path

import pytest

from withanyone.bench.readers import (
    BenchmarkFormatError,
    convert_hub,
    read_folder_layout,
    read_hub,
    read_method_outputs,
)
from withanyone.bench.samples import Benchmark, Sample, subset_for


def _img(samples_dir: Path, rel: str) -> bytes:
    return (samples_dir / rel).read_bytes()


def _hub_table(samples_dir: Path):
    import pyarrow as pa

    img = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    rows = [
        {"ID": "0001", "GT": {"bytes": _img(samples_dir, "obama/1.jpg"), "path": None},
         "input_images": [{"bytes": _img(samples_dir, "obama/2.jpg"), "path": None}],
         "prompt": "a man <in> a suit", "task_type": "single", "bboxes": [[10.0, 20.0, 110.0, 140.0]],
         "subset": "p1", "num_persons": 1},
        {"ID": "0002", "GT": {"bytes": _img(samples_dir, "group/1.jpg"), "path": None},
         "input_images": [{"bytes": _img(samples_dir, "obama/2.jpg"), "path": None},
                          {"bytes": _img(samples_dir, "biden/2.jpg"), "path": None}],
         "prompt": "two men", "task_type": "multi", "bboxes": [[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]],
         "subset": "p2", "num_persons": 2},
        {"ID": "a/b", "GT": {"bytes": _img(samples_dir, "group/2.jpg"), "path": None},
         "input_images": [{"bytes": _img(samples_dir, n), "path": None}
                          for n in ("obama/3.jpg", "biden/1.jpg", "kit_harington/1.jpg")],
         "prompt": "three", "task_type": "multi", "bboxes": None, "subset": None, "num_persons": 3},
    ]
    schema = pa.schema([("ID", pa.string()), ("GT", img), ("input_images", pa.list_(img)), ("prompt", pa.string()),
                        ("task_type", pa.string()), ("bboxes", pa.list_(pa.list_(pa.float64()))),
                        ("subset", pa.string()), ("num_persons", pa.int64())])
    return pa.Table.from_pylist(rows, schema=schema)


def test_subsets():
    assert [subset_for(n) for n in (1, 2, 3, 4)] == ["p1", "p2", "p3", "p3"]
    s = Sample("x", "p", ["a.jpg", "b.jpg"])
    assert s.num_persons == 2 and s.subset == "p2"
    with pytest.raises(ValueError, match="twice"):
        Benchmark("b", [s, Sample("x", "q", ["c.jpg"])])


def test_hub_parquet_converts_to_authors_layout(tmp_path, samples_dir):
    import pyarrow.parquet as pq

    pq.write_table(_hub_table(samples_dir), tmp_path / "bench.parquet")
    bench = convert_hub(tmp_path / "bench.parquet", tmp_path / "layout", progress=False)
    assert [s.id for s in bench] == ["0001", "0002", "a_b"]
    by = bench.by_id()
    assert by["0001"].prompt == "a man <in> a suit" and by["0001"].subset == "p1"
    assert by["0001"].boxes == [[10.0, 20.0, 110.0, 140.0]]
    assert (tmp_path / "layout/0001/ori.jpg").read_bytes() == _img(samples_dir, "obama/1.jpg")  # bytes kept
    assert (tmp_path / "layout/0002/ref_2.jpg").read_bytes() == _img(samples_dir, "biden/2.jpg")
    assert by["0002"].num_persons == 2 and by["0002"].subset == "p2" and len(by["0002"].references) == 2
    assert by["a_b"].subset == "p3" and len(by["a_b"].references) == 3  # subset derived from num_persons
    meta = json.loads((tmp_path / "layout/0002/meta.json").read_text())
    assert meta["task_type"] == "multi" and meta["prompt"] == "two men"
    # rerun resumes: existing complete folders are kept, not rewritten
    mtime = (tmp_path / "layout/0001/meta.json").stat().st_mtime_ns
    convert_hub(tmp_path / "bench.parquet", tmp_path / "layout", progress=False)
    assert (tmp_path / "layout/0001/meta.json").stat().st_mtime_ns == mtime


def test_hub_reader_via_datasets_library(tmp_path, samples_dir):
    """The hub-id code path (``datasets.load_dataset``) on a local dataset folder: same result."""
    import datasets

    folder = tmp_path / "hubcopy" / "data"
    folder.mkdir(parents=True)
    # written the way the hub stores it: GT an Image feature, input_images a list of Image features
    feats = datasets.Features({
        "ID": datasets.Value("string"), "GT": datasets.Image(), "input_images": datasets.List(datasets.Image()),
        "prompt": datasets.Value("string"), "task_type": datasets.Value("string"),
        "bboxes": datasets.List(datasets.List(datasets.Value("float64"))), "subset": datasets.Value("string"),
        "num_persons": datasets.Value("int64")})
    datasets.Dataset.from_list(_hub_table(samples_dir).to_pylist(), features=feats).to_parquet(
        str(folder / "train-00000-of-00001.parquet"))
    # a hub id (not a local path) goes through datasets.load_dataset; redirect it to the local copy
    import datasets

    ds_rows = []
    orig = datasets.load_dataset

    def spy(path, *a, **kw):
        ds_rows.append(path)
        return orig(str(tmp_path / "hubcopy"), *a, **kw)

    datasets.load_dataset = spy
    try:
        bench = read_hub("WithAnyone/MultiID-Bench", cache_dir=tmp_path / "cache", progress=False, offline=False)
    finally:
        datasets.load_dataset = orig
    assert ds_rows == ["WithAnyone/MultiID-Bench"]
    assert [s.id for s in bench] == ["0001", "0002", "a_b"]
    assert (tmp_path / "cache/0002/ref_1.jpg").read_bytes() == _img(samples_dir, "obama/2.jpg")


def test_old_base64_columns(tmp_path, samples_dir):
    import pyarrow as pa
    import pyarrow.parquet as pq

    b64 = lambda rel: base64.b64encode(_img(samples_dir, rel)).decode()  # noqa: E731
    t = pa.Table.from_pylist([{"GT": b64("newton/1.jpg"), "ref_1": b64("newton/2.jpg"), "ref_2": None,
                               "prompt": "newton", "bboxes": json.dumps([[1, 2, 3, 4]])}])
    pq.write_table(t, tmp_path / "old.parquet")
    bench = convert_hub(tmp_path / "old.parquet", tmp_path / "out", progress=False)
    (s,) = bench.samples
    assert s.id == "0000" and s.prompt == "newton" and s.boxes == [[1, 2, 3, 4]] and len(s.references) == 1
    assert s.references[0].read_bytes() == _img(samples_dir, "newton/2.jpg")


def test_bad_sources_raise_typed_errors(tmp_path):
    (tmp_path / "x.parquet").write_bytes(b"not parquet")
    with pytest.raises(BenchmarkFormatError, match="x.parquet"):
        convert_hub(tmp_path / "x.parquet", tmp_path / "o", progress=False)
    with pytest.raises(BenchmarkFormatError, match="not found"):
        read_folder_layout(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BenchmarkFormatError, match="no sample folders"):
        read_folder_layout(tmp_path / "empty")


def test_folder_layout_names_and_caption_key(tmp_path, samples_dir):
    root = tmp_path / "b"
    for sid, person in (("s1", "obama"), ("s2", "biden")):
        d = root / sid
        d.mkdir(parents=True)
        shutil.copyfile(samples_dir / person / "1.jpg", d / "gt.png")
        shutil.copyfile(samples_dir / person / "2.jpg", d / "r1.jpg")
        shutil.copyfile(samples_dir / person / "1.jpg", d / "gen.jpg")
        (d / "info.json").write_text(json.dumps({"caption_en": f"photo of {person}", "prompt": "other"}))
    bench, outs = read_folder_layout(root, output_name="gen.jpg", gt_name="gt.jpg", ref_names=["r1.jpg"],
                                     meta_name="info.json", caption_key="caption_en", method="mine")
    assert [s.prompt for s in bench] == ["photo of obama", "photo of biden"]
    assert bench.samples[0].gt.name == "gt.png"  # same stem, other suffix
    assert outs.name == "mine" and set(outs.outputs) == {"s1", "s2"}


def test_method_outputs_folder(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "0001.jpg").write_bytes(b"x")
    (tmp_path / "m" / "0002").mkdir()
    (tmp_path / "m" / "0002" / "out.png").write_bytes(b"x")
    (tmp_path / "m" / "notes.txt").write_text("x")
    mo = read_method_outputs(tmp_path / "m")
    assert mo.name == "m" and set(mo.outputs) == {"0001", "0002"}
    assert set(read_method_outputs(tmp_path / "m", "n", sample_ids=["0002"]).outputs) == {"0002"}


def test_convert_cli(tmp_path, samples_dir):
    import pyarrow.parquet as pq
    from typer.testing import CliRunner

    from withanyone.bench.cli import app

    pq.write_table(_hub_table(samples_dir), tmp_path / "b.parquet")
    res = CliRunner().invoke(app, ["convert", str(tmp_path / "b.parquet"), "--out", str(tmp_path / "o"),
                                   "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "3 samples" in res.output and (tmp_path / "o/a_b/ref_3.jpg").is_file()

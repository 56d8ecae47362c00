"""WithAnyone Studio without a browser: upload analysis and warnings, several photos → one identity,
layout-photo assignment by identity, drawn boxes by name, the bench explorer, and one tiny generation."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("gradio")

from app_helpers import bench_results, faceless_photo  # noqa: E402

from withanyone.app.people import analyse_photo, assign_layout, best_photo, frontality, merge_identity  # noqa: E402
from withanyone.pipeline.references import face_arcface  # noqa: E402


@pytest.fixture(scope="module")
def bad_uploads(tmp_path_factory, samples_dir):
    d = tmp_path_factory.mktemp("bad")
    (d / "empty.jpg").write_bytes(b"")
    data = (samples_dir / "obama" / "1.jpg").read_bytes()
    (d / "corrupt.jpg").write_bytes(b"not an image at all" + data[5000:6000])
    Image.open(samples_dir / "obama" / "1.jpg").convert("CMYK").save(d / "cmyk.jpg")
    Image.new("RGB", (7000, 400), (120, 130, 140)).save(d / "huge.png")
    faceless_photo(d / "landscape.jpg")
    return d


def test_bad_uploads_become_warnings(bad_uploads, dlib_analyzer):
    empty = analyse_photo(bad_uploads / "empty.jpg", dlib_analyzer)
    assert not empty.ok and empty.warnings == ["empty.jpg: file is empty (0 bytes) — photo ignored"]
    corrupt = analyse_photo(bad_uploads / "corrupt.jpg", dlib_analyzer)
    assert not corrupt.ok and "not a recognised image format" in corrupt.warnings[0]
    nothing = analyse_photo(bad_uploads / "landscape.jpg", dlib_analyzer)
    assert not nothing.ok and nothing.faces_found == 0 and "no face found" in nothing.warnings[0]
    huge = analyse_photo(bad_uploads / "huge.png", dlib_analyzer)
    assert any("huge photo (7000x400)" in w for w in huge.warnings)
    # over the pixel limit: refused as a possible decompression bomb, as a warning
    bomb = analyse_photo(bad_uploads / "huge.png", dlib_analyzer, max_pixels=1_000_000)
    assert not bomb.ok and "over the limit" in bomb.warnings[0]
    cmyk = analyse_photo(bad_uploads / "cmyk.jpg", dlib_analyzer)  # CMYK is converted, the face still found
    assert cmyk.ok and cmyk.warnings == [] and cmyk.crop.shape == (256, 256, 3)


def test_group_photo_warns_which_face_and_small_face(samples_dir, dlib_analyzer):
    res = analyse_photo(samples_dir / "group" / "2.jpg", dlib_analyzer)
    assert res.ok and res.faces_found >= 2
    assert any(f"{res.faces_found} faces found — using the highest-scoring (as the release) one" in w
               for w in res.warnings)
    assert res.face.score == max(f.score for f in dlib_analyzer.detect(samples_dir / "group" / "2.jpg"))
    largest = analyse_photo(samples_dir / "group" / "2.jpg", dlib_analyzer, reference_face="largest")
    assert any("using the largest one" in w for w in largest.warnings)
    assert largest.face.area == max(f.area for f in dlib_analyzer.detect(samples_dir / "group" / "2.jpg"))
    small = analyse_photo(samples_dir / "obama" / "1.jpg", dlib_analyzer, min_face=10_000)
    assert any("the face is small" in w for w in small.warnings)


def test_several_photos_give_the_mean_identity(samples_dir, dlib_analyzer):
    photos = [analyse_photo(samples_dir / "obama" / f"{i}.jpg", dlib_analyzer) for i in (1, 2, 3)]
    assert all(p.ok for p in photos)
    ref = merge_identity(photos, need_crop=True)
    raw = np.stack([face_arcface(p.face) for p in photos]).astype(np.float64)
    unit = raw / np.linalg.norm(raw, axis=1, keepdims=True)
    direction = unit.mean(0) / np.linalg.norm(unit.mean(0))
    np.testing.assert_allclose(ref.arcface / np.linalg.norm(ref.arcface), direction, atol=1e-6)
    assert np.linalg.norm(ref.arcface) == pytest.approx(np.linalg.norm(raw, axis=1).mean(), rel=1e-5)
    # the mean is closer to each photo than the photos are to each other on average, and far from biden
    biden = analyse_photo(samples_dir / "biden" / "1.jpg", dlib_analyzer).face.embedding
    cos_mean = unit @ direction
    cos_pairs = [unit[i] @ unit[j] for i in range(3) for j in range(i + 1, 3)]
    assert cos_mean.min() > np.mean(cos_pairs)
    assert float(direction @ biden) < cos_mean.min()
    # SigLIP crop from the most frontal photo
    best = best_photo(photos)
    assert frontality(best.face) >= max(frontality(p.face) for p in photos) - 0.05
    assert ref.crop.shape == (512, 512, 3) and ref.source.count("+") == 2
    # a photo without a face among them is ignored, not averaged in
    faceless = analyse_photo(samples_dir / "group" / "4.jpg", dlib_analyzer)
    faceless.face = None
    np.testing.assert_allclose(merge_identity([*photos, faceless]).arcface, ref.arcface)
    assert merge_identity([faceless]) is None


@pytest.mark.parametrize("order", [("obama", "biden"), ("biden", "obama")])
@pytest.mark.parametrize("group", ["1.jpg", "2.jpg"])
def test_layout_photo_assigned_by_identity(samples_dir, dlib_analyzer, order, group):
    labels = json.loads((samples_dir / "labels.json").read_text())[f"group/{group}"]["people"]
    centre = {p["id"]: p["cx"] for p in labels if p["id"]}
    people = [merge_identity([analyse_photo(samples_dir / who / "2.jpg", dlib_analyzer)]) for who in order]
    a = assign_layout(samples_dir / "group" / group, people, 512, 1024, dlib_analyzer)
    assert a.method == "identity" and len(a.boxes) == 2
    for who, box in zip(order, a.boxes, strict=True):  # each person gets the box around their own face
        cx = (box[0] + box[2]) / 2 / 1024
        assert abs(cx - centre[who]) < 0.08, (who, cx, centre[who])


def test_layout_photo_of_strangers_goes_left_to_right(samples_dir, dlib_analyzer):
    people = [merge_identity([analyse_photo(samples_dir / who / "1.jpg", dlib_analyzer)])
              for who in ("tom_hanks", "scarlett")]
    a = assign_layout(samples_dir / "group" / "1.jpg", people, 512, 512, dlib_analyzer)
    assert a.method == "left-to-right" and a.boxes[0][0] < a.boxes[1][0]


def test_drawn_boxes_follow_their_labels():
    from withanyone.app.studio import boxes_by_name

    drawn = [{"xmin": 600, "ymin": 10, "xmax": 700, "ymax": 110, "label": "alice"},
             {"xmin": 10, "ymin": 10, "xmax": 110, "ymax": 110, "label": ""},
             {"xmin": 300, "ymin": 10, "xmax": 400, "ymax": 110, "label": "carol"}]
    assert boxes_by_name(drawn, ["bob", "carol", "alice"], 512, 1024) == [
        (10.0, 10.0, 110.0, 110.0), (300.0, 10.0, 400.0, 110.0), (600.0, 10.0, 700.0, 110.0)]
    with pytest.raises(ValueError, match="2 box"):
        boxes_by_name(drawn[:2], ["a", "b", "c"], 512, 1024)


def test_bench_explorer_reads_a_real_run(samples_dir, tmp_path):
    from withanyone.app.bench_explorer import BenchResults, ResultsFolderError

    res = BenchResults(bench_results(samples_dir, tmp_path / "results"))
    assert res.methods == ["gt-copy", "mirrored"] and res.subsets == ["p2"] and res.face_models == ["dlib"]
    items = res.sample_list("dlib", "p2", "desc")
    assert [sid for _, sid in items] == ["duo"]
    assert res.sample_list("dlib", "p1") == []
    info, views = res.sample("duo", "dlib")
    assert info["prompt"] == "two men in suits"
    gt_copy = next(v for v in views if v.method == "gt-copy")
    assert len(gt_copy.faces) == 2
    for f in gt_copy.faces:  # the GT copied: each face matches itself (cos 1) and CP is −1
        assert f.sim_gt == pytest.approx(1.0, abs=1e-6) and f.cp == pytest.approx(-1.0, abs=1e-6)
        assert f.sim_ref is not None and f.sim_ref < 1.0
    assert np.mean([f.sim_gt for f in gt_copy.faces]) == pytest.approx(gt_copy.row["sim_gt"], abs=1e-6)
    assert np.mean([f.sim_ref for f in gt_copy.faces]) == pytest.approx(gt_copy.row["sim_ref"], abs=1e-6)
    with pytest.raises(ResultsFolderError, match="no results.jsonl"):
        BenchResults(tmp_path)


def test_tiny_generation_writes_the_cli_sidecar(samples_dir, tmp_path):
    from withanyone.app import LoadOptions, Person, Placement, Studio, load_models

    models = load_models(LoadOptions(tiny=True, device="cpu"))
    studio = Studio(models, tmp_path)
    people = [Person("obama", [str(samples_dir / "obama" / "1.jpg"), str(samples_dir / "obama" / "2.jpg")]),
              Person("biden", [str(samples_dir / "biden" / "1.jpg")])]
    events = list(studio.generate("a photo of two people", people, Placement("auto"), height=64, width=96, steps=2,
                                  guidance=4.0, seed=7, siglip_weight=0.25))
    assert [e["step"] for e in events[:-1]] == [1, 2]
    done = events[-1]
    assert done["image"].size == (96, 64) and done["seed"] == 7
    side = json.loads(open(done["sidecar_path"]).read())
    from withanyone.pipeline.layout import auto_boxes

    assert side["boxes"] == [list(b) for b in auto_boxes(2, 64, 96)] and side["box_mode"] == "auto"
    assert side["id_weight"] == 0.75 and side["siglip_weight"] == 0.25 and side["names"] == ["obama", "biden"]
    cli_keys = ["prompt", "references", "reference_sources", "boxes", "box_mode", "layout", "id_weight",
                "siglip_weight", "seed", "height", "width", "steps", "guidance", "lora", "lora_scale", "dtype",
                "device", "offload", "models", "versions", "output"]
    assert list(side)[:len(cli_keys)] == cli_keys
    # a person without a usable photo is a message, not a crash
    with pytest.raises(ValueError, match="biden: no photo with a detectable face"):
        list(studio.generate("x", [people[0], Person("biden", [])], Placement("auto"), height=64, width=64, steps=1,
                             guidance=4.0, seed=1, siglip_weight=0.0))


def test_missing_weights_are_explained(tmp_path):
    from withanyone.app import LoadOptions, load_models
    from withanyone.app.ui import banner

    models = load_models(LoadOptions(base=str(tmp_path / "no-flux"), device="cpu"))
    assert not models.ready
    text = banner(models)
    assert "no-flux/model_index.json is missing" in text and "hf download" in text


def _tiny_image(refs, preset):
    from withanyone.app.models import apply_preset
    from withanyone.pipeline.tiny import tiny_pipeline

    pipe = tiny_pipeline()
    pipe.set_progress_bar_config(disable=True)
    apply_preset(pipe, preset, "cpu")
    return pipe("a photo of two people", references=refs, height=64, width=64, num_inference_steps=2, seed=3,
                output_type="np", siglip_weight=0.3, id_weight=0.7).images[0]


@pytest.fixture(scope="module")
def duo_refs(samples_dir, dlib_analyzer):
    return [merge_identity([analyse_photo(samples_dir / who / "1.jpg", dlib_analyzer)], need_crop=True)
            for who in ("obama", "biden")]


@pytest.fixture(scope="module")
def plain_image(duo_refs):
    return _tiny_image(duo_refs, "none")


@pytest.mark.parametrize("preset", ["model-offload", "group-offload"])
def test_low_vram_presets_keep_the_images(duo_refs, plain_image, preset):
    """The offload presets run the adapter and give the very image of the plain placement (CPU as device)."""
    np.testing.assert_array_equal(_tiny_image(duo_refs, preset), plain_image)
    assert plain_image.std() > 0.01


def test_cancel_stops_the_generation(duo_refs, tmp_path, monkeypatch):
    from withanyone.app import LoadOptions, Person, Placement, Studio, load_models
    from withanyone.app.studio import Cancelled

    studio = Studio(load_models(LoadOptions(tiny=True, device="cpu")), tmp_path)
    monkeypatch.setattr(studio, "references", lambda people, need_crop: (duo_refs, []))
    steps = []
    with pytest.raises(Cancelled):
        for ev in studio.generate("a photo", [Person("a"), Person("b")], Placement("auto"), height=64, width=64,
                                  steps=4, guidance=4.0, seed=1, siglip_weight=0.0):
            steps.append(ev["step"])
            studio.cancel()
    assert 1 <= len(steps) <= 4
    assert not list(tmp_path.glob("*.png"))  # nothing written for a cancelled run


def test_lora_file_acts_and_unloads(duo_refs, tmp_path, monkeypatch):
    import torch
    from peft import LoraConfig, get_peft_model_state_dict

    from withanyone.app import LoadOptions, Person, Placement, Studio, load_models
    from withanyone.pipeline.pipeline import WithAnyonePipeline
    from withanyone.pipeline.tiny import tiny_transformer

    donor = tiny_transformer()
    torch.manual_seed(1)
    donor.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                 init_lora_weights=False))
    WithAnyonePipeline.save_lora_weights(tmp_path / "lora", transformer_lora_layers=get_peft_model_state_dict(donor))
    lora_file = tmp_path / "lora" / "pytorch_lora_weights.safetensors"
    studio = Studio(load_models(LoadOptions(tiny=True, device="cpu")), tmp_path / "out")
    monkeypatch.setattr(studio, "references", lambda people, need_crop: (duo_refs, []))

    def image(lora):
        events = list(studio.generate("a photo", [Person("a"), Person("b")], Placement("auto"), height=64, width=64,
                                      steps=2, guidance=4.0, seed=5, siglip_weight=0.0, lora=lora, lora_scale=1.0))
        return np.asarray(events[-1]["image"], dtype=np.int16), events[-1]["sidecar"]

    plain, _ = image(None)
    styled, side = image(str(lora_file))
    assert np.abs(styled - plain).max() > 3 and side["lora"] == [str(lora_file)]
    np.testing.assert_array_equal(image(None)[0], plain)  # unloaded again


def test_app_starts_without_weights_and_says_what_is_missing(tmp_path):
    import socket
    import urllib.request

    from withanyone.app import LoadOptions, launch

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    demo = launch(LoadOptions(base=str(tmp_path / "no-flux"), device="cpu"), port=port, out_dir=str(tmp_path / "o"),
                  block=False)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/config", timeout=30) as r:
            config = r.read().decode()
        assert "no-flux/model_index.json is missing" in config and "hf download" in config
    finally:
        demo.close()

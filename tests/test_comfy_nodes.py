"""The ComfyUI node classes without ComfyUI: definitions well-formed, people and boxes built as the pipeline and
the app build them, the loader, and the example workflows wired only to nodes and inputs that exist."""

from __future__ import annotations

import inspect
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from withanyone.comfy import nodes as N
from withanyone.comfy.patch import AdapterModule
from withanyone.comfy.types import ADAPTER, BOXES, FACE_ANALYZER, PERSON, SIGLIP, FaceBoxes, Person

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = ROOT / "comfyui" / "example_workflows"
OWN_TYPES = {ADAPTER, BOXES, FACE_ANALYZER, PERSON, SIGLIP}
CORE_TYPES = {"MODEL", "IMAGE", "STRING", "INT", "FLOAT", "BOOLEAN", "BBOX", "MASK", "LATENT", "CONDITIONING",
              "CLIP", "VAE"}

#: Core ComfyUI nodes the examples use: inputs (name → type; "W" = a widget) and outputs, as in ComfyUI's source.
CORE_NODES = {
    "UNETLoader": ({"unet_name": "W", "weight_dtype": "W"}, ["MODEL"]),
    "DualCLIPLoader": ({"clip_name1": "W", "clip_name2": "W", "type": "W", "device": "W?"}, ["CLIP"]),
    "VAELoader": ({"vae_name": "W"}, ["VAE"]),
    "LoraLoaderModelOnly": ({"model": "MODEL", "lora_name": "W", "strength_model": "W"}, ["MODEL"]),
    "LoadImage": ({"image": "W", "upload": "UI"}, ["IMAGE", "MASK"]),
    "PreviewImage": ({"images": "IMAGE"}, []),
    "PreviewAny": ({"source": "*"}, []),
    "CLIPTextEncode": ({"text": "W", "clip": "CLIP"}, ["CONDITIONING"]),
    "FluxGuidance": ({"conditioning": "CONDITIONING", "guidance": "W"}, ["CONDITIONING"]),
    "EmptySD3LatentImage": ({"width": "W", "height": "W", "batch_size": "W"}, ["LATENT"]),
    "KSampler": ({"model": "MODEL", "seed": "W", "control_after_generate": "UI", "steps": "W", "cfg": "W",
                  "sampler_name": "W", "scheduler": "W", "positive": "CONDITIONING", "negative": "CONDITIONING",
                  "latent_image": "LATENT", "denoise": "W"}, ["LATENT"]),
    "VAEDecode": ({"samples": "LATENT", "vae": "VAE"}, ["IMAGE"]),
    "SaveImage": ({"images": "IMAGE", "filename_prefix": "W"}, []),
}


def _spec(entry):
    kind = entry[0]
    opts = entry[1] if len(entry) > 1 else {}
    return kind, opts


def test_node_definitions_are_well_formed():
    assert set(N.NODE_CLASS_MAPPINGS) == set(N.NODE_DISPLAY_NAME_MAPPINGS)
    for name, cls in N.NODE_CLASS_MAPPINGS.items():
        spec = cls.INPUT_TYPES()
        assert set(spec) <= {"required", "optional", "hidden"} and spec["required"], name
        params = inspect.signature(getattr(cls, cls.FUNCTION)).parameters
        var_kw = any(p.kind is p.VAR_KEYWORD for p in params.values())
        for section in ("required", "optional"):
            for inp, entry in spec.get(section, {}).items():
                assert isinstance(entry, tuple) and 1 <= len(entry) <= 2, (name, inp)
                kind, opts = _spec(entry)
                assert isinstance(opts, dict), (name, inp)
                if isinstance(kind, list):  # a combo: default must be one of its values
                    assert all(isinstance(v, str) for v in kind), (name, inp)
                    if "default" in opts:
                        assert opts["default"] in kind, (name, inp)
                else:
                    assert kind in OWN_TYPES | CORE_TYPES, (name, inp, kind)
                    if kind in ("INT", "FLOAT"):
                        assert opts["min"] <= opts["default"] <= opts["max"], (name, inp)
                assert inp in params or var_kw, f"{name}.{cls.FUNCTION} does not take {inp}"
                if section == "optional" and inp in params:
                    assert params[inp].default is not inspect.Parameter.empty, (name, inp)
        for p in params.values():  # every required parameter of the function is a required input
            if p.name != "self" and p.default is inspect.Parameter.empty and p.kind is not p.VAR_KEYWORD:
                assert p.name in spec["required"], (name, p.name)
        assert isinstance(cls.RETURN_TYPES, tuple) and all(t in OWN_TYPES | CORE_TYPES for t in cls.RETURN_TYPES)
        if hasattr(cls, "RETURN_NAMES"):
            assert len(cls.RETURN_NAMES) == len(cls.RETURN_TYPES), name
        assert cls.CATEGORY == "WithAnyone"


def test_release_sampling_shift_values():
    assert N.flux_shift(1024, 1024, "release") == pytest.approx(0.4675, abs=1e-12)  # 64 tokens on the release line
    assert N.flux_shift(1024, 1024, "flux") == pytest.approx(1.15, abs=1e-12)  # core ModelSamplingFlux at 1024²
    assert N.flux_shift(512, 512, "release") == pytest.approx(0.5 + 0.65 / 3840 * (16 - 256))
    with pytest.raises(ValueError, match="mode"):
        N.flux_shift(64, 64, "beta")


def test_image_round_trip_is_exact():
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, size=(2, 9, 7, 3), dtype=np.uint8)
    comfy_image = torch.from_numpy(arr.astype(np.float32) / 255.0)  # what core LoadImage gives
    back = N.image_batch_to_arrays(comfy_image)
    assert all(np.array_equal(a, b) for a, b in zip(back, arr, strict=True))


@pytest.fixture(scope="module")
def tiny_analyzer(tmp_path_factory):
    from tiny_models.insightface_pack import build_tiny_pack

    from withanyone.faces import FaceAnalyzer

    folder = tmp_path_factory.mktemp("pack")
    build_tiny_pack(folder, num_anchors=1)  # one detection per planted face
    return FaceAnalyzer("insightface", pack=str(folder), det_thresh=0.4)


def _photo(seed, x=96, y=96, size=32, second=None):
    """Noise with one tiny-pack face (a key square on one 32-px detector cell), optionally a second."""
    from tiny_models.insightface_pack import paint_key

    rng = np.random.default_rng(seed)
    img = rng.integers(60, 200, size=(320, 320, 3), dtype=np.uint8)
    img = paint_key(img, x, y, x + size, y + size)
    if second:
        img = paint_key(img, *second)
    return img


def test_person_matches_the_pipeline_reference(tiny_analyzer):
    from withanyone.pipeline.references import prepare_reference

    photo = _photo(0)
    node = N.WithAnyonePerson()
    out = node.build(torch.from_numpy(photo.astype(np.float32) / 255.0), tiny_analyzer)
    person, crop, report = out["result"]
    with pytest.warns(UserWarning, match="holds 2 faces"):  # one planted face straddles two detector cells
        ref = prepare_reference(photo, tiny_analyzer, need_crop=True)
    assert np.array_equal(person.arcface, ref.arcface)  # raw norm, bit for bit
    assert np.array_equal(person.crop, ref.crop) and person.crop.shape == (512, 512, 3)
    assert abs(np.linalg.norm(person.arcface) - 1.0) > 1e-3  # not renormalised (the tiny recognizer is not unit)
    assert crop.shape == (1, 512, 512, 3) and "ArcFace norm" in report and out["ui"]["text"] == [report]


def test_person_from_several_photos_and_warnings(tiny_analyzer):
    from withanyone.app.people import analyse_photo, merge_identity

    a, b = _photo(1), _photo(2, x=160, y=64)
    person = N.person_from_images([a, b], tiny_analyzer)
    want = merge_identity([analyse_photo(a, tiny_analyzer, "photo 1"), analyse_photo(b, tiny_analyzer, "photo 2")],
                          need_crop=True)
    assert np.array_equal(person.arcface, want.arcface) and np.array_equal(person.crop, want.crop)
    assert any("2 photos merged" in w for w in person.warnings)
    two_faces = _photo(3, second=(224, 224, 256, 256))
    p2 = N.person_from_images([two_faces], tiny_analyzer)
    assert any("faces found — using the highest-scoring" in w for w in p2.warnings)
    # a photo without a face becomes a warning while another photo carries the identity...
    blank = np.full((200, 200, 3), 128, np.uint8)
    p3 = N.person_from_images([blank, a], tiny_analyzer)
    assert any("no face found" in w for w in p3.warnings)
    # ...and is refused, naming the problem, when no photo has a face
    with pytest.raises(ValueError, match="no usable face in the photo: photo 1: no face found"):
        N.person_from_images([blank], tiny_analyzer)


def test_person_refuses_dlib(dlib_analyzer):
    with pytest.raises(ValueError, match="128-d embedding, i.e. dlib"):
        N.person_from_images([_photo(0)], dlib_analyzer)


def test_boxes_node_modes(tiny_analyzer):
    from tiny_models.insightface_pack import paint_key

    from withanyone.pipeline.layout import auto_boxes

    node = N.WithAnyoneBoxes()
    boxes, preview = node.build(3, 768, 512)
    assert boxes.boxes == auto_boxes(3, 512, 768) and boxes.method == "preset"
    assert preview.shape == (1, 512, 768, 3)
    typed, _ = node.build(2, 96, 64, boxes_text="0,0,40,32; 48 16 96 64")
    assert typed.boxes == [(0.0, 0.0, 40.0, 32.0), (48.0, 16.0, 96.0, 64.0)]
    bbox, _ = node.build(1, 96, 64, bbox=[{"x": 10, "y": 5, "width": 20, "height": 30}])
    assert bbox.boxes == [(10.0, 5.0, 30.0, 35.0)] and bbox.method == "bbox"
    with pytest.raises(ValueError, match="1 box\\(es\\) for 2 people"):
        node.build(2, 96, 64, boxes_text="0,0,40,32")
    with pytest.raises(ValueError, match="box 1 '0,0,40' has 3 numbers"):
        node.build(1, 96, 64, boxes_text="0,0,40")
    # a layout image: the faces give the boxes, rescaled to width × height, assigned by identity
    noise = np.random.default_rng(5).integers(60, 200, size=(320, 640, 3), dtype=np.uint8)
    layout = paint_key(paint_key(noise, 416, 96, 448, 128), 96, 96, 128, 128)
    lay = torch.from_numpy(layout.astype(np.float32) / 255.0)[None]
    by_pos, _ = node.build(2, 128, 64, layout_image=lay, face_analyzer=tiny_analyzer)
    assert by_pos.method == "layout (left-to-right)" and by_pos.boxes[0][0] < 64 < by_pos.boxes[1][0]
    faces = sorted(tiny_analyzer.detect(layout), key=lambda f: f.center[0])
    right, left = faces[-1], faces[0]  # person 1 is a right-hand face, person 2 a left-hand one
    by_id, _ = node.build(2, 128, 64, layout_image=lay, face_analyzer=tiny_analyzer,
                          person_1=Person(right.embedding * 3.0), person_2=Person(left.embedding * 3.0))
    assert by_id.method == "layout (identity)"
    scale = np.array([128 / 640, 64 / 320, 128 / 640, 64 / 320])
    np.testing.assert_allclose(by_id.boxes, [right.bbox * scale, left.bbox * scale], rtol=1e-6)
    with pytest.raises(ValueError, match="needs a face_analyzer"):
        node.build(2, 128, 64, layout_image=lay)


def test_loader_wraps_the_released_checkpoint(tmp_path):
    from withanyone.pipeline.tiny import tiny_adapter

    ad = tiny_adapter(3)
    path = ad.save_authors_checkpoint(tmp_path / "withanyone.safetensors")
    with pytest.raises(ValueError, match="pass num_double_blocks"):  # 4 blocks: which are double ones?
        N.load_adapter(path)
    module = N.load_adapter(path, num_double_blocks=2)
    assert isinstance(module, AdapterModule)  # no ComfyUI here: the module a ModelPatcher would hold
    got = module.adapter.state_dict()
    assert all(torch.equal(got[k], v) for k, v in ad.state_dict().items())
    assert module.adapter.config.num_single_blocks == 2
    half = N.load_adapter(path, "bf16", 2)
    assert half.adapter.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="weight_dtype must be one of"):
        N.load_adapter(path, "int4", 2)


def test_apply_node_patches_a_clone():
    from comfy_fakes import FakeModelPatcher

    from withanyone.pipeline.tiny import tiny_adapter, tiny_transformer

    base = FakeModelPatcher(tiny_transformer(0))
    people = [Person(np.ones(512, np.float32)), Person(np.full(512, 2.0, np.float32))]
    (m,) = N.ApplyWithAnyone().apply(base, AdapterModule(tiny_adapter(0)), FaceBoxes([(0, 0, 16, 16),
                                     (16, 16, 32, 32)], 64, 64), people[0], 0.7, 0.0, 0.0, 1.0, person_2=people[1])
    dit = m.model_options["transformer_options"]["patches_replace"]["dit"]
    assert sorted(dit) == [("double_block", 0), ("double_block", 1), ("single_block", 0), ("single_block", 1)]
    assert [p.index for _, p in sorted(dit.items())] == [0, 1, 2, 3]  # single blocks continue after the doubles
    (patch,) = m.diffusion_wrappers()
    assert patch.id_weight == 0.7 and len(patch.people) == 2 and math.isinf(patch.sigma_start)
    assert base.model_options == {"transformer_options": {}}


def _node_io(cls_name):
    if cls_name in N.NODE_CLASS_MAPPINGS:
        cls = N.NODE_CLASS_MAPPINGS[cls_name]
        spec = cls.INPUT_TYPES()
        inputs = {}
        for section in ("required", "optional"):
            for k, entry in spec.get(section, {}).items():
                kind = entry[0]
                is_widget = isinstance(kind, list) or kind in ("INT", "FLOAT", "STRING", "BOOLEAN")
                inputs[k] = ("W" if is_widget else kind) + ("?" if section == "optional" else "")
        return inputs, list(cls.RETURN_TYPES)
    assert cls_name in CORE_NODES, f"unknown node {cls_name}"
    return CORE_NODES[cls_name]


@pytest.mark.parametrize("n", [1, 2, 4])
def test_example_workflow_api_json(n):
    path = WORKFLOWS / f"withanyone_{n}_person{'s' if n > 1 else ''}_api.json"
    graph = json.loads(path.read_text())
    people = [k for k, v in graph.items() if v["class_type"] == "WithAnyonePerson"]
    assert len(people) == n
    shown = [v["inputs"]["source"] for v in graph.values() if v["class_type"] == "PreviewAny"]
    assert sorted(shown) == sorted([p, 2] for p in people)  # every person's report (warnings) shown in the UI
    for nid, node in graph.items():
        inputs, _ = _node_io(node["class_type"])
        for k, v in node["inputs"].items():
            assert k in inputs and inputs[k] != "UI", (path.name, nid, k)
            if isinstance(v, list):  # a link [source id, output index] of the right type
                src = graph[v[0]]
                outs = _node_io(src["class_type"])[1]
                assert v[1] < len(outs) and inputs[k].rstrip("?") in (outs[v[1]], "*"), (path.name, nid, k)
            else:
                assert inputs[k].rstrip("?") == "W", (path.name, nid, k)
        for k, t in inputs.items():  # every required input is given
            if not t.endswith("?") and t != "UI":
                assert k in node["inputs"], (path.name, nid, k)
    by_class = {v["class_type"]: v for v in graph.values()}
    assert by_class["UNETLoader"]["inputs"]["weight_dtype"] == "fp8_e4m3fn"
    assert {"DualCLIPLoader", "VAELoader", "LoraLoaderModelOnly", "ApplyWithAnyone"} <= set(by_class)
    apply = by_class["ApplyWithAnyone"]["inputs"]
    assert sum(k.startswith("person_") for k in apply) == n
    assert graph[apply["model"][0]]["class_type"] == "LoraLoaderModelOnly"  # identity on top of the LoRA
    boxes = by_class["WithAnyoneBoxes"]["inputs"]
    latent = by_class["EmptySD3LatentImage"]["inputs"]
    assert boxes["people"] == n and (boxes["width"], boxes["height"]) == (latent["width"], latent["height"])
    # the widgets' values are valid for our nodes (combos hold the value, numbers within range)
    for node in graph.values():
        if node["class_type"] in N.NODE_CLASS_MAPPINGS:
            spec = N.NODE_CLASS_MAPPINGS[node["class_type"]].INPUT_TYPES()
            for section in ("required", "optional"):
                for k, entry in spec.get(section, {}).items():
                    v = node["inputs"].get(k)
                    if v is None or isinstance(v, list) and not isinstance(entry[0], list):
                        continue
                    kind, opts = _spec(entry)
                    if isinstance(kind, list) and kind:
                        if k not in ("adapter_name", "pack", "siglip_folder"):  # file lists depend on the install
                            assert v in kind, (node["class_type"], k, v)
                    elif kind in ("INT", "FLOAT"):
                        assert opts["min"] <= v <= opts["max"], (node["class_type"], k, v)


@pytest.mark.parametrize("n", [1, 2, 4])
def test_example_workflow_ui_json_matches_the_api_one(n):
    stem = f"withanyone_{n}_person{'s' if n > 1 else ''}"
    ui = json.loads((WORKFLOWS / f"{stem}.json").read_text())
    api = json.loads((WORKFLOWS / f"{stem}_api.json").read_text())
    nodes = {str(nd["id"]): nd for nd in ui["nodes"]}
    assert {k: v["type"] for k, v in nodes.items()} == {k: v["class_type"] for k, v in api.items()}
    for link_id, src, src_slot, dst, dst_slot, typ in ui["links"]:
        out = nodes[str(src)]["outputs"][src_slot]
        inp = nodes[str(dst)]["inputs"][dst_slot]
        assert out["type"] == typ and inp["type"] in (typ, "*") and inp["link"] == link_id and link_id in out["links"]
        assert api[str(dst)]["inputs"][inp["name"]] == [str(src), src_slot]
    for nid, nd in nodes.items():
        inputs, _ = _node_io(nd["type"])
        widgets = [k for k, t in inputs.items() if t.rstrip("?") in ("W", "UI")]
        given = [k for k in widgets if k in api[nid]["inputs"] or inputs[k] == "UI"]
        assert len(nd["widgets_values"]) == len(given), (stem, nd["type"])
        values = [api[nid]["inputs"][k] for k in given if inputs[k] != "UI"]
        assert [v for k, v in zip(given, nd["widgets_values"], strict=True) if inputs[k] != "UI"] == values


def test_entry_folder_exports_the_mappings():
    import importlib.util

    spec = importlib.util.spec_from_file_location("withanyone_comfyui_entry", ROOT / "comfyui" / "__init__.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.NODE_CLASS_MAPPINGS is N.NODE_CLASS_MAPPINGS
    import tomllib

    meta = tomllib.loads((ROOT / "comfyui" / "pyproject.toml").read_text())
    assert {"PublisherId", "DisplayName", "Icon"} <= set(meta["tool"]["comfy"])
    assert meta["project"]["dependencies"] == ["withanyone[model]"]
    assert meta["project"]["name"] and meta["project"]["version"] and meta["project"]["description"]


def test_preview_draws_each_box():
    fb = FaceBoxes([(0, 0, 31, 31), (40, 8, 90, 60)], 96, 64)
    img = N.draw_boxes(fb)
    assert img.shape == (64, 96, 3)
    assert tuple(img[0, 10]) != (40, 40, 40) and tuple(img[32, 20]) == (40, 40, 40)  # outline drawn, inside not
    Image.fromarray(img)  # a valid RGB image


def test_person_siglip_features_are_the_pipelines(tiny_analyzer):
    from withanyone.pipeline.references import encode_siglip, prepare_reference
    from withanyone.pipeline.tiny import tiny_siglip

    model, processor = tiny_siglip()
    photo = _photo(7)
    person = N.person_from_images([photo], tiny_analyzer, siglip=N.SiglipEncoder(model, processor))
    with pytest.warns(UserWarning):
        ref = prepare_reference(photo, tiny_analyzer, need_crop=True)
    want = encode_siglip([ref.crop], model, processor)[0]
    assert person.siglip.shape == (256, 32) and torch.equal(person.siglip, want.float())


def test_face_analyzer_loader(tiny_analyzer, tmp_path):
    from tiny_models.insightface_pack import build_tiny_pack

    build_tiny_pack(tmp_path / "pack", num_anchors=1)
    (fa,) = N.WithAnyoneFaceAnalyzerLoader().load("insightface", str(tmp_path / "pack"), 0.4)
    assert (fa.backend_name, fa.embedding_dim) == ("insightface", 512)
    (dl,) = N.WithAnyoneFaceAnalyzerLoader().load("dlib")
    assert dl.embedding_dim == 128

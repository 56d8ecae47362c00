"""WithAnyonePipeline on tiny random-weight components: sizes, seeds, identity effect, references, SigLIP
laziness, LoRA and CPU offload with the adapter attached."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_models.pipeline import get_dummy_components, get_dummy_inputs, tiny_adapter, tiny_siglip

from withanyone.pipeline import Reference, WithAnyonePipeline
from withanyone.pipeline.references import ReferenceError

EMB = [np.random.RandomState(i).randn(512).astype(np.float32) * 20 for i in range(3)]


class _CountingLoader:
    """A SigLIP loader that records how often it was asked to load."""

    def __init__(self):
        self.calls = 0

    def __call__(self):
        self.calls += 1
        return tiny_siglip()


@pytest.fixture(scope="module")
def tiny_pack(tmp_path_factory):
    from tiny_models.insightface_pack import build_tiny_pack

    folder = tmp_path_factory.mktemp("pack")
    build_tiny_pack(folder)
    return folder


@pytest.fixture(scope="module")
def planted_photo(tmp_path_factory, samples_dir):
    """A real photo with a tiny-pack "face" (blue key square) painted over the face: a path and the array."""
    from tiny_models.insightface_pack import paint_key

    from withanyone.faces import load_image

    img = paint_key(load_image(samples_dir / "obama" / "1.jpg"), 100, 80, 196, 176)
    path = tmp_path_factory.mktemp("photos") / "planted.png"
    Image.fromarray(img).save(path)
    return path, img


def _run(p, **kw):
    inputs = get_dummy_inputs()
    inputs.update(kw)
    return p(**inputs)


def test_output_size_follows_height_and_width(pipe):
    out = _run(pipe, height=48, width=80, references=EMB[:2], output_type="pil")
    assert out.images[0].size == (80, 48)
    assert len(out.boxes) == 2 and out.arcface.shape == (2, 512)
    two = _run(pipe, num_images_per_prompt=2, references=EMB[:1])
    assert two.images.shape == (2, 64, 64, 3)


def test_same_seed_same_image_and_seed_is_reported(pipe):
    a = _run(pipe, generator=None, seed=7, references=EMB[:2])
    b = _run(pipe, generator=None, seed=7, references=EMB[:2])
    c = _run(pipe, generator=None, seed=8, references=EMB[:2])
    np.testing.assert_array_equal(a.images, b.images)
    assert np.abs(a.images - c.images).max() > 1e-2
    assert a.seed == 7
    drawn = _run(pipe, generator=None, references=EMB[:1])
    again = _run(pipe, generator=None, seed=drawn.seed, references=EMB[:1])
    np.testing.assert_array_equal(drawn.images, again.images)


def test_attached_adapter_without_identities_equals_plain_flux(pipe, plain):
    # FluxPipeline's own time shift (timestep_shift="flux"); the default release shift is tested in
    # test_pipeline_faithful.py
    assert pipe.adapter.attached
    ours = _run(pipe, timestep_shift="flux").images
    theirs = plain(**get_dummy_inputs()).images
    np.testing.assert_array_equal(ours, theirs)
    # identities at weight 0 on both branches skip the adapter entirely
    zero = _run(pipe, references=EMB[:2], id_weight=0.0, siglip_weight=0.0, timestep_shift="flux").images
    np.testing.assert_allclose(zero, theirs, atol=1e-6)


def test_identities_change_the_image_and_follow_the_people(pipe, plain):
    base = plain(**get_dummy_inputs()).images
    strong = _run(pipe, references=EMB[:2], id_weight=5.0).images
    assert np.abs(strong - base).max() > 1e-2
    other = _run(pipe, references=[EMB[2], EMB[1]], id_weight=5.0).images
    assert np.abs(strong - other).max() > 1e-3  # a different person 1 gives a different image
    # the residual lands in the face boxes: pixels far from both boxes change much less
    boxes = [(0, 0, 32, 32), (32, 32, 64, 64)]
    one = _run(pipe, references=EMB[:2], boxes=boxes, id_weight=5.0, num_inference_steps=1).images[0]
    ref = plain(**get_dummy_inputs(num_inference_steps=1)).images[0]
    diff = np.abs(one - ref).mean(axis=2)
    assert diff[:32, :32].mean() > diff[:32, 32:].mean() and diff[32:, 32:].mean() > diff[32:, :32].mean()


def test_references_as_paths_images_arrays_and_embeddings_agree(pipe, tiny_pack, planted_photo):
    from withanyone.faces import FaceAnalyzer

    path, arr = planted_photo
    analyzer = FaceAnalyzer("insightface", pack=str(tiny_pack))
    pipe.set_face_analyzer(analyzer)
    face = analyzer.detect(arr)[0]
    raw = face.embedding * face.extra["embedding_norm"]  # insightface's unnormalised vector, as the release uses
    outs = {
        "path": _run(pipe, references=[path], id_weight=3.0),
        "str": _run(pipe, references=[str(path)], id_weight=3.0),
        "pil": _run(pipe, references=[Image.open(path)], id_weight=3.0),
        "array": _run(pipe, references=[arr], id_weight=3.0),
        "embedding": _run(pipe, references=[raw], id_weight=3.0),
        "tensor": _run(pipe, references=[torch.from_numpy(raw)], id_weight=3.0),
        "face": _run(pipe, references=[face], id_weight=3.0),
    }
    for name, out in outs.items():
        np.testing.assert_array_equal(out.images, outs["embedding"].images, err_msg=name)
        np.testing.assert_allclose(out.arcface[0].numpy(), raw, rtol=1e-6, err_msg=name)
    assert outs["path"].references == [str(path)]
    # the scale matters to the adapter: the unit-norm vector gives another image
    unit = _run(pipe, references=[face.embedding], id_weight=3.0)
    assert abs(face.extra["embedding_norm"] - 1.0) > 1e-3
    assert not np.array_equal(unit.images, outs["embedding"].images)
    # a photo without any face is refused, naming it
    blank = np.full((96, 96, 3), 128, np.uint8)
    with pytest.raises(Exception, match="no face found"):
        _run(pipe, references=[blank])


def test_dlib_analyzer_is_refused_by_the_pipeline(pipe, dlib_analyzer, samples_dir):
    pipe.set_face_analyzer(dlib_analyzer)
    try:
        with pytest.raises(ReferenceError, match="128-d.*dlib.*antelopev2"):
            _run(pipe, references=[samples_dir / "obama" / "1.jpg"])
        with pytest.raises(ReferenceError, match="128-d"):
            _run(pipe, references=[np.ones(128, np.float32)])
    finally:
        pipe.set_face_analyzer(None)


def test_siglip_is_loaded_only_when_its_weight_is_positive(tiny_pack, planted_photo):
    from withanyone.faces import FaceAnalyzer

    p = WithAnyonePipeline(**get_dummy_components(), adapter=tiny_adapter())
    p.set_progress_bar_config(disable=True)
    loader = _CountingLoader()
    p.set_siglip(loader)
    p.set_face_analyzer(FaceAnalyzer("insightface", pack=str(tiny_pack)))
    path, _ = planted_photo
    arc_only = _run(p, references=[path], id_weight=1.0, siglip_weight=0.0)
    assert loader.calls == 0 and not p.siglip_loaded and arc_only.siglip is None
    with_sig = _run(p, references=[path], id_weight=1.0, siglip_weight=5.0)
    assert loader.calls == 1 and p.siglip_loaded
    assert with_sig.siglip.shape == (1, 256, 32)
    assert np.abs(with_sig.images - arc_only.images).max() > 1e-2
    _run(p, references=[path], siglip_weight=1.0)
    assert loader.calls == 1  # loaded once, then kept
    # SigLIP needs the face photo: a bare embedding is refused up front
    with pytest.raises(ReferenceError, match="SigLIP branch needs the face photo"):
        _run(p, references=[EMB[0]], siglip_weight=1.0)
    ready = Reference(EMB[0], np.zeros((512, 512, 3), np.uint8))
    assert _run(p, references=[ready], siglip_weight=1.0).siglip.shape == (1, 256, 32)


def test_box_modes_in_the_pipeline(pipe, tiny_pack, tmp_path):
    from tiny_models.insightface_pack import paint_key

    from withanyone.faces import FaceAnalyzer
    from withanyone.pipeline.layout import auto_boxes

    auto = _run(pipe, references=EMB[:3], height=64, width=96)
    assert auto.boxes == auto_boxes(3, 64, 96)
    explicit = _run(pipe, references=EMB[:2], boxes=[(0, 0, 20, 20), (30, 30, 64, 64)])
    assert explicit.boxes == [(0.0, 0.0, 20.0, 20.0), (30.0, 30.0, 64.0, 64.0)]
    # layout photo: two planted faces (one detector cell each) in a 640×320 photo → boxes rescaled to the
    # 64×128 output, the left face first
    layout = paint_key(paint_key(np.full((320, 640, 3), 90, np.uint8), 416, 96, 448, 128), 96, 96, 128, 128)
    Image.fromarray(layout).save(tmp_path / "layout.png")
    analyzer = FaceAnalyzer("insightface", pack=str(tiny_pack))
    pipe.set_face_analyzer(analyzer)
    out = _run(pipe, references=EMB[:2], boxes=tmp_path / "layout.png", height=64, width=128)
    detected = sorted(analyzer.detect(layout, embed=False), key=lambda f: f.center[0])
    assert len(detected) == 2 and detected[0].center[0] < 320 < detected[1].center[0]
    scale = np.array([128 / 640, 64 / 320, 128 / 640, 64 / 320])
    for got, face in zip(out.boxes, detected, strict=True):
        np.testing.assert_allclose(got, face.bbox * scale, rtol=1e-5)


def test_inputs_are_validated_up_front(pipe):
    cases = [
        (dict(height=50), "`height` must be a positive multiple of 16"),
        (dict(width=40), "`width` must be a positive multiple of 16"),
        (dict(references=EMB[:2], id_weight=float("nan")), "`id_weight` must be a finite"),
        (dict(references=EMB[:2], siglip_weight=-1.0), "`siglip_weight`"),
        (dict(references=[]), "`references` is empty"),
        (dict(references="face.jpg"), "`references` must be a list"),
        (dict(references=EMB[:2], boxes=[(0, 0, 10, 10)]), r"holds 1 box\(es\) but there are 2"),
        (dict(references=EMB[:1], boxes=[(10, 10, 5, 20)]), "x2 > x1"),
        (dict(boxes=[(0, 0, 10, 10)]), "`boxes` was given without `references`"),
        (dict(num_images_per_prompt=0), "num_images_per_prompt"),
        (dict(seed=3), "either `generator` or `seed`"),
    ]
    for kw, msg in cases:
        with pytest.raises(ValueError, match=msg):
            _run(pipe, **kw)
    bare = WithAnyonePipeline(**get_dummy_components())
    with pytest.raises(ValueError, match="no adapter"):
        _run(bare, references=EMB[:1])


def test_lora_loads_with_the_adapter_attached(tmp_path):
    from peft import LoraConfig, get_peft_model_state_dict

    donor = get_dummy_components(seed=0)["transformer"]
    torch.manual_seed(1)
    donor.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                 init_lora_weights=False))
    WithAnyonePipeline.save_lora_weights(tmp_path, transformer_lora_layers=get_peft_model_state_dict(donor))

    p = WithAnyonePipeline(**get_dummy_components(), adapter=tiny_adapter())
    p.set_progress_bar_config(disable=True)
    before = _run(p, references=EMB[:2], id_weight=5.0).images
    before_plain = _run(p).images
    p.load_lora_weights(tmp_path, adapter_name="style")
    with_lora = _run(p, references=EMB[:2], id_weight=5.0).images
    lora_plain = _run(p).images
    assert p.adapter.attached
    assert np.abs(with_lora - before).max() > 1e-3  # the LoRA acts
    assert np.abs(with_lora - lora_plain).max() > 1e-2  # identities still act on top of it
    # the LoRA'd transformer without identities equals the same LoRA'd transformer with the adapter detached
    p.adapter.detach()
    np.testing.assert_array_equal(_run(p).images, lora_plain)
    p.adapter.attach(p.transformer)
    p.unload_lora_weights()
    np.testing.assert_array_equal(_run(p, references=EMB[:2], id_weight=5.0).images, before)
    np.testing.assert_array_equal(_run(p).images, before_plain)


def test_model_cpu_offload_keeps_the_adapter_working():
    p = WithAnyonePipeline(**get_dummy_components(), adapter=tiny_adapter())
    p.set_progress_bar_config(disable=True)
    expected = _run(p, references=EMB[:2], id_weight=5.0).images
    p.enable_model_cpu_offload(device="cpu")  # no accelerator here: the hooks still run and move models
    assert p._is_offloading()
    got = _run(p, references=EMB[:2], id_weight=5.0).images
    np.testing.assert_array_equal(got, expected)
    assert next(p.adapter.parameters()).device.type == "cpu"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_model_cpu_offload_on_gpu_matches_full_gpu():
    p = WithAnyonePipeline(**get_dummy_components(), adapter=tiny_adapter())
    p.set_progress_bar_config(disable=True)
    p.to("cuda")
    expected = _run(p, references=EMB[:2], id_weight=5.0).images
    p.to("cpu")
    p.enable_model_cpu_offload()
    got = _run(p, references=EMB[:2], id_weight=5.0).images
    np.testing.assert_allclose(got, expected, atol=1e-4)
    assert next(p.adapter.parameters()).device.type == "cpu"

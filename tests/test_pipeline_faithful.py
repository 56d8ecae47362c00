"""Faithfulness to the authors' released inference: the time-shifted sigmas, the starting noise, which face
of a reference photo is used and how it is cropped, the detection threshold, and background matting."""

from __future__ import annotations

import functools
import math
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_models.pipeline import get_dummy_components, get_dummy_inputs, tiny_adapter, tiny_pipeline, tiny_siglip

from withanyone.pipeline import WithAnyonePipeline
from withanyone.pipeline.references import prepare_reference

SIZES = [(1024, 1024), (768, 768), (768, 512)]  # (height, width): 1024², 768², 512×768
STEPS = [25, 28]
EMB = [np.random.RandomState(i).randn(512).astype(np.float32) * 20 for i in range(2)]


class _Stop(Exception):
    pass


def _scheduler_sigmas(pipe, **kwargs) -> torch.Tensor:
    """The sigmas the pipeline's scheduler is set to, stopping the call right there (no denoising)."""
    sched = pipe.scheduler
    original = sched.set_timesteps
    seen = {}

    @functools.wraps(original)  # keeps the signature FluxPipeline inspects for `sigmas`
    def spy(*a, **kw):
        original(*a, **kw)
        seen["sigmas"] = sched.sigmas.clone()
        raise _Stop

    sched.set_timesteps = spy
    try:
        with pytest.raises(_Stop):
            pipe(**{**get_dummy_inputs(), **kwargs})
    finally:
        del sched.set_timesteps
    return seen["sigmas"]


def _release_formula(height: int, width: int, steps: int) -> torch.Tensor:
    """The release's get_schedule, written out: μ on the line (256, 0.5)–(4096, 1.15) at
    (width // 8) * (height // 8) // (16 * 16) tokens, t ↦ e^μ / (e^μ + (1/t − 1)) over linspace(1, 0, N + 1)."""
    tokens = (width // 8) * (height // 8) // (16 * 16)
    slope = (1.15 - 0.5) / (4096 - 256)
    mu = slope * tokens + (0.5 - slope * 256)
    t = torch.linspace(1, 0, steps + 1)
    return math.exp(mu) / (math.exp(mu) + (1 / t - 1) ** 1.0)


def test_default_sigmas_are_the_releases(pipe):
    assert abs(_release_formula(1024, 1024, 1)[0] - 1.0) < 1e-7
    gaps = {}
    for (h, w) in SIZES:
        for n in STEPS:
            ours = _scheduler_sigmas(pipe, height=h, width=w, num_inference_steps=n)
            expected = _release_formula(h, w, n)
            assert ours.shape == (n + 1,)
            torch.testing.assert_close(ours, expected, atol=1e-6, rtol=0, msg=f"{h}x{w}, {n} steps")
            flux = _scheduler_sigmas(pipe, height=h, width=w, num_inference_steps=n, timestep_shift="flux")
            gaps[h, w, n] = float((flux - ours).abs().max())
    # the release's shift is much weaker at large sizes (μ 0.4675 against 1.15 at 1024²)
    assert gaps[1024, 1024, 25] > 0.15 and gaps[768, 768, 25] > 0.08 and gaps[768, 512, 28] > 0.03
    # with references the same sigmas are used
    ours = _scheduler_sigmas(pipe, height=768, width=512, num_inference_steps=25, references=EMB[:1])
    torch.testing.assert_close(ours, _release_formula(768, 512, 25), atol=1e-6, rtol=0)


def test_flux_shift_equals_diffusers_flux_pipeline(pipe, plain):
    for (h, w) in SIZES:
        for n in STEPS:
            ours = _scheduler_sigmas(pipe, height=h, width=w, num_inference_steps=n, timestep_shift="flux")
            theirs = _scheduler_sigmas(plain, height=h, width=w, num_inference_steps=n)
            torch.testing.assert_close(ours, theirs, atol=0, rtol=0)


def test_release_shift_runs_flux_pipelines_own_loop(pipe, plain):
    """The default output is FluxPipeline's, given the pre-shifted sigmas: nothing of its loop is forked."""
    from withanyone.pipeline.sampling import pipeline_sigmas

    ours = pipe(**get_dummy_inputs()).images
    sig = pipeline_sigmas("release", 64, 64, 2, plain.scheduler)
    theirs = plain(**get_dummy_inputs(), sigmas=sig).images
    np.testing.assert_array_equal(ours, theirs)
    # custom sigmas get the release's shift as well
    custom = [1.0, 0.6, 0.3]
    got = _scheduler_sigmas(pipe, height=1024, width=1024, num_inference_steps=3, sigmas=custom)
    mu = (1.15 - 0.5) / (4096 - 256) * (64 - 256) + 0.5
    want = [math.exp(mu) / (math.exp(mu) + 1 / s - 1) for s in custom] + [0.0]
    torch.testing.assert_close(got, torch.tensor(want), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="timestep_shift"):
        pipe(**get_dummy_inputs(), timestep_shift="sd3")


def test_release_shift_on_other_flow_schedulers():
    """A fixed shift (FLUX-schnell style) also multiplies the odds, so the release's sigmas are reached too;
    a scheduler that reshapes sigmas otherwise is refused with a clear message."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from withanyone.pipeline.sampling import pipeline_sigmas

    for shift in (1.0, 3.0):
        sched = FlowMatchEulerDiscreteScheduler(shift=shift, use_dynamic_shifting=False)
        sched.set_timesteps(sigmas=pipeline_sigmas("release", 1024, 1024, 25, sched), mu=1.15)
        torch.testing.assert_close(sched.sigmas, _release_formula(1024, 1024, 25), atol=1e-6, rtol=0)
    karras = FlowMatchEulerDiscreteScheduler(use_karras_sigmas=True)
    with pytest.raises(ValueError, match="use_karras_sigmas is set.*timestep_shift='flux'"):
        pipeline_sigmas("release", 1024, 1024, 25, karras)
    assert pipeline_sigmas("flux", 1024, 1024, 25, karras) is None


def _pack(x: torch.Tensor) -> torch.Tensor:
    """2×2 patches to tokens, (c, ph, pw) order, token by token."""
    b, c, h, w = x.shape
    rows = [x[:, :, i:i + 2, j:j + 2].reshape(b, c * 4) for i in range(0, h, 2) for j in range(0, w, 2)]
    return torch.stack(rows, dim=1)


def test_release_noise_is_drawn_on_the_execution_device_in_model_dtype(pipe, monkeypatch):
    from withanyone.pipeline import pipeline as pipeline_module
    from withanyone.pipeline.sampling import release_latents

    # the function: torch.randn on the generator's device in the given dtype, then packed
    got = release_latents(2, 16, 64, 48, torch.Generator("cpu").manual_seed(5), "cpu", torch.bfloat16)
    raw = torch.randn(2, 16, 8, 6, generator=torch.Generator("cpu").manual_seed(5), dtype=torch.bfloat16)
    assert got.dtype == torch.bfloat16 and got.shape == (2, 12, 64)
    torch.testing.assert_close(got, _pack(raw), atol=0, rtol=0)
    # the pipeline: a seed becomes a generator on the execution device, the dtype is the transformer's
    seen = {}
    real = pipeline_module.release_latents

    def spy(batch, channels, height, width, generator, device, dtype):
        seen.update(device=generator.device, target=device, dtype=dtype, seed=generator.initial_seed())
        return real(batch, channels, height, width, generator, device, dtype)

    monkeypatch.setattr(pipeline_module, "release_latents", spy)
    inputs = get_dummy_inputs(generator=None)
    release = pipe(**inputs, seed=3).images
    assert seen == {"device": torch.device(pipe._execution_device), "target": pipe._execution_device,
                    "dtype": pipe.transformer.dtype, "seed": 3}
    seen.clear()
    # on a CPU in float32 the release's draw and FluxPipeline's CPU-generator draw are the same noise
    cpu = pipe(**inputs, seed=3, noise="cpu").images
    assert not seen
    np.testing.assert_array_equal(release, cpu)
    other = pipe(**inputs, seed=4).images
    assert np.abs(other - release).max() > 1e-3


@pytest.mark.gpu
def test_release_noise_on_cuda_matches_the_release_draw():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    p = WithAnyonePipeline(**get_dummy_components(), adapter=tiny_adapter()).to("cuda", torch.bfloat16)
    p.set_progress_bar_config(disable=True)
    seen = {}
    original = p.prepare_latents

    def spy(*a, **kw):
        out = original(*a, **kw)
        seen.setdefault("latents", out[0].clone())
        return out

    p.prepare_latents = spy
    p(**get_dummy_inputs(generator=None, output_type="latent"), seed=1234)
    # the release: get_noise(1, H, W, device, bf16, seed), then prepare's rearrange into tokens
    raw = torch.randn(1, 16, 8, 8, device="cuda", dtype=torch.bfloat16,
                      generator=torch.Generator(device="cuda").manual_seed(1234))
    torch.testing.assert_close(seen.pop("latents"), _pack(raw), atol=0, rtol=0)
    p(**get_dummy_inputs(generator=None, output_type="latent"), seed=1234, noise="cpu")
    assert (seen["latents"].float() - _pack(raw).float()).abs().max() > 0.1  # a CPU generator: another stream


# ---------------------------------------------------------------- reference faces on real group photos
def test_highest_score_face_by_default_largest_on_request(dlib_analyzer, shared_faces):
    for name in ("3.jpg", "4.jpg"):
        path = shared_faces / "group" / name
        faces = dlib_analyzer.detect(path)
        best = max(faces, key=lambda f: f.score)
        largest = max(faces, key=lambda f: f.area)
        assert best is not largest  # on these photos a smaller face scores higher
        with pytest.warns(UserWarning, match=rf"holds {len(faces)} faces.*reference_face='largest'"):
            ref = prepare_reference(path, dlib_analyzer, dim=128)
        np.testing.assert_array_equal(ref.bbox, best.bbox)
        with pytest.warns(UserWarning, match=rf"holds {len(faces)} faces"):
            big = prepare_reference(path, dlib_analyzer, dim=128, reference_face="largest")
        np.testing.assert_array_equal(big.bbox, largest.bbox)
        assert float(np.dot(ref.arcface, big.arcface)) < 0.99  # two different people's vectors
    one = shared_faces / "obama" / "1.jpg"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a single-face photo gives no warning
        prepare_reference(one, dlib_analyzer, dim=128)


def test_pipeline_uses_the_highest_score_face(dlib_analyzer, samples_dir):
    pipe = tiny_pipeline(face_analyzer=dlib_analyzer)
    path = samples_dir / "group" / "3.jpg"
    faces = dlib_analyzer.detect(path)
    with pytest.warns(UserWarning):
        (ref,) = pipe.prepare_identities([path], need_crop=False)
    np.testing.assert_array_equal(ref.bbox, max(faces, key=lambda f: f.score).bbox)
    with pytest.warns(UserWarning):
        (big,) = pipe.prepare_identities([path], need_crop=False, reference_face="largest")
    np.testing.assert_array_equal(big.bbox, max(faces, key=lambda f: f.area).bbox)


def test_border_face_is_squared_before_clipping(dlib_analyzer, samples_dir):
    from withanyone.faces import load_image
    from withanyone.pipeline.references import square_crop

    # the left face of group/1.jpg, cut by the photo's left border (columns 250:650 of the 1126-px original)
    full = load_image(samples_dir / "group" / "1.jpg")
    w = full.shape[1]
    image = np.ascontiguousarray(full[:, w * 250 // 1126:w * 650 // 1126])
    (face,) = dlib_analyzer.detect(image)
    raw = face.extra["raw_bbox"]
    assert raw[0] < 0 and face.bbox[0] == 0  # the detector's box reaches past the border; bbox is clipped
    ref = prepare_reference(image, dlib_analyzer, need_crop=True, dim=128)
    # the release: int() the raw box, grow the shorter side to a square, then clip, crop, Lanczos to 512
    x1, y1, x2, y2 = (int(v) for v in raw)
    w, h = x2 - x1, y2 - y1
    if w > h:
        y1, y2 = y1 - (w - h) // 2, y2 + (w - h) - (w - h) // 2
    else:
        x1, x2 = x1 - (h - w) // 2, x2 + (h - w) - (h - w) // 2
    H, W = image.shape[:2]
    box = (max(0, x1), max(0, y1), min(W, x2), min(H, y2))
    expected = np.asarray(Image.fromarray(image).crop(box).resize((512, 512), Image.LANCZOS))
    np.testing.assert_array_equal(ref.crop, expected)
    clip_first = square_crop(image, face.bbox)  # the previous behaviour: clip, then square
    assert np.abs(clip_first.astype(int) - expected.astype(int)).mean() > 5


def test_default_insightface_analyzer_detects_at_the_releases_threshold(tmp_path):
    from tiny_models.insightface_pack import build_tiny_pack

    build_tiny_pack(tmp_path / "pack")
    pipe = WithAnyonePipeline(**get_dummy_components(), adapter=tiny_adapter())
    pipe.set_face_analyzer(str(tmp_path / "pack"))
    assert pipe.face_analyzer().backend.detector.det_thresh == 0.4


# ---------------------------------------------------------------- matting
def _tiny_segformer(bias: float | None = None):
    from transformers import SegformerConfig, SegformerForSemanticSegmentation

    torch.manual_seed(0)
    model = SegformerForSemanticSegmentation(SegformerConfig(
        num_channels=3, num_encoder_blocks=1, depths=[1], sr_ratios=[4], hidden_sizes=[8], patch_sizes=[7],
        strides=[8], num_attention_heads=[1], mlp_ratios=[1], decoder_hidden_size=8, num_labels=1)).eval()
    if bias is not None:
        with torch.no_grad():
            model.decode_head.classifier.weight.zero_()
            model.decode_head.classifier.bias.fill_(bias)
    return model


def test_matting_pastes_the_crop_on_black_through_the_mask(tmp_path):
    from withanyone.pipeline.matting import foreground_mask, load_matting, matte_crop

    crop = np.random.RandomState(0).randint(0, 256, (512, 512, 3), dtype=np.uint8)
    np.testing.assert_array_equal(matte_crop(crop, _tiny_segformer(bias=20.0)), crop)  # all foreground
    assert not matte_crop(crop, _tiny_segformer(bias=-20.0)).any()  # all background → black
    model = _tiny_segformer()
    model.save_pretrained(tmp_path / "seg")
    loaded = load_matting(tmp_path / "seg")  # from safetensors, no remote code
    assert type(loaded).__name__ == "SegformerForSemanticSegmentation"
    mask = foreground_mask(crop, loaded)
    out = matte_crop(crop, loaded)
    assert mask.shape == (512, 512) and 0 < mask.mean() < 255
    assert (out <= crop).all() and not out[mask == 0].any()
    np.testing.assert_array_equal(out[mask == 255], crop[mask == 255])


def test_use_matting_changes_the_siglip_features_and_loads_only_when_asked(tmp_path, samples_dir):
    from tiny_models.insightface_pack import build_tiny_pack, paint_key

    from withanyone.faces import load_image

    build_tiny_pack(tmp_path / "pack")
    photo = paint_key(load_image(samples_dir / "obama" / "1.jpg"), 100, 80, 196, 176)
    _tiny_segformer().save_pretrained(tmp_path / "seg")
    pipe = WithAnyonePipeline(**get_dummy_components(), adapter=tiny_adapter())
    pipe.set_progress_bar_config(disable=True)
    pipe.set_face_analyzer(str(tmp_path / "pack"))
    pipe.set_siglip(lambda: tiny_siglip())
    pipe.set_matting(tmp_path / "seg")
    run = dict(get_dummy_inputs(num_inference_steps=1), references=[photo], siglip_weight=1.0)
    plain = pipe(**run)
    assert not pipe.matting_loaded
    pipe(**{**run, "siglip_weight": 0.0}, use_matting=True)
    assert not pipe.matting_loaded  # matting only prepares SigLIP crops
    matted = pipe(**run, use_matting=True)
    assert pipe.matting_loaded
    assert (matted.siglip - plain.siglip).abs().max() > 1e-3
    np.testing.assert_array_equal(matted.arcface.numpy(), plain.arcface.numpy())  # ArcFace sees the photo


# ---------------------------------------------------------------- CLI
def test_generate_cli_takes_the_faithfulness_options(tmp_path):
    import json

    from diffusers import FluxPipeline
    from typer.testing import CliRunner

    from withanyone.cli import app

    FluxPipeline(**get_dummy_components()).save_pretrained(tmp_path / "flux")
    tiny_adapter().save_pretrained(tmp_path / "adapter")
    np.save(tmp_path / "p0.npy", EMB[0])
    args = ["generate", "--prompt", "a photo of the person", "--ref", str(tmp_path / "p0.npy"), "--box", "8,8,40,40",
            "--seed", "2", "--height", "64", "--width", "64", "--steps", "2", "--base", str(tmp_path / "flux"),
            "--adapter", str(tmp_path / "adapter"), "--dtype", "float32", "--device", "cpu", "--no-progress"]
    runner = CliRunner()
    bad = runner.invoke(app, args + ["--noise", "gpu", "--out", str(tmp_path / "bad.png")])
    assert bad.exit_code != 0 and "--noise 'gpu': choose release or cpu" in " ".join(bad.output.replace("│", " ").split())
    res = runner.invoke(app, args + ["--timestep-shift", "flux", "--noise", "cpu", "--reference-face", "largest",
                                     "--out", str(tmp_path / "flux.png")])
    assert res.exit_code == 0, res.output + repr(res.exception)
    side = json.loads((tmp_path / "flux.json").read_text())
    assert (side["timestep_shift"], side["noise"], side["reference_face"], side["matting"]) == \
        ("flux", "cpu", "largest", False)
    res = runner.invoke(app, args + ["--out", str(tmp_path / "release.png")])
    assert res.exit_code == 0, res.output + repr(res.exception)
    side = json.loads((tmp_path / "release.json").read_text())
    assert (side["timestep_shift"], side["noise"], side["reference_face"]) == ("release", "release", "score")
    pipe = WithAnyonePipeline(**get_dummy_components(), adapter=tiny_adapter())
    pipe.set_progress_bar_config(disable=True)
    for name, kw in (("flux", dict(timestep_shift="flux", noise="cpu")), ("release", {})):
        api = pipe("a photo of the person", references=[EMB[0]], boxes=[(8, 8, 40, 40)], seed=2, height=64, width=64,
                   num_inference_steps=2, **kw).images[0]
        got = np.asarray(Image.open(tmp_path / f"{name}.png")).astype(int)
        assert np.abs(got - np.asarray(api).astype(int)).max() <= 1, name

"""WithAnyoneKontextPipeline on tiny random components: the edit path on real group photos, where the identity
residual lands (target tokens only, each box only its own person), the release's sigmas and seeds, K mode, loading.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from withanyone.pipeline.edit import EditError

STEPS = 2
FAST = {"num_inference_steps": STEPS, "max_sequence_length": 16}


@pytest.fixture(scope="module")
def kpipe(dlib_analyzer):
    from withanyone.pipeline.tiny import tiny_kontext_pipeline

    p = tiny_kontext_pipeline(face_analyzer=dlib_analyzer)
    p.set_progress_bar_config(disable=True)
    return p


def _vectors(n, seed=0, dim=128):
    g = np.random.default_rng(seed)
    v = g.standard_normal((n, dim)).astype(np.float32)
    return list(v / np.linalg.norm(v, axis=1, keepdims=True))


@pytest.mark.parametrize("name,canvas", [("1.jpg", "photo"), ("2.jpg", "square"), ("3.jpg", "square"),
                                         ("4.jpg", "photo")])
def test_edit_runs_end_to_end_on_group_photos(kpipe, shared_faces, name, canvas):
    photo = shared_faces / "group" / name
    faces = kpipe.face_analyzer().detect(str(photo), embed=False)
    refs = [str(shared_faces / "biden" / "1.jpg")] + _vectors(len(faces) - 1, seed=1)  # one real reference photo
    out = kpipe("a photo", image=str(photo), references=refs, canvas=canvas, size=96, seed=0, **FAST)
    plan = out.edit
    assert out.images[0].size == plan.size == plan.condition.size
    w, h = plan.size
    assert w % 16 == 0 and h % 16 == 0 and (w == h) == (canvas == "square")
    assert plan.replaced == list(range(len(faces))) and len(out.boxes) == len(faces)
    assert [tuple(float(v) for v in b) for b in plan.boxes] == list(out.boxes)
    assert out.references[0].endswith("biden/1.jpg") and out.seed == 0
    assert np.isfinite(np.asarray(out.images[0], dtype=np.float32)).all()
    if name == "3.jpg":  # the generate sidecar takes the edit's plan as an extra key (base photo hash, boxes used)
        import json

        from withanyone.pipeline.edit import photo_sha256
        from withanyone.pipeline.sidecar import build_sidecar

        side = build_sidecar(kpipe, out, prompt="a photo", references=refs[:1], box_mode="faces", layout=None,
                             id_weight=1.0, siglip_weight=0.0, height=h, width=w, steps=STEPS, guidance=4.0, lora=[],
                             lora_scale=1.0, dtype="float32", device="cpu", offload=False, output="x.png",
                             edit=plan.to_dict())
        back = json.loads(json.dumps(side, default=str))
        assert back["edit"]["photo_sha256"] == photo_sha256(photo) and back["edit"]["boxes"] == plan.boxes
        assert back["boxes"] == [list(b) for b in out.boxes]


def test_kontext_resolutions_are_diffusers():
    from diffusers.pipelines.flux.pipeline_flux_kontext import PREFERRED_KONTEXT_RESOLUTIONS

    from withanyone.pipeline.edit import KONTEXT_RESOLUTIONS

    assert list(KONTEXT_RESOLUTIONS) == list(PREFERRED_KONTEXT_RESOLUTIONS)


def test_one_face_photo_works(kpipe, shared_faces):
    out = kpipe("", image=str(shared_faces / "biden" / "2.jpg"), references=_vectors(1), size=64, seed=1, **FAST)
    assert out.images[0].size == (64, 64) and out.edit.replaced == [0] and len(out.boxes) == 1


def test_unsquarable_photo_is_one_line_error(kpipe, shared_faces):
    with pytest.raises(EditError) as err:
        kpipe("", image=str(shared_faces / "group" / "4.jpg"), references=_vectors(6), size=64, **FAST)
    assert "no square crop holds them all" in str(err.value) and "\n" not in str(err.value)


def _block0_outputs(pipe, inputs=None, **call):
    """The first double block's image-stream output (after the adapter's residual) at the first step; the
    transformer's first-step inputs go into ``inputs`` when given."""
    seen = []

    def hook(module, args, kwargs, output):
        if not seen:
            seen.append(output[1].detach().clone())

    def pre(module, args, kwargs):
        if inputs is not None and not inputs:
            inputs.update({k: v.detach().clone() for k, v in kwargs.items() if isinstance(v, torch.Tensor)})

    handles = [pipe.transformer.transformer_blocks[0].register_forward_hook(hook, with_kwargs=True),
               pipe.transformer.register_forward_pre_hook(pre, with_kwargs=True)]
    try:
        out = pipe(**call)
    finally:
        for handle in handles:
            handle.remove()
    return seen[0], out


def test_condition_tokens_get_zero_residual_and_boxes_only_their_person(kpipe, shared_faces):
    from withanyone.model.masks import box_coverage

    photo = str(shared_faces / "group" / "3.jpg")
    call = dict(prompt="a photo", image=photo, size=128, seed=3, output_type="latent", **FAST)
    a, b = _vectors(2, seed=5)
    inputs = {}
    with_ids, out = _block0_outputs(kpipe, inputs, references=[a, b], **call)
    bare, _ = _block0_outputs(kpipe, references=[a, b], id_weight=0.0, **call)
    other, _ = _block0_outputs(kpipe, references=[a, _vectors(1, seed=9)[0]], **call)
    w, h = out.edit.size
    target = (h // 16) * (w // 16)
    assert with_ids.shape[1] == 2 * target  # [target tokens, condition tokens]
    ids = inputs["img_ids"]  # position ids: first coordinate 0 for the target, 1 for the condition
    assert torch.all(ids[:target, 0] == 0) and torch.all(ids[target:, 0] == 1)
    assert torch.equal(ids[:target, 1:], ids[target:, 1:])
    # the condition tokens are the VAE posterior mode of the blurred canvas, shifted, scaled and packed 2×2
    vae = kpipe.vae
    pixels = kpipe.image_processor.preprocess(out.edit.condition, h, w).to(vae.dtype)
    lat = (vae.encode(pixels).latent_dist.mode() - vae.config.shift_factor) * vae.config.scaling_factor
    packed = kpipe._pack_latents(lat, 1, lat.shape[1], lat.shape[2], lat.shape[3])
    torch.testing.assert_close(inputs["hidden_states"][:, target:], packed, rtol=0, atol=1e-6)
    residual = (with_ids - bare)[0]
    assert torch.count_nonzero(residual[target:]) == 0  # condition tokens: exactly zero
    cover = box_coverage(torch.tensor([out.edit.boxes], dtype=torch.float64), h, w)[0]  # [2, target]
    assert not (cover[0] & cover[1]).any()
    inside = cover.any(0)
    assert torch.count_nonzero(residual[:target][~inside]) == 0  # target tokens outside every box: zero
    assert residual[:target][cover[0]].abs().amax(-1).min() > 0 and residual[:target][cover[1]].abs().amax(-1).min() > 0
    change = (other - with_ids)[0, :target]  # person 1's identity changed: only box 1 moves
    assert torch.count_nonzero(change[cover[0]]) == 0
    assert change[cover[1]].abs().amax(-1).min() > 0


def test_edit_uses_release_sigmas_and_device_seeds(kpipe, shared_faces):
    from withanyone.pipeline.sampling import release_sigmas

    photo = str(shared_faces / "group" / "3.jpg")
    call = dict(prompt="", image=photo, references=_vectors(2), size=96, output_type="np", **FAST)
    one = kpipe(seed=11, **call).images
    again = kpipe(seed=11, **call).images
    two = kpipe(seed=12, **call).images
    assert np.array_equal(one, again) and np.abs(one - two).max() > 1e-3
    got = kpipe.scheduler.sigmas[:-1].double().numpy()
    np.testing.assert_allclose(got, release_sigmas(96, 96, STEPS), rtol=1e-6, atol=1e-6)


def test_edit_refuses_siglip_and_bad_sizes(kpipe, shared_faces):
    from withanyone.pipeline.kontext import EDIT_SIGLIP_REFUSAL

    photo = str(shared_faces / "group" / "3.jpg")
    with pytest.raises(ValueError) as err:
        kpipe("", image=photo, references=_vectors(2), siglip_weight=0.5, **FAST)
    assert str(err.value) == EDIT_SIGLIP_REFUSAL and "\n" not in EDIT_SIGLIP_REFUSAL
    with pytest.raises(ValueError, match="canvas size 64×64"):
        kpipe("", image=photo, references=_vectors(2), size=64, height=128, **FAST)
    with pytest.raises(EditError, match="1 reference"):
        kpipe("", image=photo, references=_vectors(1), size=64, **FAST)


def test_text_to_image_mode_k_with_siglip(dlib_analyzer):
    from withanyone.pipeline.tiny import tiny_kontext_pipeline

    pipe = tiny_kontext_pipeline(face_analyzer=dlib_analyzer, variant="K")
    pipe.set_progress_bar_config(disable=True)
    out = pipe("two people", references=_vectors(2), height=64, width=96, seed=0, siglip_weight=0.0, **FAST)
    assert out.images[0].size == (96, 64) and out.edit is None and len(out.boxes) == 2  # max_area keeps the size
    with pytest.raises(ValueError, match="SigLIP|siglip"):  # vectors carry no face crop for SigLIP
        pipe("two people", references=_vectors(2), height=64, width=64, seed=0, siglip_weight=0.5, **FAST)


def test_from_pretrained_with_tiny_files_in_real_formats(tmp_path, dlib_analyzer, shared_faces):
    from withanyone.errors import ModelNotFoundError
    from withanyone.pipeline.kontext import WithAnyoneKontextPipeline
    from withanyone.pipeline.tiny import write_tiny_kontext_files

    base, ke = write_tiny_kontext_files(tmp_path, arcface_dim=128)
    assert ke.name == "withanyone_kontext_edit.safetensors" and (base / "transformer" / "config.json").is_file()
    with pytest.raises(ModelNotFoundError) as err:  # the adapter file is checked before the base loads
        WithAnyoneKontextPipeline.from_pretrained(base, adapter=ke.parent, variant="K")
    assert "withanyone_kontext.safetensors" in str(err.value)
    pipe = WithAnyoneKontextPipeline.from_pretrained(base, adapter=ke.parent, variant="Ke",
                                                     face_pack=dlib_analyzer, torch_dtype=torch.float32)
    report = pipe.adapter.load_report
    assert report.ok and report.layout == "kontext_e" and report.source == str(ke)
    assert pipe.kontext_variant == "Ke" and not pipe.adapter.config.use_siglip
    pipe.set_progress_bar_config(disable=True)
    out = pipe("", image=str(shared_faces / "group" / "3.jpg"), references=_vectors(2), size=64, seed=0, **FAST)
    assert out.images[0].size == (64, 64)
    pipe.save_pretrained(tmp_path / "saved")  # diffusers layout with the adapter: loads back with its own adapter
    again = WithAnyoneKontextPipeline.from_pretrained(tmp_path / "saved", face_pack=dlib_analyzer,
                                                      torch_dtype=torch.float32)
    sd, sd2 = pipe.adapter.state_dict(), again.adapter.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)

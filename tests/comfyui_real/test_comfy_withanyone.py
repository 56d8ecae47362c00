"""The WithAnyone nodes on ComfyUI's own FLUX, in real ComfyUI: exactness at weight 0, box locality, clone
semantics, and parity with ``WithAnyonePipeline``'s transformer + adapter (fp32, fp8 weights, a LoRA)."""

from __future__ import annotations

import copy

import harness
import numpy as np
import pytest
import torch
from harness import comfy_velocity, diffusers_velocity, load_unet
from withanyone_test_nodes import random_flux_conditioning

H = W = 256  # pixels; the latent is 32×32, 16×16 = 256 image tokens
BOXES = [(16.0, 32.0, 112.0, 144.0), (144.0, 48.0, 240.0, 176.0)]
SIGMA = 0.7
PARITY_TOL = 1e-5


@pytest.fixture(scope="module")
def wa(comfy):
    """The pack's node module (imported after ComfyUI, as ComfyUI's custom-node loader would)."""
    from withanyone.comfy import nodes

    return nodes


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Tiny FLUX files (1+0 and 2+2 blocks) and their adapters in the release's checkpoint layout."""
    from withanyone.model import WithAnyoneAdapter

    d = tmp_path_factory.mktemp("wa_models")
    out = {}
    for name, (nd, ns, seed) in {"1x0": (1, 0, 1), "2x2": (2, 2, 2)}.items():
        flux = harness.write_tiny_flux(d / f"flux_{name}.safetensors", seed=seed, num_layers=nd,
                                       num_single_layers=ns)
        torch.manual_seed(100 + seed)
        adapter = WithAnyoneAdapter(num_double_blocks=nd, num_single_blocks=ns, hidden_size=192, num_heads=3,
                                    head_dim=64, arcface_dim=512, siglip_dim=768, num_arc_tokens=8).eval()
        adapter.save_authors_checkpoint(d / "withanyone" / f"wa_{name}.safetensors")
        out[name] = (d / f"flux_{name}.safetensors", flux, d / "withanyone" / f"wa_{name}.safetensors", nd)
    return out


def people(n: int = 2, seed: int = 0):
    """``n`` PERSONs with raw-norm ArcFace vectors (norm ≈ 20, as insightface gives) and SigLIP features."""
    from withanyone.comfy.types import Person

    g = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        v = g.standard_normal(512).astype(np.float32)
        out.append(Person(v / np.linalg.norm(v) * 20.0,
                          siglip=torch.from_numpy(g.standard_normal((256, 768)).astype(np.float32))))
    return out


def boxes(n: int = 2):
    from withanyone.comfy.types import FaceBoxes

    return FaceBoxes(list(BOXES[:n]), W, H)


def load_adapter(comfy, wa, path, nd, dtype="default"):
    """The pack's Load WithAnyone node on ``path`` (registered as a models/withanyone folder)."""
    comfy["folder_paths"].add_model_folder_path("withanyone", str(path.parent))
    return wa.WithAnyoneLoader().load(path.name, dtype, nd)[0]


def apply(wa, model, adapter, persons, id_weight=1.0, siglip_weight=0.0, n=2):
    extra = {f"person_{i + 1}": p for i, p in enumerate(persons[1:], start=1)}
    return wa.ApplyWithAnyone().apply(model, adapter, boxes(n), persons[0], id_weight, siglip_weight, 0.0, 1.0,
                                      **extra)[0]


def ksample(comfy, model, steps: int, seed: int = 0, cond_seed: int = 3):
    """ComfyUI's own KSampler node (euler, simple, cfg 1) on a 256² empty SD3/FLUX latent; the samples."""
    n = comfy["nodes"]
    latent = n.NODE_CLASS_MAPPINGS["EmptySD3LatentImage"]().generate(W, H, 1)[0]
    cond = random_flux_conditioning(cond_seed)
    return n.KSampler().sample(model, seed, steps, 1.0, "euler", "simple", cond, cond, latent, 1.0)[0]["samples"]


def pipeline_velocity(flux, adapter_path, nd, x, persons, id_weight, siglip_weight, cond):
    """``WithAnyonePipeline``'s transformer + adapter (as its ``__call__`` runs them) on the same inputs."""
    from tiny_models.pipeline import get_dummy_components

    from withanyone.model import WithAnyoneAdapter
    from withanyone.pipeline import WithAnyonePipeline

    adapter = WithAnyoneAdapter.from_authors_checkpoint(str(adapter_path), num_double_blocks=nd).eval()
    pipe = WithAnyonePipeline(**{**get_dummy_components(), "transformer": flux}, adapter=adapter)
    arc = torch.from_numpy(np.stack([p.arcface for p in persons]))[None]
    sig = torch.stack([p.siglip for p in persons])[None] if siglip_weight else None
    try:
        with pipe.adapter.identities(arcface=arc, siglip=sig, boxes=[list(BOXES[:len(persons)])], height=H,
                                     width=W, id_weight=id_weight, siglip_weight=siglip_weight):
            return diffusers_velocity(pipe.transformer, x, SIGMA, cond)
    finally:
        pipe.adapter.detach()


def latent(seed: int = 1):
    return torch.randn(1, 16, H // 8, W // 8, generator=torch.Generator().manual_seed(seed))


def test_weight_zero_is_bit_identical_weight_one_stays_in_the_boxes_and_the_base_is_unchanged(comfy, wa, files):
    from withanyone.model.masks import box_coverage

    flux_path, _, wa_path, nd = files["1x0"]
    base = load_unet(comfy, flux_path)
    adapter = load_adapter(comfy, wa, wa_path, nd)
    persons = people()
    bare = ksample(comfy, base, steps=3)
    zero = ksample(comfy, apply(wa, base, adapter, persons, id_weight=0.0), steps=3)
    assert torch.equal(zero, bare), "Apply WithAnyone at weight 0 changed the samples"

    # one block, one Euler step (output = denoised = x − σ·v): the residual reaches only the boxes' tokens
    one_bare = ksample(comfy, base, steps=1)
    patched = apply(wa, base, adapter, persons, id_weight=1.0)
    one = ksample(comfy, patched, steps=1)
    diff = (one - one_bare).abs().amax(dim=1)[0]  # [32, 32] latent cells
    changed = diff.reshape(16, 2, 16, 2).amax(dim=(1, 3)).reshape(-1) > 0  # per 2×2 token
    cover = box_coverage(torch.tensor([BOXES], dtype=torch.float64), H, W)[0]  # [2, 256]
    print(f"weight 1: {int(changed.sum())} tokens changed, boxes cover {int(cover.any(0).sum())}; max change "
          f"{diff.max().item():.3g}")
    assert changed.any()
    assert not (changed & ~cover.any(0)).any(), "a token outside every box changed"
    assert all((changed & cover[i]).any() for i in range(2)), "a person's box got no residual"
    assert torch.equal(changed, cover.any(0))

    # clone semantics: the base MODEL carries no patch and samples as before
    base_to = base.model_options.get("transformer_options", {})
    assert "patches_replace" not in base_to
    for wrappers in (base.wrappers, base_to.get("wrappers", {})):
        assert not any(k.startswith("withanyone") for ws in wrappers.values() for k in ws)
    assert torch.equal(ksample(comfy, base, steps=3), bare)
    assert torch.equal(ksample(comfy, patched, steps=1), one)  # and the patch is deterministic


@pytest.mark.parametrize("siglip_weight", [0.0, 0.6])
def test_velocity_matches_the_pipeline_for_two_people(comfy, wa, files, siglip_weight):
    flux_path, flux, wa_path, nd = files["2x2"]
    base = load_unet(comfy, flux_path)
    persons, x, cond = people(), latent(), random_flux_conditioning(5)
    patched = apply(wa, base, load_adapter(comfy, wa, wa_path, nd), persons, 1.0, siglip_weight)
    ours = comfy_velocity(comfy, patched, x, SIGMA, cond)
    ref = pipeline_velocity(flux, wa_path, nd, x, persons, 1.0, siglip_weight, cond)
    bare = diffusers_velocity(flux, x, SIGMA, cond)
    err = (ours - ref).abs().max().item()
    effect = (ref - bare).abs().max().item()
    print(f"parity fp32 (siglip_weight {siglip_weight}): max |ComfyUI − pipeline| = {err:.3g}; "
          f"adapter effect {effect:.3g}")
    assert effect > 1e-2, "the adapter does not change the velocity: the comparison would prove nothing"
    assert err <= PARITY_TOL


def fp8_rounded(model):
    """A copy of diffusers ``model`` whose every weight went through fp8 e4m3fn and back (what ComfyUI stores)."""
    out = copy.deepcopy(model)
    with torch.no_grad():
        for p in out.parameters():
            p.copy_(p.to(torch.float8_e4m3fn).to(p.dtype))
    return out


def test_fp8_weights_stay_exact_at_weight_zero_and_match_the_pipeline(comfy, wa, files):
    flux_path, flux, wa_path, nd = files["2x2"]
    base = load_unet(comfy, flux_path, "fp8_e4m3fn")
    assert next(base.model.diffusion_model.parameters()).dtype == torch.float8_e4m3fn
    adapter, persons = load_adapter(comfy, wa, wa_path, nd), people()
    bare = ksample(comfy, base, steps=2)
    assert torch.equal(ksample(comfy, apply(wa, base, adapter, persons, 0.0), steps=2), bare)
    x, cond = latent(), random_flux_conditioning(5)
    ours = comfy_velocity(comfy, apply(wa, base, adapter, persons, 1.0, 0.6), x, SIGMA, cond)
    ref = pipeline_velocity(fp8_rounded(flux), wa_path, nd, x, persons, 1.0, 0.6, cond)
    err = (ours - ref).abs().max().item()
    print(f"parity fp8_e4m3fn weights: max |ComfyUI − pipeline on fp8-rounded weights| = {err:.3g}")
    assert err <= PARITY_TOL


LORA_TARGETS = ("transformer_blocks.0.attn.to_q", "transformer_blocks.1.ff.net.2",
                "single_transformer_blocks.0.proj_out")


def write_lora(path, flux, rank: int = 4, seed: int = 7) -> dict:
    """A diffusers-format FLUX LoRA (``transformer.<module>.lora_A/B.weight``, no alpha: scale 1) on a few layers."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    modules = dict(flux.named_modules())
    sd = {}
    for name in LORA_TARGETS:
        w = modules[name].weight
        sd[f"transformer.{name}.lora_A.weight"] = torch.randn(rank, w.shape[1], generator=g) * 0.3
        sd[f"transformer.{name}.lora_B.weight"] = torch.randn(w.shape[0], rank, generator=g) * 0.3
    save_file(sd, str(path))
    return sd


def lora_merged(model, sd, strength: float):
    out = copy.deepcopy(model)
    modules = dict(out.named_modules())
    with torch.no_grad():
        for name in LORA_TARGETS:
            a, b = sd[f"transformer.{name}.lora_A.weight"], sd[f"transformer.{name}.lora_B.weight"]
            modules[name].weight.add_(strength * (b @ a))
    return out


def test_lora_changes_the_output_and_the_patch_stacks_on_it(comfy, wa, files, tmp_path):
    flux_path, flux, wa_path, nd = files["2x2"]
    lora_path = tmp_path / "loras" / "tiny_lora.safetensors"
    lora_path.parent.mkdir()
    sd = write_lora(lora_path, flux)
    comfy["folder_paths"].add_model_folder_path("loras", str(lora_path.parent))
    base = load_unet(comfy, flux_path)
    strength = 0.8
    lora = comfy["nodes"].LoraLoaderModelOnly().load_lora_model_only(base, lora_path.name, strength)[0]
    adapter, persons = load_adapter(comfy, wa, wa_path, nd), people()
    x, cond = latent(), random_flux_conditioning(5)
    v_base = comfy_velocity(comfy, base, x, SIGMA, cond)
    v_lora = comfy_velocity(comfy, lora, x, SIGMA, cond)
    assert (v_lora - v_base).abs().max() > 1e-2, "the LoRA does not change the output"
    bare = ksample(comfy, lora, steps=2)
    assert torch.equal(ksample(comfy, apply(wa, lora, adapter, persons, 0.0), steps=2), bare)
    ours = comfy_velocity(comfy, apply(wa, lora, adapter, persons, 1.0, 0.6), x, SIGMA, cond)
    ref = pipeline_velocity(lora_merged(flux, sd, strength), wa_path, nd, x, persons, 1.0, 0.6, cond)
    err = (ours - ref).abs().max().item()
    lora_vs_merged = (v_lora - diffusers_velocity(lora_merged(flux, sd, strength), x, SIGMA, cond)).abs().max()
    print(f"parity with a LoRA: ComfyUI LoRA vs merged diffusers {lora_vs_merged.item():.3g}; patched vs pipeline "
          f"{err:.3g}")
    assert err <= PARITY_TOL
    # the LoRA'd MODEL itself is unchanged by the patched run
    assert torch.equal(comfy_velocity(comfy, lora, x, SIGMA, cond), v_lora)


def test_a_partially_loaded_adapter_gives_the_same_velocity(comfy, wa, files):
    """ComfyUI's low-VRAM path: every adapter layer left to stream (comfy_cast_weights) changes nothing."""
    flux_path, _, wa_path, nd = files["2x2"]
    base = load_unet(comfy, flux_path)
    persons, x, cond = people(), latent(), random_flux_conditioning(5)
    full = comfy_velocity(comfy, apply(wa, base, load_adapter(comfy, wa, wa_path, nd), persons, 1.0, 0.6), x,
                          SIGMA, cond)
    adapter = load_adapter(comfy, wa, wa_path, nd)
    patched = apply(wa, base, adapter, persons, 1.0, 0.6)
    comfy["model_management"].load_models_gpu([base])
    adapter.load(comfy["model_management"].get_torch_device(), lowvram_model_memory=1)  # 1 byte: nothing fits
    streamed = [m for m in adapter.model.modules() if getattr(m, "comfy_cast_weights", False)]
    assert len(streamed) > 10, "ComfyUI did not load the adapter partially"
    low = comfy_velocity(comfy, patched, x, SIGMA, cond, load=False)
    assert torch.equal(low, full)

"""The harness itself against real ComfyUI: its loader gives diffusers' output for our tiny FLUX; the server runs graphs."""

from __future__ import annotations

import harness
import pytest
import torch
from withanyone_test_nodes import random_flux_conditioning


def load_unet(comfy, path, weight_dtype: str = "default"):
    """ComfyUI's UNETLoader node on ``path`` (its folder registered as a diffusion_models folder)."""
    comfy["folder_paths"].add_model_folder_path("diffusion_models", str(path.parent))
    return comfy["nodes"].UNETLoader().load_unet(path.name, weight_dtype)[0]


def comfy_velocity(comfy, patcher, x, sigma, cond, transformer_options=None):
    """The FLUX velocity ComfyUI's diffusion model predicts for latent ``x`` [B,16,H,W] at ``sigma``."""
    comfy["model_management"].load_models_gpu([patcher])
    opts = dict(patcher.model_options.get("transformer_options", {}))
    opts.update(transformer_options or {})
    ctx, extra = cond[0]
    dm = patcher.model.diffusion_model
    with torch.no_grad():
        return dm(x, torch.tensor([sigma]), ctx, y=extra["pooled_output"],
                  guidance=torch.tensor([extra["guidance"]]), transformer_options=opts)


def diffusers_velocity(model, x, sigma, cond):
    """The same velocity from diffusers' FluxTransformer2DModel on the packed latent (unpacked back)."""
    b, c, h, w = x.shape
    packed = x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, h * w // 4, c * 4)
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] = torch.arange(h // 2)[:, None]
    ids[..., 2] = torch.arange(w // 2)[None, :]
    ctx, extra = cond[0]
    with torch.no_grad():
        out = model(hidden_states=packed, encoder_hidden_states=ctx, pooled_projections=extra["pooled_output"],
                    timestep=torch.tensor([sigma]), guidance=torch.tensor([extra["guidance"]]),
                    img_ids=ids.reshape(-1, 3), txt_ids=torch.zeros(ctx.shape[1], 3), return_dict=False)[0]
    return out.reshape(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


def test_comfy_loader_gives_diffusers_output(comfy, tiny_flux_path, tiny_flux):
    patcher = load_unet(comfy, tiny_flux_path)
    dm = patcher.model.diffusion_model
    assert dm.hidden_size == 192 and dm.num_heads == 3 and len(dm.double_blocks) == 1 and len(dm.single_blocks) == 1
    x = torch.randn(1, 16, 32, 32, generator=torch.Generator().manual_seed(1))
    cond = random_flux_conditioning(3)
    ours = comfy_velocity(comfy, patcher, x, 0.7, cond)
    ref = diffusers_velocity(tiny_flux, x, 0.7, cond)
    err = (ours - ref).abs().max().item()
    print(f"ComfyUI vs diffusers tiny FLUX velocity: max |diff| = {err:.3g} (ref scale {ref.abs().max().item():.3g})")
    assert ours.dtype == torch.float32 and ref.abs().max() > 0.1
    assert err < 1e-5


def test_server_runs_an_api_graph(comfy_server, tiny_flux_path):
    name = harness.copy_model(tiny_flux_path, comfy_server.base, "diffusion_models")
    info = comfy_server.get("/object_info/WithAnyoneTestRandomFluxConditioning")
    assert "WithAnyoneTestRandomFluxConditioning" in info, "the test-only custom nodes did not load"
    prompt = {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": name, "weight_dtype": "default"}},
        "2": {"class_type": "WithAnyoneTestRandomFluxConditioning",
              "inputs": {"seed": 0, "tokens": 16, "context_dim": 64, "pooled_dim": 32, "guidance": 3.5}},
        "3": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 128, "height": 128, "batch_size": 1}},
        "4": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "positive": ["2", 0], "negative": ["2", 0],
                                                  "latent_image": ["3", 0], "seed": 0, "steps": 2, "cfg": 1.0,
                                                  "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0}},
        "5": {"class_type": "SaveLatent", "inputs": {"samples": ["4", 0], "filename_prefix": "harness"}},
    }
    entry = comfy_server.run(prompt, timeout=120)
    assert entry["status"]["status_str"] == "success"
    saved = entry["outputs"]["5"]["latents"][0]
    path = comfy_server.base / "output" / saved["subfolder"] / saved["filename"]
    assert path.is_file() and path.stat().st_size > 0


@pytest.mark.parametrize("missing", ["/nonexistent/comfyui"])
def test_comfyui_dir_rejects_a_folder_without_comfyui(monkeypatch, missing):
    monkeypatch.setenv("COMFYUI_DIR", missing)
    assert harness.comfyui_dir() is None

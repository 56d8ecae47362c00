"""The harness itself against real ComfyUI: its loader gives diffusers' output for our tiny FLUX; the server runs graphs."""

from __future__ import annotations

import harness
import pytest
import torch
from harness import comfy_velocity, diffusers_velocity, load_unet
from withanyone_test_nodes import random_flux_conditioning


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

"""The pack's example workflows, posted as API graphs to a headless ComfyUI with the pack in custom_nodes.

Each workflow is adapted to tiny models only where real ones cannot be had here: the tiny FLUX (2+2 blocks,
loaded with the workflow's own ``fp8_e4m3fn``), a tiny LoRA and adapter under the workflow's file names, the
tiny insightface pack as ``antelopev2``, photos with planted tiny-pack faces, a random-CONDITIONING test node
for each CLIPTextEncode (T5 cannot be made tiny) and SaveLatent for VAEDecode + SaveImage (no tiny FLUX VAE).
Everything else — Load WithAnyone, Face Analyzer Loader, WithAnyone Person, Boxes, Apply, Sampling Shift,
FluxGuidance, LoraLoaderModelOnly, KSampler — runs as written.
"""

from __future__ import annotations

import copy
import json

import harness
import numpy as np
import pytest
import torch

WORKFLOWS = harness.NODE_PACK / "example_workflows"
SIZE = (256, 192)  # width, height: the workflows' 1024×768 / 1024² scaled down for the CPU
STEPS = 3


@pytest.fixture(scope="module")
def server(comfy_server):
    """The session server with the tiny models under the example workflows' file names."""
    from PIL import Image
    from safetensors.torch import save_file
    from tiny_models.insightface_pack import build_tiny_pack, paint_key

    from withanyone.pipeline.tiny import tiny_adapter, tiny_siglip, tiny_transformer

    if "withanyone" not in [p.name for p in (comfy_server.base / "custom_nodes").iterdir()]:
        pytest.skip("the repository has no comfyui/ node pack")
    base = comfy_server.base
    flux = tiny_transformer(2)  # 2 + 2 blocks, 192 wide, diffusers keys (ComfyUI converts them)
    save_file({k: v.contiguous() for k, v in flux.state_dict().items()},
              str(base / "models" / "diffusion_models" / "flux1-dev.safetensors"))
    tiny_adapter(3).save_authors_checkpoint(base / "models" / "withanyone" / "withanyone.safetensors")
    siglip, processor = tiny_siglip(4)  # 256 tokens as the real one, under the workflow's folder name
    siglip.save_pretrained(base / "models" / "clip_vision" / "siglip-base-patch16-256-i18n")
    processor.save_pretrained(base / "models" / "clip_vision" / "siglip-base-patch16-256-i18n")
    g = torch.Generator().manual_seed(7)
    q = flux.transformer_blocks[0].attn.to_q.weight
    save_file({"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.randn(4, q.shape[1], generator=g),
               "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.randn(q.shape[0], 4, generator=g)},
              str(base / "models" / "loras" / "style_lora.safetensors"))
    build_tiny_pack(base / "models" / "insightface" / "antelopev2", num_anchors=1)
    rng = np.random.default_rng(0)
    for i in range(1, 5):
        img = rng.integers(60, 200, size=(320, 320, 3), dtype=np.uint8)
        x = 64 + 32 * i
        Image.fromarray(paint_key(img, x, 96, x + 32, 128)).save(base / "input" / f"person_{i}.png")
    return comfy_server


def adapt(graph: dict) -> dict:
    """The example API graph with tiny stand-ins (see the module doc); every WithAnyone node left as written."""
    g = copy.deepcopy(graph)
    for nid, node in list(g.items()):
        ct, inp = node["class_type"], node["inputs"]
        if ct == "CLIPTextEncode":
            g[nid] = {"class_type": "WithAnyoneTestRandomFluxConditioning",
                      "inputs": {"seed": int(nid), "tokens": 16, "context_dim": 64, "pooled_dim": 32,
                                 "guidance": 3.5}}
        elif ct in ("DualCLIPLoader", "VAELoader", "SaveImage") and not (
                ct == "SaveImage" and graph[inp["images"][0]]["class_type"] != "VAEDecode"):
            del g[nid]
        elif ct == "VAEDecode":
            g[nid] = {"class_type": "SaveLatent", "inputs": {"samples": inp["samples"], "filename_prefix": "wa"}}
        elif ct == "WithAnyoneLoader":
            inp["double_blocks"] = 2  # the tiny adapter has 2 + 2 blocks (FLUX.1's 19 + 38 are found alone)
        elif ct in ("WithAnyoneBoxes", "WithAnyoneSamplingShift", "EmptySD3LatentImage"):
            inp["width"], inp["height"] = SIZE
        elif ct == "KSampler":
            inp["steps"] = STEPS
    return g


def saved_latent(server, entry: dict, node_id: str) -> torch.Tensor:
    from safetensors.torch import load_file

    item = entry["outputs"][node_id]["latents"][0]
    return load_file(str(server.base / "output" / item["subfolder"] / item["filename"]))["latent_tensor"]


def by_class(graph: dict, cls: str) -> str:
    (nid,) = [k for k, v in graph.items() if v["class_type"] == cls]
    return nid


@pytest.mark.parametrize("stem", ["withanyone_1_person", "withanyone_2_persons", "withanyone_4_persons"])
def test_example_workflow_runs_in_comfyui(server, stem):
    info = server.get("/object_info/ApplyWithAnyone")
    assert info["ApplyWithAnyone"]["display_name"] == "Apply WithAnyone"
    graph = adapt(json.loads((WORKFLOWS / f"{stem}_api.json").read_text()))
    entry = server.run(graph, timeout=180)
    assert entry["status"]["status_str"] == "success"
    save = by_class(graph, "SaveLatent")
    lat = saved_latent(server, entry, save)
    assert lat.shape == (1, 16, SIZE[1] // 8, SIZE[0] // 8) and torch.isfinite(lat).all()
    previews = [k for k, v in graph.items() if v["class_type"] == "PreviewImage"]
    assert previews and all(entry["outputs"][k]["images"] for k in previews)  # the boxes preview was drawn
    people = int(graph[by_class(graph, "WithAnyoneBoxes")]["inputs"]["people"])
    person_texts = [entry["outputs"][k]["text"][0] for k, v in graph.items()
                    if v["class_type"] == "WithAnyonePerson" and k in entry["outputs"]]
    assert len(person_texts) == people and all("ArcFace norm" in t for t in person_texts)


def test_posted_workflow_weight_zero_equals_the_graph_without_the_node(server):
    graph = adapt(json.loads((WORKFLOWS / "withanyone_2_persons_api.json").read_text()))
    apply_id, shift_id, save_id = (by_class(graph, c) for c in ("ApplyWithAnyone", "WithAnyoneSamplingShift",
                                                                 "SaveLatent"))
    bypass = copy.deepcopy(graph)
    bypass[shift_id]["inputs"]["model"] = graph[apply_id]["inputs"]["model"]
    del bypass[apply_id]
    zero = copy.deepcopy(graph)
    zero[apply_id]["inputs"]["id_weight"] = 0.0
    bare = saved_latent(server, server.run(bypass, timeout=180), save_id)
    at0 = saved_latent(server, server.run(zero, timeout=180), save_id)
    at1 = saved_latent(server, server.run(graph, timeout=180), save_id)
    assert torch.equal(at0, bare), "id_weight 0 through /prompt changed the samples"
    assert (at1 - bare).abs().max() > 1e-3, "id_weight 1 through /prompt changed nothing"

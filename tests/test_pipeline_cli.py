"""Loading from local folders / the authors' file / hub ids (offline → the exact missing file) and the
``withanyone generate`` CLI, on tiny components saved in the real formats."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_models.pipeline import get_dummy_components, get_dummy_inputs, tiny_adapter, tiny_siglip

from withanyone.errors import ModelNotFoundError
from withanyone.pipeline import Reference, WithAnyonePipeline
from withanyone.pipeline.loading import load_adapter, load_siglip

EMB = [np.random.RandomState(i).randn(512).astype(np.float32) * 20 for i in range(2)]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Tiny FLUX (diffusers layout), adapter (save_pretrained and authors' file), SigLIP, all on disk."""
    from diffusers import FluxPipeline

    root = tmp_path_factory.mktemp("models")
    FluxPipeline(**get_dummy_components()).save_pretrained(root / "flux")
    adapter = tiny_adapter()
    adapter.save_pretrained(root / "adapter")
    (root / "authors").mkdir()
    adapter.save_authors_checkpoint(root / "authors" / "withanyone.safetensors")
    model, processor = tiny_siglip()
    model.save_pretrained(root / "siglip")
    processor.save_pretrained(root / "siglip")
    return root


def test_from_pretrained_local_folders_and_authors_file_match_in_memory(saved, tmp_path):
    p = WithAnyonePipeline(**get_dummy_components(), adapter=tiny_adapter())
    p.set_progress_bar_config(disable=True)
    expected = p(**get_dummy_inputs(), references=EMB, id_weight=3.0).images
    p.save_pretrained(tmp_path / "whole")  # a saved WithAnyonePipeline brings its adapter along
    for adapter in ("default", saved / "adapter", saved / "authors", saved / "authors" / "withanyone.safetensors"):
        base = tmp_path / "whole" if adapter == "default" else saved / "flux"
        pipe = WithAnyonePipeline.from_pretrained(base, adapter=adapter, siglip=saved / "siglip",
                                                  face_pack=None, torch_dtype=torch.float32)
        pipe.set_progress_bar_config(disable=True)
        assert pipe.adapter.attached
        got = pipe(**get_dummy_inputs(), references=EMB, id_weight=3.0).images
        np.testing.assert_allclose(got, expected, atol=1e-4, err_msg=str(adapter))  # fp32 load-order noise
        assert pipe.model_sources["base"]["path"] == str(base.resolve())
    assert not pipe.siglip_loaded
    model, processor = pipe.load_siglip()
    assert model.config.hidden_size == 32 and pipe.siglip_loaded


def test_missing_local_files_are_named(saved, tmp_path):
    base = tmp_path / "flux"
    shutil.copytree(saved / "flux", base)
    (base / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(ModelNotFoundError, match=r"no weights for component 'vae'.*vae/diffusion_pytorch_model"):
        WithAnyonePipeline.from_pretrained(base, adapter=saved / "adapter", torch_dtype=torch.float32)
    shutil.copy(saved / "flux" / "vae" / "diffusion_pytorch_model.safetensors", base / "vae")
    (base / "transformer" / "config.json").unlink()
    with pytest.raises(ModelNotFoundError, match=r"transformer/config\.json is missing"):
        WithAnyonePipeline.from_pretrained(base, adapter=saved / "adapter", torch_dtype=torch.float32)
    shutil.copy(saved / "flux" / "transformer" / "config.json", base / "transformer")
    # a sharded component whose index lists a shard that is not there
    weights = base / "transformer" / "diffusion_pytorch_model.safetensors"
    weights.rename(base / "transformer" / "diffusion_pytorch_model-00001-of-00002.safetensors")
    index = {"metadata": {}, "weight_map": {"a": "diffusion_pytorch_model-00001-of-00002.safetensors",
                                            "b": "diffusion_pytorch_model-00002-of-00002.safetensors"}}
    (base / "transformer" / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ModelNotFoundError, match=r"transformer/diffusion_pytorch_model-00002-of-00002\.safetensors"):
        WithAnyonePipeline.from_pretrained(base, adapter=saved / "adapter", torch_dtype=torch.float32)
    with pytest.raises(ModelNotFoundError, match=r"adapter: .*nothing\.safetensors is missing"):
        load_adapter(tmp_path / "nothing.safetensors")
    with pytest.raises(ModelNotFoundError, match=r"model_index\.json is missing"):
        WithAnyonePipeline.from_pretrained(tmp_path / "empty-dir-that-is-not-there")


def test_offline_hub_ids_name_the_missing_file(saved, tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError, match=r"model_index\.json of hub repo black-forest-labs/FLUX\.1-dev "
                                                 r"is not in the local cache and offline mode is on"):
        WithAnyonePipeline.from_pretrained()
    with pytest.raises(ModelNotFoundError, match=r"withanyone\.safetensors of hub repo WithAnyone/WithAnyone"):
        load_adapter("WithAnyone/WithAnyone")
    with pytest.raises(ModelNotFoundError, match=r"config\.json of hub repo google/siglip-base-patch16-256-i18n"):
        load_siglip("google/siglip-base-patch16-256-i18n")
    # SigLIP is only needed for siglip_weight > 0: the pipeline loads and runs without it
    pipe = WithAnyonePipeline.from_pretrained(saved / "flux", adapter=saved / "adapter", torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    ref = Reference(EMB[0], np.zeros((64, 64, 3), np.uint8))
    pipe(**get_dummy_inputs(), references=[ref])
    with pytest.raises(ModelNotFoundError, match=r"config\.json of hub repo google/siglip"):
        pipe(**get_dummy_inputs(), references=[ref], siglip_weight=1.0)


def test_full_siglip_checkpoint_gives_its_vision_tower(tmp_path):
    from transformers import SiglipConfig, SiglipModel

    torch.manual_seed(0)
    full = SiglipModel(SiglipConfig(
        text_config={"hidden_size": 16, "intermediate_size": 20, "num_hidden_layers": 1, "num_attention_heads": 2,
                     "vocab_size": 50, "max_position_embeddings": 16},
        vision_config={"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 4,
                       "image_size": 32, "patch_size": 2}))
    full.save_pretrained(tmp_path)
    _, processor = tiny_siglip()
    processor.save_pretrained(tmp_path)
    vision, proc = load_siglip(tmp_path, torch_dtype=torch.float32)
    x = proc(images=[np.full((40, 40, 3), 200, np.uint8)], return_tensors="pt").pixel_values
    with torch.no_grad():
        a = vision(pixel_values=x).last_hidden_state
        b = full.vision_model(pixel_values=x).last_hidden_state
    assert a.shape == (1, 256, 32)
    torch.testing.assert_close(a, b)


def test_generate_cli_writes_image_and_sidecar(saved, tmp_path, samples_dir):
    from typer.testing import CliRunner

    from withanyone.cli import app

    for i, e in enumerate(EMB):
        np.save(tmp_path / f"p{i}.npy", e)
    common = ["generate", "--prompt", "a photo of two people in the park", "--ref", str(tmp_path / "p0.npy"),
              "--ref", str(tmp_path / "p1.npy"), "--box", "0,0,32,32", "--box", "32,16,64,48",
              "--id-weight", "3", "--seed", "11", "--height", "64", "--width", "64", "--steps", "2",
              "--base", str(saved / "flux"), "--adapter", str(saved / "adapter"), "--siglip", str(saved / "siglip"),
              "--dtype", "float32", "--device", "cpu"]
    runner = CliRunner()
    res = runner.invoke(app, common + ["--out", str(tmp_path / "out.png")])
    assert res.exit_code == 0, res.output + repr(res.exception)
    assert "denoising" in res.output and "2/2" in res.output  # the progress bar ran to the end
    img = Image.open(tmp_path / "out.png")
    assert img.size == (64, 64)
    side = json.loads((tmp_path / "out.json").read_text())
    assert side["seed"] == 11 and side["id_weight"] == 3.0 and side["siglip_weight"] == 0.0
    assert side["boxes"] == [[0, 0, 32, 32], [32, 16, 64, 48]] and side["box_mode"] == "explicit"
    assert side["prompt"].startswith("a photo") and side["steps"] == 2 and side["guidance"] == 4.0
    assert side["models"]["base"]["path"] == str((saved / "flux").resolve())
    assert side["models"]["adapter"]["path"] == str((saved / "adapter").resolve())
    assert {"withanyone", "diffusers", "torch", "transformers"} <= set(side["versions"])
    # same seed → same picture, and the same as the Python API with those settings
    res2 = runner.invoke(app, common + ["--out", str(tmp_path / "again.png"), "--no-progress"])
    assert res2.exit_code == 0, res2.output
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "again.png")), np.asarray(img))
    assert side["models"]["siglip"] == {"source": str(saved / "siglip")}  # never loaded at siglip_weight 0
    # a LoRA (saved in diffusers' format) changes the picture
    from peft import LoraConfig, get_peft_model_state_dict

    donor = get_dummy_components()["transformer"]
    torch.manual_seed(1)
    donor.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                 init_lora_weights=False))
    WithAnyonePipeline.save_lora_weights(tmp_path / "lora", transformer_lora_layers=get_peft_model_state_dict(donor))
    # ... with a photo reference through an insightface-format pack, and the SigLIP branch on
    from tiny_models.insightface_pack import build_tiny_pack, paint_key

    from withanyone.faces import load_image

    build_tiny_pack(tmp_path / "pack")
    Image.fromarray(paint_key(load_image(samples_dir / "obama" / "1.jpg"), 100, 80, 196, 176)).save(tmp_path / "o.png")
    i = common.index("--ref")
    photo_args = common[:i] + ["--ref", str(tmp_path / "o.png"), "--box", "8,8,40,40"] + common[i + 8:]
    res3 = runner.invoke(app, photo_args + ["--out", str(tmp_path / "lora.png"), "--lora", str(tmp_path / "lora"),
                                            "--lora-scale", "2", "--siglip-weight", "1", "--no-progress",
                                            "--face-pack", str(tmp_path / "pack")])
    assert res3.exit_code == 0, res3.output + repr(res3.exception)
    lora_img = np.asarray(Image.open(tmp_path / "lora.png")).astype(int)
    assert np.abs(lora_img - np.asarray(img).astype(int)).max() > 2
    side3 = json.loads((tmp_path / "lora.json").read_text())
    assert side3["lora"] == [str(tmp_path / "lora")] and side3["lora_scale"] == 2.0
    assert side3["models"]["siglip"] == {"path": str((saved / "siglip").resolve())}  # loaded: siglip_weight 1
    assert side3["models"]["face_analyzer"]["pack"] == str(tmp_path / "pack") and side3["boxes"] == [[8, 8, 40, 40]]
    # a reference the SigLIP branch cannot use: a clean error, no traceback
    res4 = runner.invoke(app, common + ["--out", str(tmp_path / "y.png"), "--siglip-weight", "1"])
    assert res4.exit_code == 1 and "SigLIP branch needs the face photo" in res4.output
    assert "Traceback" not in res4.output
    # bad input: one box for two people
    i = common.index("--box")
    bad = runner.invoke(app, common[:i] + common[i + 4:] + ["--box", "0,0,8,8", "--out", str(tmp_path / "x.png")])
    assert bad.exit_code != 0 and "one box per reference" in " ".join(bad.output.replace("│", " ").split())


def test_generate_rejects_bad_refs_and_sizes_before_loading_weights(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from withanyone.cli import app

    def touched(*a, **k):
        raise AssertionError("FLUX weights were touched before the inputs were checked")

    monkeypatch.setattr(WithAnyonePipeline, "from_pretrained", touched)
    np.save(tmp_path / "p0.npy", EMB[0])
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    base = ["generate", "--prompt", "x", "--base", str(tmp_path / "no-flux"), "--offline", "--no-progress"]
    good = ["--ref", str(tmp_path / "p0.npy")]
    cases = [
        (["--ref", str(tmp_path / "missing.jpg")], f"--ref {tmp_path / 'missing.jpg'}: no such file"),
        (["--ref", str(tmp_path / "broken.jpg")], f"--ref {tmp_path / 'broken.jpg'}: "),
        (good + ["--height", "1000"], "--height 1000: must be a positive multiple of 16 pixels"),
        (good + ["--width", "0"], "--width 0: must be a positive multiple of 16"),
        (good + ["--layout", str(tmp_path / "nolayout.png")], "--layout"),
    ]
    for args, expected in cases:
        res = CliRunner().invoke(app, base + args)
        assert res.exit_code == 1 and isinstance(res.exception, SystemExit), (args, res.output, res.exception)
        lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith(f"error: {expected}"), (args, res.stderr)
    assert "992 or 1008" in CliRunner().invoke(app, base + good + ["--height", "1000"]).stderr

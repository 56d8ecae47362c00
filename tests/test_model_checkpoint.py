"""The authors' checkpoint layout: exact key names, round trip, BFL single files, inferred config, bad files."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from tiny_models.flux import random_identities, tiny_adapter, tiny_flux_inputs, tiny_flux_transformer

from withanyone.errors import ModelNotFoundError
from withanyone.model import CheckpointError, WithAnyoneAdapter, split_authors_state_dict
from withanyone.model.checkpoint import infer_adapter_config


def release_keys(num_blocks: int, siglip: bool = True) -> set[str]:
    """The key set listed in the facts sheet for the released withanyone.safetensors."""
    keys = set()
    branches = ["ipa_arc", "ipa_sig"] if siglip else ["ipa_arc"]
    for br in branches:
        for i in range(num_blocks):
            keys |= {f"{br}.{i}.{n}.{p}" for n in ("norm1", "norm2") for p in ("weight", "bias")}
            keys |= {f"{br}.{i}.{n}.weight" for n in ("to_q", "to_kv", "to_out")}
    mlps = ["arcface_in_arc", "arcface_in_sig", "siglip_in_sig"] if siglip else ["arcface_in_arc"]
    for mlp in mlps:
        keys |= {f"{mlp}.{i}.{p}" for i in (0, 2, 3) for p in ("weight", "bias")}
    return keys


def test_state_dict_uses_exactly_the_release_key_names():
    assert set(tiny_adapter(seed=0).to_authors_state_dict()) == release_keys(4)
    assert set(tiny_adapter(seed=0, use_siglip=False).to_authors_state_dict()) == release_keys(4, siglip=False)


def test_release_shapes_at_flux_dev_width_on_meta():
    with torch.device("meta"):
        a = WithAnyoneAdapter()
    sd = a.state_dict()
    assert len(a.ipa_arc) == len(a.ipa_sig) == 57
    assert sd["ipa_arc.0.to_q.weight"].shape == (1536, 3072)
    assert sd["ipa_arc.0.to_kv.weight"].shape == (3072, 3072)
    assert sd["ipa_sig.56.to_out.weight"].shape == (3072, 1536)
    assert sd["arcface_in_arc.0.weight"].shape == (12288, 512)
    assert sd["arcface_in_arc.3.weight"].shape == (24576, 12288)
    assert sd["siglip_in_sig.0.weight"].shape == (3072, 768)
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        flux_dev = FluxTransformer2DModel(guidance_embeds=True)  # 19 + 38 blocks, width 3072
    a.attach(flux_dev)
    assert len(a._handles) == 1 + 57  # one pre-forward hook, one hook per block
    a.detach()
    n_params = sum(p.numel() for p in a.parameters())
    assert 2.6e9 < n_params < 3.0e9  # "about 2.8 B adapter parameters"
    assert infer_adapter_config(sd) == {
        "num_double_blocks": 19,
        "num_single_blocks": 38,
        "hidden_size": 3072,
        "num_heads": 24,
        "head_dim": 64,
        "arcface_dim": 512,
        "siglip_dim": 768,
        "num_arc_tokens": 8,
        "use_siglip": True,
    }


def test_authors_checkpoint_round_trip(tmp_path):
    transformer = tiny_flux_transformer(seed=0)
    a = tiny_adapter(seed=3)
    path = a.save_authors_checkpoint(tmp_path / "withanyone.safetensors")
    b = WithAnyoneAdapter.from_authors_checkpoint(path, num_double_blocks=2)
    assert b.load_report.ok and b.load_report.base_keys == []
    assert b.config.hidden_size == 192 and b.config.num_heads == 3 and b.config.num_single_blocks == 2
    sa, sb = a.to_authors_state_dict(), b.to_authors_state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa) and sa.keys() == sb.keys()
    # folder with the released file name also resolves
    c = WithAnyoneAdapter.from_authors_checkpoint(tmp_path, num_double_blocks=2)
    assert torch.equal(c.ipa_sig[3].to_kv.weight, a.ipa_sig[3].to_kv.weight)
    # same outputs on the transformer
    inputs = tiny_flux_inputs()
    arc, sig = random_identities(1, 2)
    outs = []
    for adapter in (a, b):
        adapter.attach(transformer)
        with (
            torch.no_grad(),
            adapter.identities(
                arcface=arc,
                siglip=sig,
                boxes=[[(0, 0, 99, 99), (100, 100, 200, 250)]],
                height=256,
                width=256,
                siglip_weight=0.5,
            ),
        ):
            outs.append(transformer(**inputs)[0])
        adapter.detach()
    assert torch.equal(outs[0], outs[1])


def test_bf16_export_loads_as_bf16(tmp_path):
    a = tiny_adapter(seed=3, use_siglip=False)
    path = a.save_authors_checkpoint(tmp_path / "w.safetensors", dtype=torch.bfloat16)
    b = WithAnyoneAdapter.from_authors_checkpoint(path, num_double_blocks=2)
    assert b.dtype == torch.bfloat16 and not b.config.use_siglip and b.load_report.ok
    assert torch.equal(b.ipa_arc[0].to_q.weight, a.ipa_arc[0].to_q.weight.to(torch.bfloat16))


def test_bfl_single_file_with_base_and_adapter_keys(tmp_path):
    a = tiny_adapter(seed=4)
    base = {}
    for i in range(2):
        base[f"model.diffusion_model.double_blocks.{i}.img_attn.qkv.weight"] = torch.randn(576, 192)
    for i in range(2):
        base[f"model.diffusion_model.single_blocks.{i}.linear1.weight"] = torch.randn(8, 192)
    base["model.diffusion_model.img_in.weight"] = torch.randn(192, 64)
    prefixed = {f"model.diffusion_model.{k}": v for k, v in a.to_authors_state_dict().items()}
    save_file({**base, **prefixed}, str(tmp_path / "flux1-withanyone.safetensors"))
    b = WithAnyoneAdapter.from_authors_checkpoint(tmp_path / "flux1-withanyone.safetensors")  # split from base keys
    assert b.config.num_double_blocks == 2 and b.config.num_single_blocks == 2
    assert b.load_report.base_keys == sorted(base) and b.load_report.ok
    assert torch.equal(b.arcface_in_sig[3].bias, a.arcface_in_sig[3].bias)
    adapter_sd, base_sd = split_authors_state_dict({**base, **prefixed})
    assert set(adapter_sd) == set(a.to_authors_state_dict()) and set(base_sd) == set(base)
    # export back to a single file holding both
    out = a.save_authors_checkpoint(tmp_path / "again.safetensors", base_state_dict=base)
    c = WithAnyoneAdapter.from_authors_checkpoint(out)
    assert c.load_report.base_keys == sorted(base)


def test_57_blocks_infer_flux_dev_split_without_base_keys():
    a = tiny_adapter(seed=0, num_double_blocks=19, num_single_blocks=38, use_siglip=False)
    b = WithAnyoneAdapter.from_authors_checkpoint(a.to_authors_state_dict())
    assert (b.config.num_double_blocks, b.config.num_single_blocks) == (19, 38)
    with pytest.raises(CheckpointError, match="num_double_blocks="):
        WithAnyoneAdapter.from_authors_checkpoint(tiny_adapter(seed=0).to_authors_state_dict())


def test_missing_and_unexpected_keys_are_reported():
    a = tiny_adapter(seed=5)
    with torch.no_grad():
        a.siglip_in_sig[2].weight.normal_()  # not the default ones, so a re-initialisation would show
    sd = a.to_authors_state_dict()
    dropped = ["ipa_sig.1.to_q.weight", "siglip_in_sig.2.bias"]
    for k in dropped:
        del sd[k]
    sd["arcface_in_arc.7.weight"] = torch.zeros(3)
    b = WithAnyoneAdapter.from_authors_checkpoint(sd, num_double_blocks=2)
    assert sorted(b.load_report.missing_keys) == sorted(dropped)
    assert b.load_report.unexpected_keys == ["arcface_in_arc.7.weight"]
    assert not b.load_report.ok and "2 missing" in str(b.load_report)
    assert not b.ipa_sig[1].to_q.weight.is_meta and torch.isfinite(b.ipa_sig[1].to_q.weight).all()
    assert torch.equal(b.siglip_in_sig[2].bias, torch.zeros(192))  # fresh LayerNorm init
    assert torch.equal(b.siglip_in_sig[2].weight, a.siglip_in_sig[2].weight)  # its loaded sibling kept
    assert torch.equal(b.ipa_sig[1].to_kv.weight, a.ipa_sig[1].to_kv.weight)
    with pytest.raises(CheckpointError, match="missing"):
        WithAnyoneAdapter.from_authors_checkpoint(sd, num_double_blocks=2, strict=True)


def test_shape_mismatch_names_the_key():
    sd = tiny_adapter(seed=5).to_authors_state_dict()
    sd["ipa_arc.2.to_kv.weight"] = torch.zeros(10, 192)
    with pytest.raises(CheckpointError, match=r"ipa_arc\.2\.to_kv\.weight"):
        WithAnyoneAdapter.from_authors_checkpoint(sd, num_double_blocks=2)


def test_bad_files_raise_typed_errors(tmp_path):
    pickled = tmp_path / "withanyone.bin"
    pickled.write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(CheckpointError, match="refusing to unpickle"):
        WithAnyoneAdapter.from_authors_checkpoint(pickled)
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x00" * 20)
    with pytest.raises(CheckpointError, match="broken.safetensors"):
        WithAnyoneAdapter.from_authors_checkpoint(broken)
    with pytest.raises(ModelNotFoundError, match="nope.safetensors"):
        WithAnyoneAdapter.from_authors_checkpoint(tmp_path / "nope.safetensors")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelNotFoundError, match="withanyone.safetensors"):
        WithAnyoneAdapter.from_authors_checkpoint(empty)
    other = tmp_path / "other.safetensors"
    save_file({"double_blocks.0.x": torch.zeros(2)}, str(other))
    with pytest.raises(CheckpointError, match="no WithAnyone adapter keys"):
        WithAnyoneAdapter.from_authors_checkpoint(other)


def test_offline_hub_id_says_which_file_is_missing(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(ModelNotFoundError, match="withanyone.safetensors.*WithAnyone/WithAnyone"):
        WithAnyoneAdapter.from_authors_checkpoint("WithAnyone/WithAnyone", local_files_only=True)

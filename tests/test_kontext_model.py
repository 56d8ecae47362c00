"""The K/Ke checkpoints: key layouts, loading reports, and the Kontext forward against the release's, restated.

The release's Kontext-edit model (``withanyone_kontext_e/flux/model.py``) names its adapter ``ipa.{i}``
(``PerceiverAttentionCA``: ``norm1``, ``norm2``, ``to_q``, ``to_kv``, ``to_out``), ``arcface_in`` (Linear 512→4w,
GELU, LayerNorm, Linear 4w→8w) and ``siglip_in`` (same on 768-d input, unused by its ArcFace-only forward). Its
forward runs ``[target, condition]`` image tokens through every block and adds the ID cross-attention only to the
first ``real_img_len`` (target) tokens, each target token attending to the 8 tokens of the person whose box holds
it. Those names and that computation are written out below in the test's own code.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from tiny_models.flux import tiny_flux_inputs, tiny_flux_transformer

from withanyone.errors import ModelNotFoundError
from withanyone.model.kontext import KONTEXT_FILES, load_kontext_adapter, resolve_kontext_checkpoint

WIDTH_H, HEADS, HEAD_DIM = 192, 3, 64
DOUBLE, SINGLE = 2, 3
H, W = 128, 192  # target image pixels → 8 × 12 tokens


def release_ke_state_dict(seed=0, blocks=DOUBLE + SINGLE, hidden=WIDTH_H, inner=HEADS * HEAD_DIM, base=True):
    """Random weights under the release's Kontext-edit names, with a few base-model (BFL) keys beside them."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=0.2):
        return torch.randn(*shape, generator=g) * scale

    sd = {}
    for i in range(blocks):
        p = f"ipa.{i}"
        sd[f"{p}.norm1.weight"] = 1 + r(hidden, scale=0.3)
        sd[f"{p}.norm1.bias"] = r(hidden)
        sd[f"{p}.norm2.weight"] = 1 + r(hidden, scale=0.3)
        sd[f"{p}.norm2.bias"] = r(hidden)
        sd[f"{p}.to_q.weight"] = r(inner, hidden, scale=0.1)
        sd[f"{p}.to_kv.weight"] = r(2 * inner, hidden, scale=0.1)
        sd[f"{p}.to_out.weight"] = r(hidden, inner, scale=0.4)
    for name, din in (("arcface_in", 512), ("siglip_in", 768)):
        sd[f"{name}.0.weight"] = r(4 * hidden, din, scale=0.05)
        sd[f"{name}.0.bias"] = r(4 * hidden)
        sd[f"{name}.2.weight"] = 1 + r(4 * hidden, scale=0.3)
        sd[f"{name}.2.bias"] = r(4 * hidden)
        sd[f"{name}.3.weight"] = r(8 * hidden, 4 * hidden, scale=0.05)
        sd[f"{name}.3.bias"] = r(8 * hidden)
    if base:
        sd["img_in.weight"] = r(hidden, 64)
        sd["double_blocks.0.img_attn.qkv.weight"] = r(3 * hidden, hidden)
        sd["double_blocks.1.img_attn.qkv.weight"] = r(3 * hidden, hidden)
        sd["single_blocks.0.linear1.weight"] = r(7 * hidden, hidden)
        sd["final_layer.linear.weight"] = r(64, hidden)
    return sd


def release_k_state_dict(seed=1, blocks=DOUBLE + SINGLE, hidden=WIDTH_H, inner=HEADS * HEAD_DIM):
    """The FLUX-layout names the release's ``withanyone`` package gives K: ipa_arc/ipa_sig + three encoders
    (``siglip_in_sig``: Linear 768→w, GELU, LayerNorm, Linear w→w)."""
    ke = release_ke_state_dict(seed, blocks, hidden, inner, base=False)
    sd = {}
    for k, v in ke.items():
        head, rest = k.split(".", 1)
        if head == "ipa":
            sd[f"ipa_arc.{rest}"] = v
            sd[f"ipa_sig.{rest}"] = v.clone()
        elif head == "arcface_in":
            sd[f"arcface_in_arc.{rest}"] = v
            sd[f"arcface_in_sig.{rest}"] = v.clone()
    g = torch.Generator().manual_seed(seed + 100)
    for name, shape in (("0.weight", (hidden, 768)), ("0.bias", (hidden,)), ("2.weight", (hidden,)),
                        ("2.bias", (hidden,)), ("3.weight", (hidden, hidden)), ("3.bias", (hidden,))):
        sd[f"siglip_in_sig.{name}"] = torch.randn(*shape, generator=g) * 0.05  # Linear 768→w, GELU, LN, Linear w→w
    return sd


def _save(sd, path):
    from safetensors.torch import save_file

    save_file(sd, str(path))
    return path


def test_ke_layout_loads_with_zero_missing_and_unexpected(tmp_path):
    sd = release_ke_state_dict()
    path = _save({f"model.diffusion_model.{k}": v for k, v in sd.items()}, tmp_path / KONTEXT_FILES["Ke"])
    adapter = load_kontext_adapter(tmp_path, "Ke", num_double_blocks=DOUBLE)
    rep = adapter.load_report
    assert rep.missing_keys == [] and rep.unexpected_keys == [] and rep.ok
    assert rep.layout == "kontext_e" and rep.source == str(path)
    assert rep.unused_keys == sorted(k for k in sd if k.startswith("siglip_in."))  # 6 keys, reported, not loaded
    assert len(rep.base_keys) == 5
    cfg = adapter.config
    assert (cfg.num_double_blocks, cfg.num_single_blocks, cfg.hidden_size, cfg.num_heads, cfg.use_siglip) == (
        DOUBLE, SINGLE, WIDTH_H, HEADS, False)
    ours = adapter.state_dict()
    for i in range(DOUBLE + SINGLE):
        for part in ("norm1.weight", "norm2.bias", "to_q.weight", "to_kv.weight", "to_out.weight"):
            assert torch.equal(ours[f"ipa_arc.{i}.{part}"], sd[f"ipa.{i}.{part}"])
    for part in ("0.weight", "2.bias", "3.weight"):
        assert torch.equal(ours[f"arcface_in_arc.{part}"], sd[f"arcface_in.{part}"])
    assert "unused by its forward" in str(rep)


def test_k_layout_loads_with_zero_missing_and_unexpected(tmp_path):
    sd = release_k_state_dict()
    _save(sd, tmp_path / "k.safetensors")
    adapter = load_kontext_adapter(tmp_path / "k.safetensors", "K", num_double_blocks=DOUBLE)
    rep = adapter.load_report
    assert rep.missing_keys == [] and rep.unexpected_keys == [] and rep.unused_keys == []
    assert rep.layout == "flux" and adapter.config.use_siglip
    assert torch.equal(adapter.state_dict()["siglip_in_sig.3.weight"], sd["siglip_in_sig.3.weight"])


def test_partial_checkpoint_reports_missing_keys(tmp_path):
    sd = release_ke_state_dict(base=False)
    del sd["ipa.4.to_out.weight"]
    sd["ipa.0.extra.weight"] = torch.zeros(3)
    adapter = load_kontext_adapter(sd, "Ke", num_double_blocks=DOUBLE)
    assert adapter.load_report.missing_keys == ["ipa_arc.4.to_out.weight"]
    assert adapter.load_report.unexpected_keys == ["ipa_arc.0.extra.weight"]


def test_missing_file_is_one_line_error_naming_it(tmp_path):
    for source, variant, needle in ((tmp_path, "Ke", KONTEXT_FILES["Ke"]), (tmp_path / "nope.safetensors", "K",
                                    "nope.safetensors")):
        with pytest.raises(ModelNotFoundError) as err:
            resolve_kontext_checkpoint(source, variant)
        assert needle in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ModelNotFoundError) as err:  # hub repo, offline: names the file and how to override it
        resolve_kontext_checkpoint("WithAnyone/WithAnyone", "K", local_files_only=True)
    msg = str(err.value)
    assert KONTEXT_FILES["K"] in msg and "adapter_file=" in msg and "\n" not in msg
    with pytest.raises(ModelNotFoundError, match="custom.safetensors"):
        resolve_kontext_checkpoint(tmp_path, "Ke", adapter_file="custom.safetensors")


# ---------------------------------------------------------------- the release's Kontext forward, restated
def rel_mlp(w, prefix, x):
    x = F.linear(x, w[f"{prefix}.0.weight"], w[f"{prefix}.0.bias"])
    x = F.layer_norm(F.gelu(x), (x.shape[-1],), w[f"{prefix}.2.weight"], w[f"{prefix}.2.bias"], eps=1e-5)
    return F.linear(x, w[f"{prefix}.3.weight"], w[f"{prefix}.3.bias"])


def rel_id_tokens(w, arcface_nb, hidden):
    """lq_in with arc_only: (num_refs, bs, 512) → (bs, num_refs·8, w)."""
    t = rel_mlp(w, "arcface_in", arcface_nb)
    n, b, _ = t.shape
    return t.reshape(n, b, 8, hidden).permute(1, 0, 2, 3).reshape(b, n * 8, hidden)


def rel_mask(bbox_lists, real_len, id_len, width, height, num_ids):
    """create_person_cross_attention_mask_varlen for int boxes: token y·(W/16)+x of box i sees id slice i."""
    pw, ph = width // 8 // 2, height // 8 // 2
    mask = torch.zeros(len(bbox_lists), 1, real_len, num_ids * id_len, dtype=torch.bool)
    for b, boxes in enumerate(bbox_lists):
        for i, (x1, y1, x2, y2) in enumerate(boxes[:num_ids]):
            for y in range(max(0, y1 // 16), min(ph, math.ceil(y2 / 16))):
                for x in range(max(0, x1 // 16), min(pw, math.ceil(x2 / 16))):
                    mask[b, 0, y * pw + x, i * id_len:(i + 1) * id_len] = True
    return mask


def rel_ca(w, p, ids, img, mask, heads):
    """PerceiverAttentionCA(x=id tokens, latents=target tokens); a row with no allowed key contributes 0."""
    x = F.layer_norm(ids, (ids.shape[-1],), w[f"{p}.norm1.weight"], w[f"{p}.norm1.bias"], eps=1e-5)
    lat = F.layer_norm(img, (img.shape[-1],), w[f"{p}.norm2.weight"], w[f"{p}.norm2.bias"], eps=1e-5)
    q = F.linear(lat, w[f"{p}.to_q.weight"])
    k, v = F.linear(x, w[f"{p}.to_kv.weight"]).chunk(2, dim=-1)
    b, n, _ = q.shape

    def heads_first(t):
        return t.reshape(b, t.shape[1], heads, -1).transpose(1, 2)

    q, k, v = heads_first(q), heads_first(k), heads_first(v)
    s = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    s = s.masked_fill(~mask, float("-inf"))
    p_ = torch.nan_to_num(torch.softmax(s, dim=-1), nan=0.0) * mask.any(-1, keepdim=True)
    return F.linear((p_ @ v).transpose(1, 2).reshape(b, n, -1), w[f"{p}.to_out.weight"])


def rel_forward(t, w, inputs, arcface, boxes, real_len, width, height, heads, hidden):
    """The release's Flux.forward over diffusers' blocks: residual on img[:, :real_len] after every block."""
    hs = t.x_embedder(inputs["hidden_states"])
    temb = t.time_text_embed(inputs["timestep"] * 1000, inputs["guidance"] * 1000, inputs["pooled_projections"])
    enc = t.context_embedder(inputs["encoder_hidden_states"])
    rope = t.pos_embed(torch.cat([inputs["txt_ids"], inputs["img_ids"]]))
    ids = rel_id_tokens(w, arcface.transpose(0, 1), hidden)
    mask = rel_mask(boxes, real_len, 8, width, height, arcface.shape[1])
    for i, block in enumerate(list(t.transformer_blocks) + list(t.single_transformer_blocks)):
        enc, hs = block(hidden_states=hs, encoder_hidden_states=enc, temb=temb, image_rotary_emb=rope)
        real, rest = hs[:, :real_len], hs[:, real_len:]
        hs = torch.cat([real + rel_ca(w, f"ipa.{i}", ids, real, mask, heads), rest], dim=1)
    return t.proj_out(t.norm_out(hs, temb))[:, :real_len]


def test_kontext_forward_matches_release_fp32(tmp_path):
    torch.manual_seed(0)
    bare = tiny_flux_transformer(seed=0, num_layers=DOUBLE, num_single_layers=SINGLE)
    hooked = copy.deepcopy(bare)
    sd = release_ke_state_dict(seed=3)
    _save(sd, tmp_path / "ke.safetensors")
    adapter = load_kontext_adapter(tmp_path / "ke.safetensors", "Ke", num_double_blocks=DOUBLE).float().eval()
    adapter.attach(hooked)
    real_len = (H // 16) * (W // 16)
    inputs = tiny_flux_inputs(batch=2, height=H, width=W, seed=5, extra_tokens=real_len)  # condition = same grid
    g = torch.Generator().manual_seed(9)
    arcface = torch.randn(2, 2, 512, generator=g) * 3  # raw (unnormalised) ArcFace scale, as insightface gives
    boxes = [[(16, 16, 80, 96), (112, 32, 176, 112)], [(0, 0, 48, 48), (96, 64, 190, 128)]]
    with torch.no_grad():
        want = rel_forward(bare, sd, inputs, arcface, boxes, real_len, W, H, HEADS, WIDTH_H)
        plain = hooked(**inputs)[0][:, :real_len]
        outs = {}
        for mode in ("sparse", "dense"):
            adapter.attention_mode = mode
            with adapter.identities(arcface=arcface, boxes=boxes, height=H, width=W, target_tokens=real_len):
                outs[mode] = hooked(**inputs)[0][:, :real_len]
    assert (want - plain).abs().max() > 0.05  # the identity residual matters at this scale
    for mode, got in outs.items():
        err = float((got - want).abs().max())
        assert err <= 1e-5, f"{mode}: max |ours − release| = {err:.2e}"

"""Low-VRAM settings (``withanyone.pipeline.memory``) on tiny models: every base / adapter format that runs on a
CPU keeps the adapter exact (hooks once per block, bare output bit-identical, identity residual close to the
unquantised one), offload combines with every format, single-file transformers (GGUF, fp8 safetensors) load
through ``--transformer-file`` and ``from_pretrained``, and nf4 without CUDA is one error line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from tiny_models.flux import tiny_flux_inputs
from tiny_models.pipeline import get_dummy_components, get_dummy_inputs, tiny_adapter, tiny_transformer
from tiny_models.quant_files import fp8_state_dict, gguf_dequantized, write_gguf

from withanyone.pipeline import WithAnyonePipeline
from withanyone.pipeline import memory as M

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning", "ignore::DeprecationWarning")
CUDA = torch.cuda.is_available()
#: Base formats that run here (nf4 needs CUDA + bitsandbytes).
CPU_BASES = ("fp8", "int8") + (("nf4",) if CUDA else ())
#: Relative error of the identity residual against the unquantised model's, per base format (tiny, fp32
#: compute): fp8 stores 3 mantissa bits, int8 per-channel 8 bits; measured 1.3 % and 0.2 %.
RESIDUAL_TOL = {"fp8": 0.08, "int8": 0.02, "nf4": 0.25}
#: The same for the adapter's formats (withanyone.model.quantize.quantize_adapter; measured 4.2 % and 0.7 %).
ADAPTER_TOL = {"fp8": 0.08, "int8": 0.02}
BOXES = [[(0, 0, 32, 32), (32, 32, 64, 64)]]
EMB = [np.random.RandomState(i).randn(512).astype(np.float32) * 20 for i in range(2)]


def _run(t, inputs):
    return t(**inputs)[0]


def _identity_run(t, adapter, inputs, arc):
    with adapter.identities(arcface=arc, boxes=BOXES, height=64, width=64, id_weight=3.0):
        return _run(t, inputs)


def _count_block_calls(adapter, monkeypatch):
    calls = [0] * len(adapter.ipa_arc)
    for i, attn in enumerate(adapter.ipa_arc):
        orig = attn.attend

        def counted(*args, _orig=orig, _i=i, **kwargs):
            calls[_i] += 1
            return _orig(*args, **kwargs)

        monkeypatch.setattr(attn, "attend", counted)
    return calls


def _residual_error(q_model, q_adapter, inputs, arc, ref_residual):
    bare = _run(q_model, inputs)
    residual = _identity_run(q_model, q_adapter, inputs, arc) - bare
    return float((residual - ref_residual).norm() / ref_residual.norm())


@pytest.fixture(scope="module")
def reference():
    """The unquantised tiny transformer + adapter: inputs, ArcFace tokens and the identity residual."""
    t = tiny_transformer()
    adapter = tiny_adapter(arcface_dim=512).attach(t)
    inputs = tiny_flux_inputs(height=64, width=64, seed=3)
    arc = torch.nn.functional.normalize(torch.randn(1, 2, 512, generator=torch.Generator().manual_seed(1)), dim=-1)
    with torch.no_grad():
        residual = _identity_run(t, adapter, inputs, arc) - _run(t, inputs)
    adapter.detach()
    assert residual.abs().max() > 1e-2
    return inputs, arc, residual


def test_presets_and_explicit_settings():
    assert set(M.PRESETS) == {"none", "model-offload", "group-offload", "nf4", "24gb", "16gb", "12gb", "8gb"}
    assert all(p.description and p.base in M.BASE_FORMATS and p.adapter in M.ADAPTER_FORMATS
               and p.offload in M.OFFLOADS for p in M.PRESETS.values())
    assert M.resolve_memory() is M.PRESETS["none"]
    assert M.resolve_memory(offload=True) is M.PRESETS["model-offload"]  # the old --offload flag
    assert M.resolve_memory(offload="group-offload") is M.PRESETS["group-offload"]
    assert M.resolve_memory(base_quantization="nf4", offload="model") is M.PRESETS["nf4"]
    custom = M.resolve_memory("12gb", base_quantization="fp8")
    assert (custom.name, custom.base, custom.adapter, custom.offload) == ("custom", "fp8", "int8", "model")
    assert "12gb with base fp8" in custom.description
    for kwargs, text in (({"preset": "4gb"}, "low-VRAM preset '4gb': choose from none"),
                         ({"base_quantization": "int4"}, "base quantization 'int4': choose from bf16, fp8"),
                         ({"adapter_quantization": "nf4"}, "adapter quantization 'nf4'"),
                         ({"offload": "sequential"}, "offload 'sequential': choose from none, model, group")):
        with pytest.raises(M.MemoryConfigError, match=text):
            M.resolve_memory(**kwargs)
    # the app shows the library's presets: no copy of its own
    from withanyone.app.models import PRESETS

    assert PRESETS is M.PRESETS


@pytest.mark.skipif(CUDA, reason="checks the CPU-only message")
def test_nf4_without_cuda_is_refused_before_loading(tmp_path):
    why = M.check_available(M.PRESETS["nf4"], "cpu")
    assert why.startswith("base format nf4 (preset nf4) needs a CUDA GPU") and "\n" not in why
    assert M.check_available(M.PRESETS["8gb"], "cpu")  # the 8gb preset too
    # ... unless a GGUF file replaces the base (the 12gb/8gb presets' alternative)
    (tmp_path / "q.gguf").write_bytes(b"GGUF")
    assert M.check_available(M.PRESETS["12gb"], "cpu", tmp_path / "q.gguf") is None
    assert "no such file" in M.check_available(M.PRESETS["none"], "cpu", tmp_path / "missing.gguf")
    assert "not a .gguf or .safetensors" in M.check_available(M.PRESETS["none"], "cpu", tmp_path / "x.bin")


@pytest.mark.parametrize("fmt", CPU_BASES)
def test_quantised_base_keeps_the_adapter_exact(fmt, reference, monkeypatch):
    """Hooks once per block; bare output bit-identical with the adapter attached; residual near the fp32 one."""
    inputs, arc, ref_residual = reference
    t = M.quantize_transformer(tiny_transformer(), fmt, compute_dtype=torch.float32)
    if fmt == "fp8":
        assert t.transformer_blocks[0].attn.to_q.weight.dtype == torch.float8_e4m3fn
    elif fmt == "int8":
        assert type(t.transformer_blocks[0].attn.to_q.weight).__name__ == "WeightQBytesTensor"
    adapter = tiny_adapter(arcface_dim=512)
    with torch.no_grad():
        bare = _run(t, inputs)
        adapter.attach(t)
        calls = _count_block_calls(adapter, monkeypatch)
        assert torch.equal(_run(t, inputs), bare)  # no identities: the quantised base's own output, bit for bit
        assert calls == [0, 0, 0, 0]
        with_ids = _identity_run(t, adapter, inputs, arc)
        assert calls == [1, 1, 1, 1]  # once per block (2 double + 2 single)
        err = float(((with_ids - bare) - ref_residual).norm() / ref_residual.norm())
    assert 0 < err <= RESIDUAL_TOL[fmt], err


@pytest.mark.parametrize("fmt", ["fp8", "int8"])
def test_quantised_adapter_keeps_the_hooks_exact(fmt, reference, monkeypatch):
    inputs, arc, ref_residual = reference
    t = tiny_transformer()
    adapter = M.quantize_adapter(tiny_adapter(arcface_dim=512), fmt, compute_dtype=torch.float32).attach(t)
    with torch.no_grad():
        bare = _run(t, inputs)
        adapter.detach()
        assert torch.equal(_run(t, inputs), bare)
        adapter.attach(t)
        calls = _count_block_calls(adapter, monkeypatch)
        err = _residual_error(t, adapter, inputs, arc, ref_residual)
    assert calls == [1, 1, 1, 1]
    assert 0 < err <= ADAPTER_TOL[fmt], err


def _tiny_pipe():
    p = WithAnyonePipeline(**get_dummy_components(), adapter=tiny_adapter())
    p.set_progress_bar_config(disable=True)
    return p


def _image(p, **kw):
    return p(**get_dummy_inputs(), references=EMB, id_weight=3.0, noise="cpu", **kw).images


@pytest.mark.parametrize("fmt", CPU_BASES)
def test_every_format_generates_under_every_offload(fmt):
    """Each base format (with adapter and T5 quantised as well) gives the same image placed whole, under model
    offload and under group offload (the CPU as the device, so the arithmetic is the same)."""
    images = {}
    for offload in M.OFFLOADS:
        p = _tiny_pipe()
        mem = M.resolve_memory(base_quantization=fmt, adapter_quantization="int8", offload=offload,
                               text_encoder_quantization="fp8" if fmt == "fp8" else "int8")
        M.apply_memory(p, mem, "cpu", compute_dtype=torch.float32, quantize_base=True)
        assert p.memory.offload == offload and p.adapter.attached
        images[offload] = _image(p)
    assert np.isfinite(images["none"]).all() and images["none"].std() > 0.01
    np.testing.assert_array_equal(images["model"], images["none"])
    np.testing.assert_array_equal(images["group"], images["none"])
    plain = _image(_tiny_pipe())
    assert 0 < np.abs(images["none"] - plain).max() < 0.5  # quantised: close to, not equal to, fp32


def _tiny_config():
    return dict(tiny_transformer().config)


@pytest.mark.parametrize("qtype", ["Q8_0", "Q5_1", "Q4_0"])
def test_gguf_file_loads_as_diffusers_reads_it(qtype, tmp_path):
    """A GGUF (diffusers key names; the ff.net.2 weights as K-quant Q4_K) loads quantised and computes with
    exactly the weights gguf-py dequantises; BFL key names load the same model."""
    from diffusers.quantizers.gguf.utils import GGUFParameter
    from test_model_bfl import to_bfl

    sd = tiny_transformer().state_dict()
    k_quant = tuple(n for n in sd if n.endswith("ff.net.2.weight"))
    path = tmp_path / f"tiny-{qtype}.gguf"
    types = write_gguf(path, sd, qtype, k_quant=k_quant)
    assert types["transformer_blocks.0.attn.to_q.weight"] == qtype and types[k_quant[0]] == "Q4_K"
    model = M.load_transformer_file(path, config=_tiny_config(), torch_dtype=torch.float32)
    w = model.transformer_blocks[0].attn.to_q.weight
    assert isinstance(w, GGUFParameter) and w.quant_type.name == qtype
    assert model.transformer_blocks[0].ff.net[2].weight.quant_type.name == "Q4_K"
    ref = gguf_dequantized(path)
    plain = tiny_transformer()
    plain.load_state_dict({n: ref[n].reshape(sd[n].shape) for n in sd})
    inputs = tiny_flux_inputs(height=64, width=64)
    with torch.no_grad():
        got, want = _run(model, inputs), _run(plain, inputs)
    assert float((got - want).norm() / want.norm()) < 1e-3  # (diffusers' K-quant dequant rounds in fp16)
    bfl_path = tmp_path / f"tiny-{qtype}-bfl.gguf"
    write_gguf(bfl_path, to_bfl(sd), qtype)
    bfl = M.load_transformer_file(bfl_path, config=_tiny_config(), torch_dtype=torch.float32)
    assert bfl.transformer_blocks[0].attn.to_q.weight.quant_type.name == qtype
    # quant blocks run along each row, so splitting BFL's fused rows gives the very weights of a diffusers file
    write_gguf(tmp_path / "same.gguf", sd, qtype)
    same = M.load_transformer_file(tmp_path / "same.gguf", config=_tiny_config(), torch_dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(_run(bfl, inputs), _run(same, inputs), rtol=1e-6, atol=1e-6)


def _save_fp8_bfl(path):
    from safetensors.torch import save_file
    from test_model_bfl import to_bfl

    sd = fp8_state_dict(to_bfl(tiny_transformer().state_dict()))
    save_file(sd, str(path))
    return sd


def test_fp8_safetensors_in_bfl_layout_stays_fp8(tmp_path):
    path = tmp_path / "flux1-tiny-fp8.safetensors"
    _save_fp8_bfl(path)
    model = M.load_transformer_file(path, torch_dtype=torch.float32)
    assert model.transformer_blocks[0].attn.to_q.weight.dtype == torch.float8_e4m3fn  # no upcast copy
    assert model.transformer_blocks[0].attn.norm_q.weight.dtype == torch.float32
    # the reference: the file's values in a plain fp32 model, then fp8 layerwise casting (which stores the cast
    # layers' biases in fp8 too)
    rounded = tiny_transformer()
    rounded.load_state_dict({k: v.to(torch.float8_e4m3fn).float() if v.ndim == 2 else v.to(torch.bfloat16).float()
                             for k, v in rounded.state_dict().items()})
    M.quantize_transformer(rounded, "fp8", compute_dtype=torch.float32)
    inputs = tiny_flux_inputs(height=64, width=64)
    with torch.no_grad():
        torch.testing.assert_close(_run(model, inputs), _run(rounded, inputs), rtol=1e-6, atol=1e-6)


def _cli(args):
    from typer.testing import CliRunner

    from withanyone.cli import app

    return CliRunner().invoke(app, args)


@pytest.fixture
def emb_ref(tmp_path):
    np.save(tmp_path / "p0.npy", np.random.RandomState(0).randn(128).astype(np.float32))
    return ["generate", "--tiny", "--prompt", "a photo of a person", "--ref", str(tmp_path / "p0.npy"),
            "--seed", "5", "--no-progress"]


def test_generate_tiny_reads_gguf_and_fp8_files(tmp_path, emb_ref):
    write_gguf(tmp_path / "t.gguf", tiny_transformer().state_dict(), "Q8_0")
    _save_fp8_bfl(tmp_path / "t-fp8.safetensors")
    outs = {}
    for name in ("t.gguf", "t-fp8.safetensors", None):
        out = tmp_path / f"{name or 'plain'}.png"
        extra = ["--transformer-file", str(tmp_path / name)] if name else []
        if name == "t.gguf":  # a GGUF keeps its own format; the budget preset still sets adapter + offload
            extra += ["--low-vram", "16gb", "--adapter-quantization", "int8"]
        res = _cli(emb_ref + ["--out", str(out), "--steps", "2"] + extra)
        assert res.exit_code == 0, res.output + repr(res.exception)
        side = json.loads(out.with_suffix(".json").read_text())
        if name:
            assert side["models"]["transformer_file"]["path"] == str((tmp_path / name).resolve())
        outs[name] = np.asarray(__import__("PIL.Image").Image.open(out)).astype(int)
        if name == "t.gguf":
            assert side["memory"] == {"preset": "custom", "base": "fp8", "adapter": "int8", "text_encoder": "bf16",
                                      "offload": "model"} and side["offload"] == "model"
    for name in ("t.gguf", "t-fp8.safetensors"):  # the quantised files draw nearly the fp32 picture
        assert 0 < np.abs(outs[name] - outs[None]).mean() < 8, name


@pytest.mark.skipif(CUDA, reason="checks the CPU-only message")
@pytest.mark.parametrize("args", [["--low-vram", "nf4"], ["--base-quantization", "nf4"], ["--low-vram", "8gb"]])
def test_nf4_on_cpu_is_one_line_exit_1(args, emb_ref, tmp_path, monkeypatch):
    def touched(*a, **k):
        raise AssertionError("a model was built before the memory settings were checked")

    monkeypatch.setattr("withanyone.pipeline.tiny.tiny_pipeline", touched)
    monkeypatch.setattr(WithAnyonePipeline, "from_pretrained", touched)
    for extra in ([], ["--base", str(tmp_path / "no-flux")]):
        res = _cli([a for a in emb_ref if a != "--tiny" or not extra] + args + extra)
        assert res.exit_code == 1 and isinstance(res.exception, SystemExit), (res.output, res.exception)
        lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and "base format nf4" in lines[0] and "needs a CUDA GPU" in lines[0], res.stderr
        assert "Traceback" not in res.output


def test_bad_transformer_file_is_one_line(tmp_path, emb_ref):
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all")
    res = _cli(emb_ref + ["--transformer-file", str(tmp_path / "junk.gguf"), "--out", str(tmp_path / "o.png")])
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert f"--transformer-file {tmp_path / 'junk.gguf'}" in " ".join(res.stderr.split())


def test_from_pretrained_takes_the_memory_settings(tmp_path):
    """A saved tiny base + fp8 single file through the Python API, adapter int8, group offload on the CPU."""
    from diffusers import FluxPipeline

    FluxPipeline(**get_dummy_components()).save_pretrained(tmp_path / "flux")
    tiny_adapter().save_pretrained(tmp_path / "adapter")
    _save_fp8_bfl(tmp_path / "t-fp8.safetensors")
    pipe = WithAnyonePipeline.from_pretrained(tmp_path / "flux", adapter=tmp_path / "adapter", siglip=None,
                                              face_pack=None, torch_dtype=torch.float32, adapter_quantization="int8",
                                              transformer_file=tmp_path / "t-fp8.safetensors", offload="group",
                                              device="cpu")
    assert pipe.memory.adapter == "int8" and pipe.memory.offload == "group"
    assert pipe.transformer.transformer_blocks[0].attn.to_q.weight.dtype == torch.float8_e4m3fn
    assert pipe.adapter.attached and pipe.model_sources["transformer_file"]
    pipe.set_progress_bar_config(disable=True)
    assert np.isfinite(_image(pipe)).all()
    with pytest.raises(M.MemoryConfigError, match="base format nf4") if not CUDA else pytest.raises(Exception):
        WithAnyonePipeline.from_pretrained(tmp_path / "no-flux", low_vram="nf4", device="cpu")


@pytest.mark.skipif(CUDA, reason="checks the CPU-only message")
def test_bench_generate_takes_the_same_options(tmp_path):
    """bench generate: a bad setting is one line before the benchmark loads; a preset reaches the workers' pipe."""
    from withanyone.bench.generate import MethodSpec, PipelineMethod

    for args, text in ((["--low-vram", "nf4"], "base format nf4"), (["--offload", "sequential"], "offload 'sequential'"),
                       (["--transformer-file", str(tmp_path / "none.gguf")], "no such file")):
        res = _cli(["bench", "generate", str(tmp_path / "no-bench"), "--method", "m", "--tiny"] + args)
        assert res.exit_code == 1 and "Traceback" not in res.output, res.output
        assert text in res.stderr and "no-bench" not in res.stderr, res.stderr
    method = PipelineMethod(MethodSpec(tiny=True, device="cpu", memory={"low_vram": "16gb"}))
    assert method.pipe.memory is M.PRESETS["16gb"]
    assert method.pipe.transformer.transformer_blocks[0].attn.to_q.weight.dtype == torch.float8_e4m3fn
    from withanyone.model.quantize import adapter_format

    assert adapter_format(method.pipe.adapter) == "fp8"


@pytest.mark.skipif(CUDA, reason="checks the CPU behaviour")
def test_app_loads_the_budget_presets_and_refuses_nf4():
    from withanyone.app.models import LoadOptions, load_models
    from withanyone.app.ui import banner

    models = load_models(LoadOptions(tiny=True, device="cpu", low_vram="16gb"))
    assert models.ready and models.preset == "16gb" and models.notes == ["offload of preset 16gb skipped on CPU"]
    assert models.pipe.transformer.transformer_blocks[0].attn.to_q.weight.dtype == torch.float8_e4m3fn
    assert M.PRESETS["16gb"].description in banner(models)
    refused = load_models(LoadOptions(tiny=True, device="cpu", low_vram="nf4"))
    assert not refused.ready and refused.error.startswith("base format nf4 (preset nf4) needs a CUDA GPU")


@pytest.mark.skipif(CUDA, reason="checks the CPU-only message")
def test_a_file_in_its_own_format_replaces_nf4(tmp_path):
    """12gb/8gb with a GGUF or fp8 file need no CUDA; a full-precision file would be stored as nf4: refused."""
    from safetensors.torch import save_file

    _save_fp8_bfl(tmp_path / "fp8.safetensors")
    save_file({"img_in.weight": torch.zeros(2, 2)}, str(tmp_path / "full.safetensors"))
    assert M.check_available(M.PRESETS["8gb"], "cpu", tmp_path / "fp8.safetensors") is None
    assert "base format nf4" in M.check_available(M.PRESETS["8gb"], "cpu", tmp_path / "full.safetensors")

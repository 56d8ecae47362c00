"""CLIP-I / CLIP-T, aesthetics and Fréchet distance: computed with tiny random-weight models saved in the real
formats and loaded by path exactly like hub ids; reported as "not computed: <reason>" when weights are missing."""

from __future__ import annotations

import json
import string
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from withanyone.bench.aesthetics import AestheticScorer  # noqa: E402
from withanyone.bench.clip_metrics import DEFAULT_CLIP, ClipScorer  # noqa: E402
from withanyone.bench.fid import frechet_distance  # noqa: E402
from withanyone.bench.samples import Sample  # noqa: E402


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> Path:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    d = tmp_path_factory.mktemp("tiny_clip")
    toks = ["<|startoftext|>", "<|endoftext|>"] + list(string.ascii_lowercase) + [
        c + "</w>" for c in string.ascii_lowercase]
    (d / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(toks)}))
    (d / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(vocab=str(d / "vocab.json"), merges=str(d / "merges.txt"), model_max_length=77)
    torch.manual_seed(0)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(toks), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77, eos_token_id=1, bos_token_id=0,
                         pad_token_id=1),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                           num_attention_heads=4),
        projection_dim=16)
    CLIPModel(cfg).eval().save_pretrained(d)
    ip = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=ip, tokenizer=tok).save_pretrained(d)
    return d


def test_clip_scores_from_a_saved_model(tiny_clip, samples_dir):
    c = ClipScorer(str(tiny_clip))
    assert c.available, c.reason
    s = Sample("x", "a photo of obama", [samples_dir / "obama/2.jpg"], gt=samples_dir / "obama/1.jpg")
    same = c.score(s, samples_dir / "obama/1.jpg")
    other = c.score(s, samples_dir / "group/4.jpg")
    assert same["clip_i"] == pytest.approx(1.0, abs=1e-5)
    assert other["clip_i"] < 0.9999 and -1 <= other["clip_t"] <= 1
    # CLIP-T against an independent computation with the transformers model
    from transformers import CLIPModel, CLIPProcessor

    from withanyone.faces import load_image

    m, p = CLIPModel.from_pretrained(tiny_clip).eval(), CLIPProcessor.from_pretrained(tiny_clip)
    with torch.no_grad():
        inp = p(text=["a photo of obama"], images=[load_image(samples_dir / "group/4.jpg")], return_tensors="pt",
                padding=True)
        out = m(**inp)
    ref = torch.nn.functional.cosine_similarity(out.image_embeds, out.text_embeds).item()
    assert other["clip_t"] == pytest.approx(ref, abs=1e-5)


def test_clip_not_computed_reasons(tmp_path):
    c = ClipScorer(DEFAULT_CLIP, offline=True)  # not in the local cache, no download attempted
    assert not c.available and DEFAULT_CLIP in c.reason and "not in the local Hugging Face cache" in c.reason
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    c = ClipScorer(str(broken), offline=True)
    assert not c.available and "could not be loaded" in c.reason and "broken" in c.reason
    a = AestheticScorer("google/siglip-so400m-patch14-384")
    assert not a.available and "no aesthetic head" in a.reason


def test_aesthetic_head_from_safetensors(tmp_path, samples_dir):
    from safetensors.torch import save_file
    from transformers import SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(1)
    vm = SiglipVisionModel(SiglipVisionConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=37,
                                              num_hidden_layers=1, num_attention_heads=4)).eval()
    vm.save_pretrained(tmp_path / "siglip")
    SiglipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tmp_path / "siglip")
    dims = [32, 24, 16, 8, 4, 1]
    head = torch.nn.Sequential(*[m for i in range(5) for m in (torch.nn.Linear(dims[i], dims[i + 1]),
                                                               torch.nn.Dropout(0.5))][:-1]).eval()
    save_file({f"scoring_head.{k}": v.contiguous() for k, v in head.state_dict().items()},
              str(tmp_path / "head.safetensors"))
    a = AestheticScorer(str(tmp_path / "siglip"), tmp_path / "head.safetensors")
    assert a.available, a.reason
    got = a.score(None, samples_dir / "obama/1.jpg")["aesthetic"]
    from withanyone.faces import load_image

    proc = SiglipImageProcessor.from_pretrained(tmp_path / "siglip")
    with torch.no_grad():
        emb = vm(pixel_values=proc(images=[load_image(samples_dir / "obama/1.jpg")],
                                   return_tensors="pt")["pixel_values"]).pooler_output
        ref = head(emb / emb.norm(dim=-1, keepdim=True)).item()
    assert got == pytest.approx(ref, abs=1e-5)


def test_frechet_distance_closed_form():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(400, 3))
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    shift = np.array([1.0, -2.0, 0.5])
    assert frechet_distance(a, a + shift) == pytest.approx(float(shift @ shift), abs=1e-6)
    # isotropic Gaussians N(0, I) vs N(0, 4I) in d dims: d·(1 + 4 − 2·2) = d
    big = rng.normal(size=(20000, 3))
    assert frechet_distance(big, 2 * rng.normal(size=(20000, 3))) == pytest.approx(3.0, rel=0.05)
    with pytest.raises(ValueError, match="at least 2"):
        frechet_distance(a[:1], a)


def test_run_with_and_without_clip_reports(tiny_clip, samples_dir, tmp_path):
    from withanyone.bench.report import write_reports
    from withanyone.bench.runner import run_benchmark
    from withanyone.bench.samples import Benchmark, MethodOutputs

    s = samples_dir
    bench = Benchmark("tiny", [Sample(p, f"photo of {p}", [s / p / "2.jpg"], gt=s / p / "1.jpg")
                               for p in ("obama", "biden", "newton")])
    meth = MethodOutputs("copy", {p: s / p / "3.jpg" if (s / p / "3.jpg").is_file() else s / p / "1.jpg"
                                  for p in ("obama", "biden", "newton")})
    summary = None
    out = tmp_path / "with"
    run_benchmark(bench, [meth], out, image_metrics=[ClipScorer(str(tiny_clip))], progress=False)
    summary = write_reports(out, gallery=False)
    e = summary["leaderboard"]["p1"]["dlib"]["copy"]
    assert e["clip_i"]["n"] == 3 and e["clip_t"]["n"] == 3
    assert "clip_i" not in summary["not_computed"] and summary["fid"]["fd"]["p1"]["copy"] >= 0
    out2 = tmp_path / "without"
    run_benchmark(bench, [meth], out2, image_metrics=[ClipScorer(str(tmp_path / "nope"), offline=True)],
                  progress=False)
    summary2 = write_reports(out2, gallery=False)
    assert summary2["leaderboard"]["p1"]["dlib"]["copy"]["clip_i"] is None
    assert summary2["not_computed"]["clip_i"].startswith("not computed: CLIP weights")
    md = (out2 / "report.md").read_text()
    assert "CLIP-I: not computed: CLIP weights" in md and "FID: not computed" in md

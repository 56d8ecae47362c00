"""Tiny, seeded, offline pipeline components in the real classes (diffusers-test style): VAE, CLIP + T5 with
tiny tokenizers, a FLUX-dev scheduler, a tiny SigLIP vision tower, a tiny transformer and adapter.

They power ``--tiny`` in the CLI and the app (the whole generate → score loop without weights: images are
noise from a random model) and the test suite.

Every builder is deterministic (``torch.manual_seed`` before each module) so two calls give identical
weights, in eval mode (no dropout). Sizes follow the facts sheet §5 recipes; the transformer has width 192 (3 heads × 64).
"""

from __future__ import annotations

from typing import Any

import torch

#: Width of the tiny transformer (3 heads × 64) and its text/pooled widths.
TINY_WIDTH = 192
TINY_HEADS = 3
TINY_TEXT_DIM = 64
TINY_POOLED_DIM = 32
#: Tiny SigLIP: 32×32 input with 2×2 patches → 256 tokens (as the real model's 256), hidden 32.
TINY_SIGLIP_DIM = 32
TINY_ARCFACE_DIM = 512


def tiny_transformer(seed: int = 0):
    """A 2 double + 2 single block FLUX transformer of width 192."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    return FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=2, num_single_layers=2, attention_head_dim=64,
        num_attention_heads=TINY_HEADS, joint_attention_dim=TINY_TEXT_DIM, pooled_projection_dim=TINY_POOLED_DIM,
        guidance_embeds=True, axes_dims_rope=(8, 28, 28),
    ).eval()


def tiny_vae(seed: int = 0):
    """An AutoencoderKL with 4 levels of 16 channels and 16 latent channels (scale factor 8, like FLUX)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(16, 16, 16, 16), layers_per_block=1, latent_channels=16, norm_num_groups=8,
        sample_size=32, use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035,
    ).eval()


_CLIP_VOCAB = ["<|startoftext|>", "<|endoftext|>", "!", "a</w>", "p", "e", "r", "s", "o", "n", "pe", "per",
               "person</w>", "people</w>", "two</w>", "photo</w>", "of</w>", "the</w>", "in</w>", "park</w>",
               "man</w>", "woman</w>", "and</w>", "at</w>", "beach</w>", "smiling</w>", ","]
_T5_WORDS = ["a", "person", "people", "two", "photo", "of", "the", "in", "park", "man", "woman", "and", "at",
             "beach", "smiling", ","]


def tiny_tokenizers():
    """A CLIP BPE tokenizer and a T5 unigram tokenizer over a few dozen words, built in memory."""
    from transformers import CLIPTokenizer, T5TokenizerFast

    vocab = {tok: i for i, tok in enumerate(_CLIP_VOCAB)}
    clip_tok = CLIPTokenizer(vocab=vocab, merges=[("p", "e"), ("pe", "r")], model_max_length=77)
    t5_vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(f"▁{w}", -2.0 - i * 0.01)
                                                                  for i, w in enumerate(_T5_WORDS)]
    t5_tok = T5TokenizerFast(vocab=t5_vocab, extra_ids=0)
    return clip_tok, t5_tok


def tiny_text_encoders(seed: int = 0):
    """A tiny CLIPTextModel (hidden 32, pooled 32) and T5EncoderModel (d_model 64)."""
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    clip = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(_CLIP_VOCAB), hidden_size=TINY_POOLED_DIM, projection_dim=TINY_POOLED_DIM,
        intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
        bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_act="gelu",
    )).eval()
    torch.manual_seed(seed)
    t5 = T5EncoderModel(T5Config(
        vocab_size=3 + len(_T5_WORDS), d_model=TINY_TEXT_DIM, d_kv=16, d_ff=37, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )).eval()
    return clip, t5


def tiny_scheduler():
    """FLUX-dev's flow-matching scheduler settings (dynamic time shift 0.5 → 1.15)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                           base_image_seq_len=256, max_image_seq_len=4096)


def tiny_siglip(seed: int = 0):
    """A tiny SiglipVisionModel (32×32 input, 2×2 patches → 256 tokens of width 32) and its processor."""
    from transformers import SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(seed)
    model = SiglipVisionModel(SiglipVisionConfig(
        hidden_size=TINY_SIGLIP_DIM, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        image_size=32, patch_size=2, num_channels=3,
    )).eval()
    processor = SiglipImageProcessor(size={"height": 32, "width": 32}, do_resize=True, do_rescale=True,
                                     do_normalize=True, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    return model, processor


def tiny_adapter(seed: int = 0, use_siglip: bool = True, arcface_dim: int = TINY_ARCFACE_DIM):
    """A random-weight WithAnyone adapter matching :func:`tiny_transformer` and :func:`tiny_siglip`."""
    from ..model import WithAnyoneAdapter

    torch.manual_seed(seed)
    return WithAnyoneAdapter(num_double_blocks=2, num_single_blocks=2, hidden_size=TINY_WIDTH, num_heads=TINY_HEADS,
                             head_dim=64, arcface_dim=arcface_dim, siglip_dim=TINY_SIGLIP_DIM,
                             num_arc_tokens=8, use_siglip=use_siglip).eval()


def get_dummy_components(seed: int = 0) -> dict[str, Any]:
    """Every FluxPipeline component, tiny and seeded: scheduler, vae, text encoders, tokenizers, transformer."""
    clip, t5 = tiny_text_encoders(seed)
    clip_tok, t5_tok = tiny_tokenizers()
    return {
        "scheduler": tiny_scheduler(),
        "vae": tiny_vae(seed),
        "text_encoder": clip,
        "tokenizer": clip_tok,
        "text_encoder_2": t5,
        "tokenizer_2": t5_tok,
        "transformer": tiny_transformer(seed),
    }


def get_dummy_inputs(seed: int = 0, **overrides: Any) -> dict[str, Any]:
    """Plain FluxPipeline call arguments: 2 steps, 64×64, fixed generator, numpy output."""
    inputs: dict[str, Any] = {
        "prompt": "a photo of two people in the park",
        "height": 64, "width": 64, "num_inference_steps": 2, "guidance_scale": 4.0,
        "generator": torch.Generator("cpu").manual_seed(seed), "output_type": "np", "max_sequence_length": 16,
    }
    inputs.update(overrides)
    return inputs


def tiny_pipeline(seed: int = 0, face_analyzer: Any = "dlib"):
    """A complete ``WithAnyonePipeline`` of tiny random components that runs offline on real photos.

    The adapter takes ``face_analyzer``'s embedding width (dlib: 128-d, offline; an insightface pack: 512-d),
    so reference photos are detected and embedded for real; the images are noise from a random model.
    ``face_analyzer`` is a ``FaceAnalyzer`` or a backend name for one.
    """
    from ..faces import FaceAnalyzer
    from .pipeline import WithAnyonePipeline

    analyzer = FaceAnalyzer(face_analyzer) if isinstance(face_analyzer, str) else face_analyzer
    dim = int(analyzer.embedding_dim)
    pipe = WithAnyonePipeline(**get_dummy_components(seed), adapter=tiny_adapter(seed, arcface_dim=dim))
    pipe.set_face_analyzer(analyzer)
    pipe.set_siglip(lambda: tiny_siglip(seed))
    pipe.model_sources = {"tiny": {"seed": seed, "note": "tiny random components: images are noise"}}
    return pipe


def tiny_kontext_adapter(seed: int = 0, variant: str = "Ke", arcface_dim: int = TINY_ARCFACE_DIM):
    """A random-weight adapter for :func:`tiny_kontext_pipeline`: ArcFace-only for Ke (as the release's edit model),
    with the SigLIP branch for K."""
    adapter = tiny_adapter(seed, use_siglip=variant == "K", arcface_dim=arcface_dim)
    adapter.kontext_variant = variant
    return adapter


def write_tiny_kontext_checkpoint(path: Any, seed: int = 0, variant: str = "Ke",
                                  arcface_dim: int = TINY_ARCFACE_DIM) -> Any:
    """Write :func:`tiny_kontext_adapter`'s weights as a release-layout safetensors file (Ke: the Kontext-edit
    layout ``ipa.{i}`` / ``arcface_in``; K: the FLUX layout); returns the path."""
    from ..model.checkpoint import save_state_dict
    from ..model.kontext import to_release_kontext_state_dict

    adapter = tiny_kontext_adapter(seed, variant, arcface_dim)
    sd = to_release_kontext_state_dict(adapter) if variant == "Ke" else adapter.to_authors_state_dict()
    return save_state_dict(sd, path, metadata={"format": "pt", "source": "withanyone-tiny"})


def tiny_kontext_pipeline(seed: int = 0, face_analyzer: Any = "dlib", variant: str = "Ke"):
    """A complete ``WithAnyoneKontextPipeline`` of tiny random components (the FLUX ones, which
    ``FluxKontextPipeline`` shares) that edits real photos offline; images are noise from a random model."""
    from ..faces import FaceAnalyzer
    from .kontext import WithAnyoneKontextPipeline

    analyzer = FaceAnalyzer(face_analyzer) if isinstance(face_analyzer, str) else face_analyzer
    dim = int(analyzer.embedding_dim)
    pipe = WithAnyoneKontextPipeline(**get_dummy_components(seed),
                                     adapter=tiny_kontext_adapter(seed, variant, arcface_dim=dim))
    pipe.set_face_analyzer(analyzer)
    if variant == "K":
        pipe.set_siglip(lambda: tiny_siglip(seed))
    pipe.kontext_variant = variant
    pipe.model_sources = {"tiny": {"seed": seed, "variant": variant,
                                   "note": "tiny random components: images are noise"}}
    return pipe


def write_tiny_kontext_files(folder: Any, seed: int = 0, variant: str = "Ke",
                             arcface_dim: int = TINY_ARCFACE_DIM) -> tuple[Any, Any]:
    """Write a tiny FLUX.1-Kontext base in diffusers' layout (``folder/base``) and a tiny K/Ke adapter file in the
    release layout under its assumed hub name (``folder/adapter/``); returns (base folder, adapter file), ready for
    ``WithAnyoneKontextPipeline.from_pretrained(base, adapter=file, variant=variant)``."""
    from pathlib import Path

    from diffusers import FluxKontextPipeline

    from ..model.kontext import KONTEXT_FILES

    root = Path(folder)
    base = root / "base"
    FluxKontextPipeline(**get_dummy_components(seed)).save_pretrained(base)
    adapter = write_tiny_kontext_checkpoint(root / "adapter" / KONTEXT_FILES[variant], seed, variant, arcface_dim)
    return base, adapter

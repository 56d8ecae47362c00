"""Tiny pipeline components for tests: the library's own builders (``withanyone.pipeline.tiny``)."""

from withanyone.pipeline.tiny import (  # noqa: F401
    TINY_ARCFACE_DIM,
    TINY_HEADS,
    TINY_POOLED_DIM,
    TINY_SIGLIP_DIM,
    TINY_TEXT_DIM,
    TINY_WIDTH,
    get_dummy_components,
    get_dummy_inputs,
    tiny_adapter,
    tiny_pipeline,
    tiny_scheduler,
    tiny_siglip,
    tiny_text_encoders,
    tiny_tokenizers,
    tiny_transformer,
    tiny_vae,
)

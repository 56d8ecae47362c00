"""The WithAnyone identity adapter on diffusers' FLUX: token encoders, box masks, ID cross-attention, checkpoints."""

from withanyone.model.adapter import IdentityInputError, WithAnyoneAdapter
from withanyone.model.attention import IdentityCrossAttention
from withanyone.model.bfl import load_bfl_single_file, load_bfl_transformer
from withanyone.model.checkpoint import CheckpointError, LoadReport, split_authors_state_dict
from withanyone.model.encoders import ArcFaceTokenEncoder, SiglipTokenEncoder
from withanyone.model.kontext import load_kontext_adapter
from withanyone.model.masks import InvalidBoxError, box_coverage, build_identity_mask, token_grid

__all__ = [
    "WithAnyoneAdapter",
    "IdentityInputError",
    "IdentityCrossAttention",
    "ArcFaceTokenEncoder",
    "SiglipTokenEncoder",
    "CheckpointError",
    "LoadReport",
    "split_authors_state_dict",
    "load_kontext_adapter",
    "load_bfl_transformer",
    "load_bfl_single_file",
    "InvalidBoxError",
    "box_coverage",
    "build_identity_mask",
    "token_grid",
]

"""Generation: ``WithAnyonePipeline`` (FLUX + identity adapter), reference preparation, face-box layouts."""

from .layout import Box, auto_boxes, boxes_from_layout, resolve_boxes, validate_boxes
from .references import Reference, ReferenceError, prepare_reference, prepare_references, square_crop

__all__ = [
    "Box", "Reference", "ReferenceError", "WithAnyonePipeline", "WithAnyonePipelineOutput", "auto_boxes",
    "boxes_from_layout", "prepare_reference", "prepare_references", "resolve_boxes", "square_crop", "validate_boxes",
    "WithAnyoneKontextPipeline", "WithAnyoneKontextPipelineOutput",
]


def __getattr__(name: str):
    """Import the torch-heavy pipeline only when it is asked for."""
    if name in ("WithAnyonePipeline", "WithAnyonePipelineOutput"):
        from . import pipeline

        return getattr(pipeline, name)
    if name in ("WithAnyoneKontextPipeline", "WithAnyoneKontextPipelineOutput"):
        from . import kontext

        return getattr(kontext, name)
    raise AttributeError(name)

"""WithAnyone inside ComfyUI: patches for ComfyUI's own FLUX model and the node classes of the pack.

The library side imports without ComfyUI (the patches and types need only torch); the nodes import ComfyUI's
modules when they run. The custom-node entry folder is ``comfyui/`` at the repository root.
"""

from .patch import AdapterModule, BlockPatch, WithAnyonePatch, apply_withanyone, resolve_adapter
from .types import BOXES, PERSON, FaceBoxes, Person

__all__ = ["AdapterModule", "BOXES", "BlockPatch", "FaceBoxes", "PERSON", "Person", "WithAnyonePatch",
           "apply_withanyone", "resolve_adapter"]

"""Lets a CUDA-linked PyPI torchvision import on a CPU torch by defining the two op schemas it registers fakes for.

torchvision's ``_meta_registrations`` calls ``torch.library.register_fake("torchvision::nms")`` (and ``qnms``) at
import; when its C extension cannot load (CUDA build on a CPU-only torch) those operators do not exist and the import
fails with "operator torchvision::nms does not exist". Defining the schemas first lets the import go through; the ops
themselves stay unimplemented (ComfyUI never calls them on the paths we test).
"""

from __future__ import annotations

import torch

_LIB: torch.library.Library | None = None


def install() -> None:
    """Define ``torchvision::nms`` / ``torchvision::qnms`` unless torchvision's own extension already did."""
    global _LIB
    if _LIB is not None:
        return
    try:
        torch._C._dispatch_find_schema_or_throw("torchvision::nms", "")
        return  # the real extension (or an earlier shim) is loaded
    except RuntimeError:
        pass
    _LIB = torch.library.Library("torchvision", "DEF")  # kept alive: the schemas vanish with the object
    _LIB.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _LIB.define("qnms(Tensor qdets, Tensor qscores, float iou_threshold) -> Tensor")


install()

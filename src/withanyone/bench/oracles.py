"""Oracle methods for ``bench generate --pipeline``: outputs whose scores are known, to check a setup.

Each follows the callable contract (:class:`~withanyone.bench.generate.GenerationSample` → PIL image):

* ``withanyone.bench.oracles:gt_copy`` — the GT photo itself: Sim(GT) = 1, CP = −1 (exact normalisation);
* ``withanyone.bench.oracles:reference_copy`` — the references as the benchmark detects them (each padded to
  its black square; several people side by side, laid out by
  :func:`~withanyone.bench.calibration.faithful_side_by_side` so the detector sees each face as in its own
  square): CP = +1 for one and for several people (exact normalisation, dlib), as long as the padded squares
  side by side fit the face model's detector unscaled (dlib: 1024 px; larger references are downscaled
  by the detector and score a little below +1).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from PIL import Image

from .generate import GenerationSample


def gt_copy(sample: GenerationSample) -> Image.Image:
    """The sample's ground-truth photo (an oracle: a real method never sees it)."""
    from ..faces import load_image

    if not sample.gt:
        raise ValueError(f"sample {sample.id} has no GT photo")
    return Image.fromarray(load_image(sample.gt))


@lru_cache(maxsize=1)
def _layout_analyzer() -> Any:
    """The face model the multi-person layout is checked with (the bundled dlib stack), loaded once."""
    from ..faces import FaceAnalyzer

    return FaceAnalyzer("dlib")


def reference_copy(sample: GenerationSample) -> Image.Image:
    """The references padded to black squares (1.5× their longer side); several people side by side at the
    gap where the detector sees each face exactly as in its own padded square."""
    from .cache import REF_PAD
    from .calibration import faithful_side_by_side, side_by_side

    refs = list(sample.references)
    if len(refs) <= 1:
        return Image.fromarray(side_by_side(refs, pad=REF_PAD))
    return Image.fromarray(faithful_side_by_side(refs, _layout_analyzer(), pad=REF_PAD))

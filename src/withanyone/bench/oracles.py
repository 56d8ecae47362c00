"""Oracle methods for ``bench generate --pipeline``: outputs whose scores are known, to check a setup.

Each follows the callable contract (:class:`~withanyone.bench.generate.GenerationSample` → PIL image):

* ``withanyone.bench.oracles:gt_copy`` — the GT photo itself: Sim(GT) = 1, CP = −1 (exact normalisation);
* ``withanyone.bench.oracles:reference_copy`` — the references as the benchmark detects them (each padded to
  its black square, side by side for several people): CP = +1 for one person.
"""

from __future__ import annotations

from PIL import Image

from .generate import GenerationSample


def gt_copy(sample: GenerationSample) -> Image.Image:
    """The sample's ground-truth photo (an oracle: a real method never sees it)."""
    from ..faces import load_image

    if not sample.gt:
        raise ValueError(f"sample {sample.id} has no GT photo")
    return Image.fromarray(load_image(sample.gt))


def reference_copy(sample: GenerationSample) -> Image.Image:
    """The references padded to black squares (1.5× their longer side) and placed side by side."""
    from .cache import REF_PAD
    from .calibration import side_by_side

    return Image.fromarray(side_by_side(list(sample.references), pad=REF_PAD))

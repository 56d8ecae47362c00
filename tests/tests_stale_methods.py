"""Test methods for ``bench generate --pipeline`` (imported by name from tests/)."""

from __future__ import annotations

import numpy as np
from PIL import Image


class SeedNoise:
    """Noise drawn from the sample's seed at the requested size (fast, deterministic)."""

    def __call__(self, sample) -> Image.Image:
        rng = np.random.default_rng(sample.seed)
        return Image.fromarray(rng.integers(0, 256, (sample.height, sample.width, 3), dtype=np.uint8))


def always_fails(sample) -> Image.Image:
    """A method whose every sample raises."""
    raise RuntimeError(f"cannot draw {sample.id}")


class SlowNoise(SeedNoise):
    """:class:`SeedNoise` taking a second per sample (time to kill a run in the middle)."""

    def __call__(self, sample) -> Image.Image:
        import time

        time.sleep(1.0)
        return super().__call__(sample)

"""``withanyone.pipeline.tiny``: the offline tiny pipeline behind ``--tiny`` runs on real photos end to end."""

from __future__ import annotations

import numpy as np


def test_tiny_pipeline_generates_from_real_photos(samples_dir):
    from withanyone.pipeline.tiny import tiny_pipeline

    pipe = tiny_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)
    refs = [samples_dir / "obama" / "1.jpg", samples_dir / "biden" / "1.jpg"]
    kw = dict(references=refs, height=64, width=96, num_inference_steps=2, max_sequence_length=16, output_type="np")
    a = pipe("two people at the beach", seed=3, **kw)
    b = pipe("two people at the beach", seed=3, **kw)
    c = pipe("two people at the beach", seed=3, id_weight=0.0, **kw)
    assert a.images.shape == (1, 64, 96, 3)
    assert a.arcface.shape == (2, 128) and len(a.boxes) == 2
    np.testing.assert_array_equal(a.images, b.images)  # same seed, same picture
    assert np.abs(a.images - c.images).max() > 1e-3    # the identities change the picture

"""Aspect-ratio buckets: photos crop to the bucket nearest their shape with faces kept, every batch holds
one bucket, a tiny training run steps on two shapes, and resume with pending bucket queues stays exact."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

pytest.importorskip("kornia")
pytest.importorskip("webdataset")

from test_train_fixtures import tiny_components, tiny_config, tiny_multiid  # noqa: E402

from withanyone.train.data import (  # noqa: E402
    MultiIDTrainDataset,
    aspect_buckets,
    batch_loader,
    bucket_crop,
    nearest_bucket,
)
from withanyone.train.loop import load_checkpoint, train  # noqa: E402


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state()
    GradientState._reset_state()
    yield


def test_bucket_sizes_are_multiples_of_16_near_the_area():
    b = aspect_buckets(512)
    assert b[0] == (512, 512) and len(b) == 7
    for h, w in b:
        assert h % 16 == 0 and w % 16 == 0 and abs(h * w / 512**2 - 1) < 0.08
    assert nearest_bucket((1920, 1080), b) == (384, 688)  # 16:9 → landscape bucket
    assert nearest_bucket((600, 800), b) == (592, 448)  # 3:4 → portrait
    assert nearest_bucket((500, 510), b) == (512, 512)
    assert aspect_buckets(64) == [(64, 64), (48, 80), (80, 48)]  # ratios that round alike collapse


def test_bucket_crop_keeps_faces_and_pads_when_they_do_not_fit():
    x0, y0, cw, ch = bucket_crop((400, 400), np.array([[300, 50, 350, 100]], np.float32), 2.0)
    assert (x0, y0, cw, ch) == (0.0, 0.0, 400.0, 200.0)  # widest 2:1 window, faces at the top: shifted inside
    x0, y0, cw, ch = bucket_crop((400, 200), np.array([[10, 50, 60, 100], [330, 40, 390, 110]], np.float32), 0.5)
    assert ch == 2 * cw and cw >= 380 and x0 <= 10 and x0 + cw >= 390  # faces span 380 px: the window grows


def _photo_shard(path, sizes):
    from PIL import Image

    from withanyone.data.shards import image_label, json_bytes, write_shard

    rows = []
    for i, (w, h) in enumerate(sizes):
        img = np.full((h, w, 3), 40, np.uint8)
        bx = [w * 0.4, h * 0.4, w * 0.6, h * 0.6]
        img[int(bx[1]):int(bx[3]), int(bx[0]):int(bx[2])] = (250, 10, 10)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="PNG")
        cx, cy = w / 2, h / 2
        lm = [[cx - 5, cy - 5], [cx + 5, cy - 5], [cx, cy], [cx - 4, cy + 5], [cx + 4, cy + 5]]
        label = image_label("synthetic", [bx], ["x"], [np.ones(512) / np.sqrt(512)], landmarks=[lm])
        rows.append({"__key__": f"{i:04d}", "png": buf.getvalue(), "json": json_bytes(label)})
    write_shard(path, rows)


def test_landscape_portrait_and_square_photos_land_in_their_buckets(tmp_path):
    _photo_shard(tmp_path / "s.tar", [(320, 180), (180, 320), (200, 200), (300, 200), (200, 300)])
    ds = MultiIDTrainDataset(tmp_path / "s.tar", 512, epochs=1, buckets=aspect_buckets(512))
    got = [tuple(s.pixels.shape[-2:]) for s in ds]
    assert got == [(384, 688), (688, 384), (512, 512), (416, 624), (624, 416)]
    for s, (h, w) in zip(ds, got, strict=True):
        assert h % 16 == 0 and w % 16 == 0
        x1, y1, x2, y2 = s.boxes[0]
        assert 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h
        assert np.all((s.landmarks[0] > [x1, y1]) & (s.landmarks[0] < [x2, y2]))
        px = (s.pixels.permute(1, 2, 0).numpy() + 1) * 127.5  # the red face sits where its box says
        inside = px[int(y1) + 3:int(y2) - 3, int(x1) + 3:int(x2) - 3]
        assert inside[..., 0].min() > 200 and inside[..., 1].max() < 60
    # the real photos of the tiny shard: landscape, portrait and near-square ones
    real = MultiIDTrainDataset(tiny_multiid() / "train", 64, epochs=1, buckets=aspect_buckets(64))
    shapes = {s.key: tuple(s.pixels.shape[-2:]) for s in real}
    assert shapes == {"00000000": (48, 80), "00000001": (80, 48), "00000002": (64, 64), "00000003": (80, 48),
                      "00000004": (48, 80), "00000005": (48, 80)}  # w/h 1.70, 0.72, 0.80, 0.44, 2.00, 1.60


def test_every_batch_holds_one_bucket_and_records_the_pending_queues():
    ds = MultiIDTrainDataset(tiny_multiid() / "train", 64, epochs=3, buckets=aspect_buckets(64))
    batches = list(batch_loader(ds, 2))
    assert len(batches) == 8  # 3 epochs: 9 landscape, 6 portrait, 3 square samples → 4 + 3 + 1 batches
    assert {tuple(b.pixels.shape[-2:]) for b in batches} == {(48, 80), (80, 48), (64, 64)}
    for b in batches:
        assert b.pixels.shape[0] == 2 and b.boxes.shape[0] == 2
        assert np.all(b.boxes[..., 2] <= b.pixels.shape[-1]) and np.all(b.boxes[..., 3] <= b.pixels.shape[-2])
    first = batches[0]
    assert first.keys == ["00000001", "00000003"] and first.position == (0, 0, 4)
    assert first.pending == [[0, 1], [0, 3]]  # sample 0 (landscape) and 2 (square) still wait


def _weights(checkpoint):
    a = tiny_components().adapter
    load_checkpoint(checkpoint, a)
    return a.state_dict()


def test_training_steps_on_two_bucket_shapes_and_resume_is_exact(tmp_path, caplog):
    shapes: list[tuple[int, int]] = []
    import withanyone.train.loop as loop

    real = loop.compute_losses

    def spy(batch, *a, **kw):
        shapes.append(tuple(batch.pixels.shape[-2:]))
        return real(batch, *a, **kw)

    loop.compute_losses = spy
    try:
        straight = train(tiny_config(tmp_path / "a", max_steps=4, aspect_buckets=True), tiny_components())
    finally:
        loop.compute_losses = real
    # portrait [1, 3], landscape [0, 4], landscape [5, 0'] (across the epoch), square [2, 2']
    assert shapes == [(80, 48), (48, 80), (48, 80), (64, 64)]
    first = train(tiny_config(tmp_path / "b", max_steps=2, aspect_buckets=True), tiny_components())
    assert first.step == 2
    resumed = train(tiny_config(tmp_path / "b", max_steps=4, aspect_buckets=True), tiny_components())
    assert resumed.step == 4 and "not an exact continuation" not in caplog.text
    sa, sb = _weights(straight.checkpoint), _weights(resumed.checkpoint)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    init = tiny_components().adapter.state_dict()
    assert any(not torch.equal(sa[k], init[k]) for k in sa)
    assert [h["loss"] for h in straight.history[2:]] == [h["loss"] for h in resumed.history]


def test_a_resume_at_the_exact_end_of_an_epoch_continues_with_the_next(tmp_path):
    _photo_shard(tmp_path / "s.tar", [(200, 200), (200, 200)])
    ds = MultiIDTrainDataset(tmp_path / "s.tar", 64, epochs=2, start={0: (0, 2)})  # epoch 0 fully consumed
    assert [(s.key, pos) for s, pos in ds.stream()] == [("0000", (0, 1, 1)), ("0001", (0, 1, 2))]

"""Box → token masks: the facts-sheet rule, every edge case, and agreement with a loop-based reference."""

from __future__ import annotations

import math
import random

import pytest
import torch

from withanyone.model import IdentityCrossAttention, InvalidBoxError, build_identity_mask, token_grid
from withanyone.model.masks import box_coverage, box_token_ranges, boxes_to_tensor


def loop_mask(boxes, height, width, n):
    """Straightforward per-token loops over the facts-sheet rule (px ∈ [⌊x1/16⌋, ⌈x2/16⌉), clipped)."""
    rows, cols = height // 16, width // 16
    out = torch.zeros(len(boxes), 1, rows * cols, len(boxes[0]) * n, dtype=torch.bool)
    for b, people in enumerate(boxes):
        for j, (x1, y1, x2, y2) in enumerate(people):
            c0, r0 = max(0, math.floor(x1 / 16)), max(0, math.floor(y1 / 16))
            c1, r1 = min(cols, math.ceil(x2 / 16)), min(rows, math.ceil(y2 / 16))
            for r in range(r0, r1):
                for c in range(c0, c1):
                    out[b, 0, r * cols + c, j * n : (j + 1) * n] = True
    return out


def test_mask_matches_loop_reference_on_random_boxes():
    rng = random.Random(0)
    for height, width in [(256, 256), (512, 384), (1024, 768)]:
        boxes = []
        for _ in range(3):
            people = []
            for _ in range(rng.randint(1, 4)):
                x1, y1 = rng.uniform(0, width - 40), rng.uniform(0, height - 40)
                people.append((x1, y1, x1 + rng.uniform(20, width - x1), y1 + rng.uniform(20, height - y1)))
            boxes.append(people)
        n = max(len(p) for p in boxes)
        boxes = [p + [p[0]] * (n - len(p)) for p in boxes]  # same count per item
        for tokens in (8, 264):
            got = build_identity_mask(boxes, height, width, tokens)
            assert got.shape == (3, 1, (height // 16) * (width // 16), n * tokens)
            assert torch.equal(got, loop_mask(boxes, height, width, tokens))


def test_token_sees_only_its_person_and_overlaps_see_both():
    # person 0 covers cols/rows [0, 4), person 1 covers [2, 6): overlap at [2, 4)
    mask = build_identity_mask([[(0, 0, 64, 64), (32, 32, 96, 96)]], 128, 128, 8)[0, 0]  # [64, 16]
    cols = 8

    def row(r, c):
        return mask[r * cols + c]

    assert row(0, 0)[:8].all() and not row(0, 0)[8:].any()  # only person 0
    assert row(5, 5)[8:].all() and not row(5, 5)[:8].any()  # only person 1
    assert row(3, 3).all()  # overlap: both people
    assert not row(7, 7).any()  # in no box
    assert mask.any(-1).sum() == 16 + 16 - 4


def test_box_smaller_than_a_patch_covers_one_token():
    ranges = box_token_ranges([[(20.0, 35.0, 22.5, 36.0)]], 256, 256)
    assert ranges.tolist() == [[[1, 2, 2, 3]]]
    cover = box_coverage([[(20.0, 35.0, 22.5, 36.0)]], 256, 256)
    assert cover.sum() == 1 and cover[0, 0, 2 * 16 + 1]
    # a sliver on a patch border still gets its patch
    assert box_coverage([[(16.0, 16.0, 16.25, 16.25)]], 64, 64).sum() == 1


def test_box_partly_outside_is_clipped():
    ranges = box_token_ranges([[(-50.0, -10.0, 40.0, 300.0)]], 256, 256)
    assert ranges.tolist() == [[[0, 0, 3, 16]]]
    # the few pixels beyond the last full patch (width not a multiple of 16) map to the last token
    assert box_token_ranges([[(995.0, 0.0, 1000.0, 10.0)]], 64, 1000).tolist() == [[[61, 0, 62, 1]]]


@pytest.mark.parametrize(
    ("boxes", "needle"),
    [
        ([[(10, 10, 10, 50)]], "x2 > x1"),
        ([[(10, 60, 50, 20)]], "x2 > x1"),
        ([[(300, 10, 400, 50)]], "outside"),
        ([[(-40, -40, 0, 0)]], "outside"),
        ([[(1, 2, 3)]], "4"),
        ([[(0, 0, float("nan"), 10)]], "not finite"),
        ([[(0, 0, 10, 10)], [(0, 0, 10, 10), (5, 5, 20, 20)]], "same number"),
        ("0,0,10,10", "list"),
    ],
)
def test_bad_boxes_raise_a_clear_error(boxes, needle):
    with pytest.raises(InvalidBoxError, match=needle):
        build_identity_mask(boxes, 256, 256, 8)


def test_box_count_must_match_people():
    with pytest.raises(InvalidBoxError, match="3 boxes per image for 2 people"):
        boxes_to_tensor([[(0, 0, 10, 10)] * 3], num_people=2)


def test_tiny_images_are_refused():
    with pytest.raises(InvalidBoxError, match="at least 16"):
        token_grid(8, 256)


def test_kontext_rows_beyond_target_are_empty():
    mask = build_identity_mask([[(0, 0, 64, 64)]], 64, 64, 8, num_image_tokens=32)
    assert mask.shape == (1, 1, 32, 8)
    assert mask[0, 0, :16].all() and not mask[0, 0, 16:].any()


def test_token_in_no_box_gets_exact_zero_never_nan():
    torch.manual_seed(0)
    attn = IdentityCrossAttention(dim=64, num_heads=2, head_dim=32)
    img = torch.randn(1, 16, 64, requires_grad=True)
    ids = torch.randn(1, 16, 64)
    mask = build_identity_mask([[(0, 0, 32, 32), (32, 32, 64, 64)]], 64, 64, 8)
    out = attn(ids, img, mask)
    empty = ~mask[0, 0].any(-1)
    assert empty.sum() == 8
    assert torch.equal(out[0, empty], torch.zeros(8, 64))
    assert out[0, ~empty].abs().min() > 0
    out.sum().backward()
    assert torch.isfinite(img.grad).all()
    assert torch.isfinite(attn.to_q.weight.grad).all() and attn.to_q.weight.grad.abs().sum() > 0

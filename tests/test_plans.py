"""Augmentation plans: RandomResizedCrop's distribution, boxes inside images, the fallback, determinism."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from torchvision.transforms import v2

from planktonio.plans import center_crop, epoch_uniforms, make_plan, random_resized_crop
from planktonio.transforms import TRAIN_AUGMENT, Transform

from .conftest import REPO


def ks_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov statistic: the largest gap between the empirical CDFs."""
    grid = np.sort(np.concatenate([a, b]))
    cdf_a = np.searchsorted(np.sort(a), grid, side="right") / len(a)
    cdf_b = np.searchsorted(np.sort(b), grid, side="right") / len(b)
    return float(np.abs(cdf_a - cdf_b).max())


@pytest.mark.parametrize("width, height", [(255, 255), (56, 53), (428, 90)])
def test_boxes_follow_torchvisions_random_resized_crop(width, height):
    """Area fraction and log aspect ratio of 20,000 plans against 20,000 draws of torchvision's own sampler.

    Bound: KS distance < 0.025 for each (the 0.1% critical value for two
    samples of 20,000 is 0.0195; boxes are whole pixels in both, so the
    distributions are the same discrete one).
    """
    n = 20_000
    plan = make_plan(TRAIN_AUGMENT, np.full(n, width), np.full(n, height), seed=0, epoch=0)
    crop = v2.RandomResizedCrop(224, scale=TRAIN_AUGMENT.scale, ratio=TRAIN_AUGMENT.ratio)
    torch.manual_seed(0)
    image = torch.empty(3, height, width, dtype=torch.uint8)
    reference = [crop.make_params([image]) for _ in range(n)]
    ref_w = np.array([r["width"] for r in reference])
    ref_h = np.array([r["height"] for r in reference])
    ref_x = np.array([r["left"] for r in reference])
    area = width * height
    assert ks_distance(plan.width * plan.height / area, ref_w * ref_h / area) < 0.025
    assert ks_distance(np.log(plan.width / plan.height), np.log(ref_w / ref_h)) < 0.025
    # The corner is uniform over the positions that fit: x / (width - w + 1) is uniform on [0, 1).
    assert ks_distance(plan.x / (width - plan.width + 1), ref_x / (width - ref_w + 1)) < 0.025


def test_boxes_lie_inside_their_images():
    rng = np.random.default_rng(1)
    widths, heights = rng.integers(1, 500, 5000), rng.integers(1, 500, 5000)
    widths[:3], heights[:3] = (1, 21, 428), (1, 428, 21)  # a single pixel, extreme aspect ratios
    for transform in (TRAIN_AUGMENT, Transform(crop="random_resized", scale=(0.9, 1.0)), Transform()):
        plan = make_plan(transform, widths, heights, seed=3, epoch=7)
        assert (plan.width >= 1).all() and (plan.height >= 1).all()
        assert (plan.x >= 0).all() and (plan.y >= 0).all()
        assert (plan.x + plan.width <= widths).all() and (plan.y + plan.height <= heights).all()


def test_the_fallback_is_taken_where_no_attempt_fits():
    """A 100 x 10 strip asked for 90-100% of its area at aspect <= 4/3: no box fits (it would be >= 26
    px high), so torchvision falls back to the centre crop at the clamped ratio: 13 x 10 at x = 43."""
    uniforms = epoch_uniforms(0, 0, 500)
    x, y, w, h = random_resized_crop(np.full(500, 100), np.full(500, 10), uniforms, (0.9, 1.0), (3 / 4, 4 / 3))
    assert (w == 13).all() and (h == 10).all() and (x == 43).all() and (y == 0).all()
    # ... and for a tall strip the other way round; a square image falls back to the whole image.
    x, y, w, h = random_resized_crop(np.full(500, 10), np.full(500, 100), uniforms, (0.9, 1.0), (3 / 4, 4 / 3))
    assert (w == 10).all() and (h == 13).all() and (y == 43).all()
    # With ordinary settings on a square image the attempts nearly always fit (no fallback needed).
    x, y, w, h = random_resized_crop(np.full(500, 255), np.full(500, 255), uniforms, (0.08, 1.0), (3 / 4, 4 / 3))
    assert ((w == 255) & (h == 255)).mean() < 0.05


def test_eval_plan_is_the_resize_then_centre_crop_square():
    x, y, w, h = center_crop(np.array([255, 400, 56]), np.array([255, 300, 53]), size=224, resize=256)
    assert w.tolist() == h.tolist() == [223, 262, 46]  # round(short side * 224 / 256)
    assert x.tolist() == [16, 69, 5] and y.tolist() == [16, 19, 3]


def test_plans_depend_on_seed_epoch_and_position_only():
    widths, heights = np.arange(50, 150), np.arange(150, 50, -1)
    plan = make_plan(TRAIN_AUGMENT, widths, heights, seed=5, epoch=2)
    # The first 40 images of the same manifest get the same plans when planned alone ...
    head = make_plan(TRAIN_AUGMENT, widths[:40], heights[:40], seed=5, epoch=2)
    assert all(np.array_equal(getattr(plan, f)[:40], getattr(head, f)) for f in ("x", "y", "width", "height", "flip"))
    # ... another epoch or seed gives other plans, and flips come at about the planned rate.
    other = make_plan(TRAIN_AUGMENT, widths, heights, seed=5, epoch=3)
    assert not np.array_equal(plan.x, other.x)
    assert 0.3 < make_plan(TRAIN_AUGMENT, np.full(4000, 99), np.full(4000, 99), seed=1, epoch=0).flip.mean() < 0.7
    # ... and another process computes the very same plan.
    code = ("import json, numpy as np; from planktonio.plans import make_plan; from planktonio.transforms import "
            "TRAIN_AUGMENT as t; p = make_plan(t, np.arange(50, 150), np.arange(150, 50, -1), seed=5, epoch=2); "
            "print(json.dumps([p.x.tolist(), p.y.tolist(), p.width.tolist(), p.flip.tolist()]))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert json.loads(out) == [plan.x.tolist(), plan.y.tolist(), plan.width.tolist(), plan.flip.tolist()]


def test_centre_plan_draws_flips_only_when_asked():
    plan = make_plan(Transform(), np.full(100, 64), np.full(100, 64), seed=0, epoch=0)
    assert not plan.flip.any()
    flipping = make_plan(Transform(hflip=1.0), np.full(100, 64), np.full(100, 64), seed=0, epoch=0)
    assert flipping.flip.all() and math.isclose(flipping.width[0], round(64 * 224 / 256))


@pytest.mark.parametrize("crop", ["random_resized", "center"])
def test_plans_made_in_blocks_are_the_plans_made_in_one_piece(monkeypatch, crop):
    """make_plan draws a block of positions at a time (bounded memory at a million images): the Philox
    counter of a block's first row makes it continue the one stream, so every box and flip is what one
    piece gives, whatever the block size (4 and 12 here, against one block for all)."""
    from planktonio import plans
    rng = np.random.default_rng(1)
    widths, heights = rng.integers(1, 400, 203), rng.integers(1, 400, 203)
    widths[:9] = 1  # boxes that only the fallback fits
    transform = Transform(crop=crop, size=64, resize=72, hflip=0.5)
    whole = make_plan(transform, widths, heights, seed=5, epoch=3)
    for block in (4, 12):
        monkeypatch.setattr(plans, "PLAN_BLOCK", block)
        pieces = make_plan(transform, widths, heights, seed=5, epoch=3)
        for field in ("x", "y", "width", "height", "flip"):
            assert np.array_equal(getattr(pieces, field), getattr(whole, field)), (block, field)
    assert np.array_equal(epoch_uniforms(5, 3, 7, start=8), epoch_uniforms(5, 3, 15)[8:])
    with pytest.raises(ValueError, match="not a multiple of 4"):
        epoch_uniforms(5, 3, 7, start=6)


@pytest.mark.parametrize("transform", [Transform(crop="random_resized", size=64, resize=72, hflip=0.5),
                                       Transform(crop="center", size=64, resize=72, hflip=0.5),
                                       Transform(crop="random_resized", size=64, resize=72, hflip=0.5, period=2),
                                       Transform(crop="center", size=64, resize=72)])
def test_a_batch_s_plans_are_the_whole_epoch_s_rows(monkeypatch, transform):
    """Plans made per batch, without the epoch's whole plan: the positions [a, b) of an epoch (ranges that
    start and end anywhere, across blocks of 12) and any positions in a shuffled order are, bit for bit,
    those rows of the whole epoch's plan."""
    from planktonio import plans
    rng = np.random.default_rng(2)
    widths, heights = rng.integers(1, 400, 203), rng.integers(1, 400, 203)
    widths[:9] = 1  # boxes that only the fallback fits
    whole = make_plan(transform, widths, heights, seed=5, epoch=3)
    monkeypatch.setattr(plans, "PLAN_BLOCK", 12)
    order = rng.permutation(203)
    for start, stop in [(0, 203), (0, 1), (5, 6), (7, 31), (30, 203), (101, 101), (200, 203)]:
        piece = plans.plan_range(transform, widths, heights, seed=5, epoch=3, start=start, stop=stop)
        batch = plans.plan_at(transform, widths, heights, order[start:stop], seed=5, epoch=3)
        for field in ("x", "y", "width", "height", "flip"):
            assert np.array_equal(getattr(piece, field), getattr(whole, field)[start:stop]), (start, stop, field)
            assert np.array_equal(getattr(batch, field), getattr(whole, field)[order[start:stop]]), (start, field)
    epoch_5 = plans.plan_at(transform, widths, heights, order[:40], seed=5, epoch=5)
    assert np.array_equal(epoch_5.x, make_plan(transform, widths, heights, seed=5, epoch=5).x[order[:40]])

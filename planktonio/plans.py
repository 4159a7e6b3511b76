"""Augmentation plans: where each image is cropped and whether it is flipped, decided once for every backend.

A plan gives, for each image of a manifest, a crop box in the source
image's own pixels (x, y, width, height) and a horizontal flip. Every loader
backend applies the plan and nothing else: crop the box, resize it to
size x size, flip. So the backends do exactly the same work on exactly the
same pixels, their outputs can be compared image by image, and a resumed run
sees the crops an uninterrupted one would.

- Training (crop="random_resized"): torchvision's RandomResizedCrop
  algorithm, vectorised over the manifest: up to 10 attempts of an area
  fraction uniform in `scale` and a log-uniform aspect ratio in `ratio`; the
  first box that fits wins, placed uniformly; if none fits, the centre crop
  clamped to `ratio` (its fallback). The random numbers are a pure function
  of (seed, epoch, manifest position): not of the rank, the world size, the
  order of reading, or the process.
- Evaluation (crop="center"): the square that "resize the shorter side to
  `resize`, then cut the central size x size" covers, in source pixels.

Image sizes come from `prepare`, which decodes every image once and records
them (PreparedDataset.index), so no backend has to look at a file to
know its plan. docs/loaders.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .transforms import Transform

ATTEMPTS = 10  # RandomResizedCrop's number of tries before its fallback
# Uniform numbers drawn per image: (area, log-ratio) per attempt, then row, column, flip.
_DRAWS = 2 * ATTEMPTS + 3
# Keeps plan streams apart from any other use of (seed, epoch) as a seed.
_PLAN_STREAM = 0x9E3779B9
PLAN_BLOCK = 1 << 16  # images whose plans are made at once (a multiple of 4: see epoch_uniforms)


@dataclass(frozen=True)
class Plan:
    """Crop boxes and flips for a set of images: int64 arrays of equal length."""

    x: np.ndarray       # left column of the box
    y: np.ndarray       # top row
    width: np.ndarray
    height: np.ndarray
    flip: np.ndarray    # 1: mirror horizontally after cropping

    def __len__(self) -> int:
        return len(self.x)

    def take(self, positions) -> "Plan":
        """The plans of some images, in the order given."""
        return Plan(self.x[positions], self.y[positions], self.width[positions], self.height[positions],
                    self.flip[positions])

    def box(self, i: int) -> tuple[int, int, int, int, int]:
        """(x, y, width, height, flip) of one image, as Python ints."""
        return int(self.x[i]), int(self.y[i]), int(self.width[i]), int(self.height[i]), int(self.flip[i])


def epoch_uniforms(seed: int, epoch: int, count: int, start: int = 0) -> np.ndarray:
    """count x _DRAWS uniform numbers in [0, 1): row r belongs to manifest position start + r, in every
    process. Philox is counter-based: each 4 numbers are one counter value, so the rows from a `start`
    that is a multiple of 4 begin at counter start * _DRAWS / 4, and a manifest's plans can be made in
    blocks, to the same numbers as in one piece."""
    if start % 4:
        raise ValueError(f"epoch_uniforms: start {start} is not a multiple of 4")
    generator = np.random.Generator(np.random.Philox(key=[seed & 0xFFFF_FFFF_FFFF_FFFF, _PLAN_STREAM],
                                                     counter=[start * _DRAWS // 4, 0,
                                                              epoch & 0xFFFF_FFFF_FFFF_FFFF, 0]))
    return generator.random((count, _DRAWS))


def random_resized_crop(widths: np.ndarray, heights: np.ndarray, uniforms: np.ndarray,
                        scale: tuple[float, float], ratio: tuple[float, float]) -> tuple[np.ndarray, ...]:
    """RandomResizedCrop's boxes (x, y, w, h) for images of the given sizes, from given uniform numbers.

    Follows torchvision.transforms.v2.RandomResizedCrop.make_params: w and h
    rounded to the nearest integer, accepted when 0 < w <= width and
    0 < h <= height, the box's corner drawn uniformly among the positions
    that fit.
    """
    widths = np.asarray(widths, dtype=np.int64)
    heights = np.asarray(heights, dtype=np.int64)
    area = (widths * heights).astype(np.float64)
    log_low, log_high = math.log(ratio[0]), math.log(ratio[1])
    w, h = np.zeros(len(widths), dtype=np.int64), np.zeros(len(widths), dtype=np.int64)
    found = np.zeros(len(widths), dtype=bool)
    # Attempt after attempt on the images still without a box (most find one at the first): the first box
    # that fits wins, as in torchvision, for a tenth of the arithmetic of trying all ten on every image.
    left = np.arange(len(widths))
    for attempt in range(ATTEMPTS):
        if not len(left):
            break
        target = area[left] * (scale[0] + (scale[1] - scale[0]) * uniforms[left, 2 * attempt])
        aspect = np.exp(log_low + (log_high - log_low) * uniforms[left, 2 * attempt + 1])
        tried_w = np.rint(np.sqrt(target * aspect)).astype(np.int64)  # rint: round half to even, as round()
        tried_h = np.rint(np.sqrt(target / aspect)).astype(np.int64)
        fits = (tried_w > 0) & (tried_w <= widths[left]) & (tried_h > 0) & (tried_h <= heights[left])
        won = left[fits]
        w[won], h[won], found[won] = tried_w[fits], tried_h[fits], True
        left = left[~fits]

    # The fallback: the whole image, its aspect ratio clamped into `ratio`, centred.
    in_ratio = widths / heights
    fallback_w = np.where(in_ratio < ratio[0], widths,
                          np.where(in_ratio > ratio[1], np.rint(heights * ratio[1]).astype(np.int64), widths))
    fallback_h = np.where(in_ratio < ratio[0], np.rint(widths / ratio[0]).astype(np.int64),
                          heights)
    w = np.where(found, w, fallback_w)
    h = np.where(found, h, fallback_h)
    row_u, col_u = uniforms[:, 2 * ATTEMPTS], uniforms[:, 2 * ATTEMPTS + 1]
    y = np.where(found, np.floor(row_u * (heights - h + 1)).astype(np.int64), (heights - h) // 2)
    x = np.where(found, np.floor(col_u * (widths - w + 1)).astype(np.int64), (widths - w) // 2)
    return x, y, w, h


def center_crop(widths: np.ndarray, heights: np.ndarray, size: int, resize: int) -> tuple[np.ndarray, ...]:
    """The central square that resize-shorter-side-to-`resize` then centre-crop-`size` keeps, in source pixels."""
    widths = np.asarray(widths, dtype=np.int64)
    heights = np.asarray(heights, dtype=np.int64)
    side = np.maximum(1, np.rint(np.minimum(widths, heights) * (size / resize)).astype(np.int64))
    return (widths - side) // 2, (heights - side) // 2, side, side


def make_plan(transform: Transform, widths, heights, *, seed: int, epoch: int) -> Plan:
    """The plan of every image of a manifest (position p: widths[p] x heights[p]) for one epoch.

    With transform.period K, epoch e has the plan of epoch e mod K.
    """
    if transform.period is not None:
        epoch %= transform.period
    widths = np.asarray(widths, dtype=np.int64)
    heights = np.asarray(heights, dtype=np.int64)
    if transform.crop == "center":
        x, y, w, h = center_crop(widths, heights, transform.size, transform.resize)
        if transform.hflip == 0:
            return Plan(x, y, w, h, np.zeros(len(widths), dtype=np.int64))
    else:
        x, y, w, h = (np.empty(len(widths), dtype=np.int64) for _ in range(4))
    flip = np.empty(len(widths), dtype=np.int64)
    # In blocks of manifest positions: the uniform numbers of a block at a time (23 per image: at a million
    # images, 184 MB held at once otherwise), to the same plan as in one piece.
    for start in range(0, len(widths), PLAN_BLOCK):
        block = slice(start, start + PLAN_BLOCK)
        uniforms = epoch_uniforms(seed, epoch, len(widths[block]), start)
        if transform.crop != "center":
            x[block], y[block], w[block], h[block] = random_resized_crop(
                widths[block], heights[block], uniforms, transform.scale, transform.ratio)
        flip[block] = uniforms[:, -1] < transform.hflip
    return Plan(x, y, w, h, flip)

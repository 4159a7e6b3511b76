"""One description of the image transforms, read by every loader backend.

A comparison of loaders is fair only if they do the same work, so no
backend has augmentation settings of its own: every one builds its batches
from a `Transform` (what happens to each image, made into one plan per image
by planktonio/plans.py) and an `Output` (what the batch looks like). The
backends in planktonio/loaders/ are its readings.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch

from .errors import PlanktonioError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

CROPS = ("random_resized", "center")


def _is_number(value) -> bool:
    """A real, finite number (not a bool, which YAML's yes/true would give)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class Transform:
    """What happens to one decoded RGB image.

    crop="random_resized": torchvision's RandomResizedCrop semantics: a random
        region covering `scale` of the area with aspect ratio in `ratio`,
        resized to size x size (the usual training augmentation).
    crop="center": resize the shorter side to `resize`, then cut the central
        size x size (the usual evaluation transform; the plankton study also
        trained with it).
    hflip: probability of a horizontal flip (0 for none).
    mean/std: per-channel normalisation, on the 0..1 scale.
    period: None, or K: the random crops and flips of epoch e are those of
        epoch e mod K (the images' order still changes every epoch). A run
        whose plans repeat can keep K views of each image's frozen features
        (train/feature_cache.py) instead of recomputing them every epoch.
    """

    crop: str = "center"
    size: int = 224
    resize: int = 256
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.0
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    period: int | None = None

    def __post_init__(self) -> None:
        problems = []
        # Frozen dataclass: normalise lists (from YAML) to tuples of floats in place.
        for name, count in (("scale", 2), ("ratio", 2), ("mean", 3), ("std", 3)):
            value = getattr(self, name)
            if isinstance(value, (list, tuple)) and len(value) == count and all(_is_number(v) for v in value):
                object.__setattr__(self, name, tuple(float(v) for v in value))
            else:
                problems.append(f"{name} must be a list of {count} numbers, not {value!r}")
        if problems:
            raise PlanktonioError("bad transform: " + "; ".join(problems))
        if self.crop not in CROPS:
            problems.append(f"crop must be one of {', '.join(CROPS)}, not {self.crop!r}")
        if not (_is_int(self.size) and self.size > 0):
            problems.append(f"size must be a positive integer, not {self.size!r}")
        elif not (_is_int(self.resize) and self.resize >= self.size):
            problems.append(f"resize must be an integer >= size ({self.size}), not {self.resize!r}")
        if not 0 < self.scale[0] <= self.scale[1] <= 1:
            problems.append(f"scale must be [low, high] with 0 < low <= high <= 1, not {list(self.scale)}")
        if not 0 < self.ratio[0] <= self.ratio[1] < math.inf:
            problems.append(f"ratio must be [low, high] with 0 < low <= high, not {list(self.ratio)}")
        if not (_is_number(self.hflip) and 0.0 <= self.hflip <= 1.0):
            problems.append(f"hflip is a probability in [0, 1], not {self.hflip!r}")
        if not all(math.isfinite(v) for v in self.mean) or not all(0 < v < math.inf for v in self.std):
            problems.append("mean must be finite numbers and std positive ones")
        if self.period is not None and not (_is_int(self.period) and self.period >= 1):
            problems.append(f"period must be an integer >= 1 (or null), not {self.period!r}")
        if problems:
            raise PlanktonioError("bad transform: " + "; ".join(problems))

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None) -> "Transform":
        """Build from a config mapping; unknown keys are an error, not ignored."""
        if values is not None and not isinstance(values, dict):
            raise PlanktonioError(f"a transform is a mapping of keys (crop, size, ...), not {values!r}")
        values = dict(values or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(repr(k) for k in set(values) - known)  # repr: any key prints on one line
        if unknown:
            raise PlanktonioError(
                f"unknown transform key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**values)

    @property
    def deterministic(self) -> bool:
        """Every epoch gives each image the same crop and flip."""
        return self.crop == "center" and self.hflip in (0, 0.0, 1, 1.0)

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


# The two standard transforms: ImageNet-style training augmentation and the
# deterministic resize-256 / centre-crop-224 evaluation transform.
TRAIN_AUGMENT = Transform(crop="random_resized", hflip=0.5)
EVAL_TRANSFORM = Transform(crop="center")
# What a split gets when nothing says otherwise, wherever a transform is chosen (make_loader, the
# training config): the usual training augmentation for training, the fixed transform to evaluate.
DEFAULT_TRANSFORMS = {"train": TRAIN_AUGMENT, "eval": EVAL_TRANSFORM}

DTYPES = {"float32": torch.float32, "float16": torch.float16}
LAYOUTS = ("NCHW", "NHWC")


@dataclass(frozen=True)
class Output:
    """How a batch of images reaches the model.

    dtype: "float32" or "float16" (what DALI's normaliser can emit).
    layout: "NCHW" gives contiguous tensors; "NHWC" gives the same logical
        N x C x H x W tensor stored channels-last (torch.channels_last), the
        memory format tensor cores prefer. Either way the model sees NCHW.
    """

    dtype: str = "float32"
    layout: str = "NCHW"

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise PlanktonioError(f"output dtype must be one of {', '.join(DTYPES)}, not {self.dtype!r}")
        if self.layout not in LAYOUTS:
            raise PlanktonioError(f"output layout must be one of {', '.join(LAYOUTS)}, not {self.layout!r}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.layout == "NHWC" else torch.contiguous_format

"""Image operations the backends share: decode a file, carry out one image's plan, normalise a batch.

Backends import from here, never from each other: what two backends must do
identically (the torchvision backend's workers and the cache on a CPU resize
a box with the same uint8 kernel; every tensor backend normalises on the
device the same way) is written once.
"""

from __future__ import annotations

import io
import os

import numpy as np
import torch
from PIL import Image, ImageOps
from torchvision.io import ImageReadMode, decode_image, read_file
from torchvision.transforms.v2 import functional as F

from ..image_checks import TORCHVISION_DECODES
from ..transforms import Output, Transform


def decode_rgb(path: str, data: np.ndarray | None = None) -> torch.Tensor:
    """Decode to uint8 3 x H x W with its EXIF orientation applied, as DALI's decoders do.

    torchvision.io (libjpeg-turbo) for JPEG/PNG, PIL for TIFF/BMP. data: the
    file's bytes when they come from a packed shard (path then names the format).
    """
    if os.path.splitext(path)[1].lower() in TORCHVISION_DECODES:
        encoded = read_file(path) if data is None else torch.from_numpy(np.array(data))
        return decode_image(encoded, mode=ImageReadMode.RGB, apply_exif_orientation=True)
    with Image.open(path if data is None else io.BytesIO(data.tobytes())) as image:
        upright = ImageOps.exif_transpose(image).convert("RGB")
        return torch.from_numpy(np.asarray(upright).copy()).permute(2, 0, 1).contiguous()


def resize_flip(crop: torch.Tensor, flip: int, size: int) -> torch.Tensor:
    """uint8 3 x h x w (a plan's box, already cut out) -> uint8 3 x size x size, antialiased bilinear, flipped
    if planned: torchvision's vectorised uint8 resize."""
    resized = F.resize(crop, [size, size], interpolation=F.InterpolationMode.BILINEAR, antialias=True)
    return resized.flip(-1) if flip else resized


def apply_plan(image: torch.Tensor, box: tuple[int, int, int, int, int], size: int) -> torch.Tensor:
    """Crop the plan's box (x, y, width, height, flip) out of a uint8 C x H x W image, resize, flip."""
    x, y, w, h, flip = box
    return resize_flip(image[:, y:y + h, x:x + w], flip, size)


class Normalizer:
    """uint8 (or float, already on the 0..255 scale) N x C x H x W -> normalised float batch in the requested
    dtype and memory format.

    Mean and std live on the device once, not copied there for every batch.
    """

    def __init__(self, t: Transform, out: Output, device: torch.device):
        self.mean = torch.tensor(t.mean, device=device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(t.std, device=device).view(1, 3, 1, 1) * 255
        self.out = out

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        images = (images.float() - self.mean) / self.std
        return images.to(self.out.torch_dtype).contiguous(memory_format=self.out.memory_format)

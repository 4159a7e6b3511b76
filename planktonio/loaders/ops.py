"""Image operations the backends share: decode a file, carry out one image's plan, normalise a batch.

Backends import from here, never from each other: what two backends must do
identically (the torchvision backend's workers and the cache on a CPU resize
a box with the same uint8 kernel; every tensor backend normalises on the
device the same way) is written once.
"""

from __future__ import annotations

import io
import os

import cv2
import numpy as np
import torch
from PIL import Image, ImageOps
from torchvision.io import ImageReadMode, decode_image, read_file
from torchvision.transforms.v2 import functional as F

from ..image_checks import TORCHVISION_DECODES
from ..transforms import Output, Transform

EXIF_ORIENTATION = 0x0112  # the EXIF tag of how a picture is turned or mirrored for display


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


def is_upright_jpeg(data) -> bool:
    """Whether encoded bytes are a JPEG that a plain libjpeg-turbo decode shows upright: no EXIF orientation
    that turns or mirrors it (PIL reads the orientation only where an Exif block is)."""
    if bytes(data[:2]) != b"\xff\xd8":
        return False
    if bytes(data[:65536]).find(b"Exif\x00\x00") < 0:
        return True
    with Image.open(io.BytesIO(bytes(data))) as image:
        return image.getexif().get(EXIF_ORIENTATION, 1) in (0, 1)


def resize_flip(crop: torch.Tensor, flip: int, size: int) -> torch.Tensor:
    """uint8 3 x h x w (a plan's box, already cut out) -> uint8 3 x size x size, antialiased bilinear, flipped
    if planned: torchvision's vectorised uint8 resize."""
    resized = F.resize(crop, [size, size], interpolation=F.InterpolationMode.BILINEAR, antialias=True)
    return resized.flip(-1) if flip else resized


def apply_plan(image: torch.Tensor, box: tuple[int, int, int, int, int], size: int) -> torch.Tensor:
    """Crop the plan's box (x, y, width, height, flip) out of a uint8 C x H x W image, resize, flip."""
    x, y, w, h, flip = box
    return resize_flip(image[:, y:y + h, x:x + w], flip, size)


def crop_resize_flip_hwc(image: np.ndarray, box: tuple[int, int, int, int, int], size: int) -> np.ndarray:
    """A plan's box of a uint8 H x W x 3 image, resized to size x size (uint8 H x W x 3), flipped if planned: the
    reference's antialiased bilinear resize, at OpenCV's speed where that is the same filter.

    Where the box is enlarged (or kept) along both axes, antialiased bilinear is plain bilinear, and
    OpenCV's fixed-point bilinear rounds within a level of it. Where it shrinks along an axis the
    antialiased filter widens, which OpenCV has no filter for (its bilinear differs by up to 22 levels
    there, its area filter by more): torch's uint8 antialiased kernel, the reference's own, channels-last
    (about a fifth of the crops of a 255 px image, each at about 3x OpenCV's cost). Every call releases the
    GIL: threads run it in parallel (each on one core: cv2.setNumThreads(1) where a pool calls it).
    """
    x, y, w, h, flip = box
    crop = image[y:y + h, x:x + w]
    if w <= size and h <= size:
        resized = cv2.resize(crop, (size, size), interpolation=cv2.INTER_LINEAR)
    else:
        tensor = torch.from_numpy(np.ascontiguousarray(crop)).permute(2, 0, 1)[None]
        resized = torch.nn.functional.interpolate(tensor, size=(size, size), mode="bilinear", align_corners=False,
                                                  antialias=True)[0].permute(1, 2, 0).numpy()
    return cv2.flip(resized, 1) if flip else resized


def one_core_each() -> None:
    """In each thread of a pool that runs the per-image operations: their OpenCV and torch calls stay on
    this thread. The pool is the parallelism; torch would otherwise start an OpenMP team of its own in
    every pool thread (OpenMP's thread count is per calling thread), whose threads spin between calls:
    measured here, a third more CPU per image. cv2's setting is process-wide (nothing else uses it)."""
    cv2.setNumThreads(1)
    torch.set_num_threads(1)


class PlaneNormalizer:
    """uint8 H x W x 3 -> normalised float32 3 x H x W written into given memory (a batch's row): one fused
    pass per channel (x / (255 std) - mean / std, cv2.addWeighted), no temporary float image; or H x W x 3
    for a channels-last batch."""

    def __init__(self, t: Transform):
        self.scale = [1 / (255 * s) for s in t.std]
        self.shift = [-m / s for m, s in zip(t.mean, t.std)]

        self.mean255 = tuple(255 * m for m in t.mean) + (0.0,)   # OpenCV scalars: four values
        self.inverse = tuple(1 / (255 * s) for s in t.std) + (1.0,)

    def __call__(self, image: np.ndarray, out: np.ndarray) -> None:
        """out: float32 3 x H x W, or H x W x 3 (a channels-last batch's row: two passes, no transposition)."""
        if out.shape[-1] == 3:
            cv2.subtract(image, self.mean255, dst=out, dtype=cv2.CV_32F)
            cv2.multiply(out, self.inverse, dst=out)
            return
        for channel, plane in enumerate(cv2.split(image)):
            cv2.addWeighted(plane, self.scale[channel], plane, 0.0, self.shift[channel], dst=out[channel],
                            dtype=cv2.CV_32F)


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

"""The pil backend: the plankton study's own pipeline, the reference every speed-up is measured over.

The group's first version read its images with torchvision's ImageFolder in
DataLoader workers: PIL decodes each JPEG, torchvision's PIL transforms crop
and resize it (PIL's antialiased bilinear filter) and flip it, ToTensor and
Normalize make it a float32 tensor, and the workers collate float batches
that are then copied to the GPU. This backend is that pipeline, step for
step, with one change that keeps comparisons fair: the crop box and the flip
come from the shared plans (planktonio/plans.py), as for every backend, so
its batches agree with the others image by image.

Where a batch is decoded and augmented: `PilDataset.__getitem__`, in
DataLoader worker processes (the worker pool of loaders/workers.py):
`Image.open` + EXIF orientation, `Image.crop` then `Image.resize` (what
torchvision's F.resized_crop does to a PIL image; resizing with `box=` instead
would let the filter read pixels outside the box at the edges), a mirror
flip, then ToTensor and Normalize, in the worker, in float32.
"""

from __future__ import annotations

import io
import logging

import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset
from torchvision.transforms import functional as TF

from .backend import Backend
from .base import LoaderSpec
from .workers import WorkerPoolLoader

log = logging.getLogger(__name__)


class PilDataset(Dataset):
    """key = (position, (x, y, w, h, flip)) -> (normalised float32 3 x size x size tensor, label)."""

    def __init__(self, spec: LoaderSpec):
        self.root = str(spec.dataset.root)
        self.shards = spec.shards
        self.entries = spec.entries
        self.sizes = list(zip(spec.widths.tolist(), spec.heights.tolist()))
        self.size = spec.transform.size
        self.mean, self.std = list(spec.transform.mean), list(spec.transform.std)

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, key):
        position, (x, y, w, h, flip) = key
        path, label = self.entries[position]
        source = f"{self.root}/{path}" if self.shards is None else io.BytesIO(self.shards.read(position).tobytes())
        where = f"{self.root}/{path}" if self.shards is None else self.shards.describe(position)
        try:
            with Image.open(source) as opened:
                image = ImageOps.exif_transpose(opened).convert("RGB")
        except (OSError, SyntaxError, ValueError) as error:
            log.warning("skipping %s: cannot decode (%s)", where, error)  # it broke since prepare checked it
            return None
        if image.size != self.sizes[position]:
            log.warning("skipping %s: %d x %d px, but prepare recorded %d x %d (the file changed since; "
                        "rerun prepare)", where, *image.size, *self.sizes[position])
            return None
        image = image.crop((x, y, x + w, y + h)).resize((self.size, self.size), Image.BILINEAR)
        if flip:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        return TF.normalize(TF.to_tensor(image), self.mean, self.std), label


class PilLoader(WorkerPoolLoader):
    """PIL decode and transforms, ToTensor and Normalize in DataLoader workers; float32 batches to the device."""

    backend = "pil"

    def __init__(self, spec: LoaderSpec):
        out = spec.output

        def finish(images: torch.Tensor) -> torch.Tensor:  # already normalised: the dtype and layout asked for
            return images.to(out.torch_dtype).contiguous(memory_format=out.memory_format)
        super().__init__(spec, PilDataset(spec), finish)


BACKENDS = (
    Backend("pil", "the study's pipeline: PIL decode and transforms, ToTensor and Normalize in DataLoader "
            "workers", devices=("cpu", "cuda"), role="reference", build=lambda spec, options: PilLoader(spec)),
)

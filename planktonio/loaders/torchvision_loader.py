"""The torchvision backend: a tensor pipeline in DataLoader workers, a conventional baseline.

Where a batch is decoded: `ManifestDataset.__getitem__`, in DataLoader worker
processes, with torchvision.io (libjpeg-turbo; ops.decode_rgb). Where it is
augmented: the same place, `ops.apply_plan`: the image's planned box
(planktonio/plans.py) is cut out, resized with torchvision's antialiased
bilinear uint8 resize and flipped if planned. Normalisation and the float
conversion happen after the copy to the device (`ops.Normalizer`), as in
timm's PrefetchLoader: a uint8 batch is a quarter of the bytes of a float32
one, and the GPU does the arithmetic. The worker pool, the planned batches
and the side-stream copy are loaders/workers.py's.
"""

from __future__ import annotations

import logging

from torch.utils.data import Dataset

from .backend import Backend
from .base import LoaderSpec
from .ops import Normalizer, apply_plan, decode_rgb
from .workers import WorkerPoolLoader

log = logging.getLogger(__name__)


class ManifestDataset(Dataset):
    """Images listed in a manifest, each fetched with its plan: key = (position, (x, y, w, h, flip)) -> uint8."""

    def __init__(self, spec: LoaderSpec):
        self.root = str(spec.dataset.root)
        self.shards = spec.shards  # a ShardSet: read each image's bytes from its shard, not its file
        self.entries = spec.entries
        self.sizes = list(zip(spec.widths.tolist(), spec.heights.tolist()))
        self.size = spec.transform.size

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, key):
        position, box = key
        path, label = self.entries[position]
        full_path = f"{self.root}/{path}"
        try:
            image = decode_rgb(full_path, None if self.shards is None else self.shards.read(position))
        except (RuntimeError, OSError) as error:
            # prepare() rejects bad files; one that went bad since is reported
            # and skipped, not allowed to end a run hours in.
            log.warning("skipping %s: cannot decode (%s)", self._where(position, full_path), error)
            return None
        if (image.shape[2], image.shape[1]) != self.sizes[position]:
            log.warning("skipping %s: %d x %d px, but prepare recorded %d x %d (the file changed since; "
                        "rerun prepare)", self._where(position, full_path), image.shape[2], image.shape[1],
                        *self.sizes[position])
            return None
        return apply_plan(image, box, self.size), label

    def _where(self, position: int, full_path: str) -> str:
        """Where a sample came from, for a warning: its file, or its shard and offset."""
        return full_path if self.shards is None else self.shards.describe(position)


class TorchvisionLoader(WorkerPoolLoader):
    """torchvision decode + uint8 transforms in DataLoader workers, normalised on the device."""

    backend = "torchvision"

    def __init__(self, spec: LoaderSpec):
        super().__init__(spec, ManifestDataset(spec), Normalizer(spec.transform, spec.output, spec.device))


BACKENDS = (
    Backend("torchvision", "torchvision.io decode + uint8 tensor transforms in DataLoader workers, "
            "normalised on the device", devices=("cpu", "cuda"), role="baseline",
            build=lambda spec, options: TorchvisionLoader(spec)),
)

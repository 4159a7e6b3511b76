"""The torchvision backend: the baseline that DALI is measured against.

Where a batch is decoded: `ManifestDataset.__getitem__`, in DataLoader worker
processes, with torchvision.io (libjpeg-turbo). Where it is augmented: the
same place, with transforms.v2 built from the shared `Transform`, on uint8
tensors. Normalisation and the float conversion happen after the copy to the
device (`Normalizer`), as in timm's PrefetchLoader: a uint8 batch is a
quarter of the bytes of a float32 one, and the GPU does the arithmetic.

Randomness: each image's augmentation is seeded by (seed, epoch, index), so a
batch does not depend on the number of workers, their persistence, or on
whether the run was resumed mid-way.
"""

from __future__ import annotations

import logging
import os
from typing import Iterator

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.io import ImageReadMode, decode_image, read_file
from torchvision.transforms import v2

from ..dataset import TORCHVISION_DECODES
from ..transforms import Output, Transform
from .base import Loader, LoaderSpec

log = logging.getLogger(__name__)

PREFETCH_FACTOR = 2  # batches in flight per worker (DataLoader's default)


def build_transform(t: Transform) -> v2.Compose:
    """The shared Transform as torchvision ops on a uint8 C x H x W tensor."""
    if t.crop == "random_resized":
        steps = [v2.RandomResizedCrop(t.size, scale=t.scale, ratio=t.ratio, antialias=True)]
    else:
        steps = [v2.Resize(t.resize, antialias=True), v2.CenterCrop(t.size)]
    if t.hflip > 0:
        steps.append(v2.RandomHorizontalFlip(t.hflip))
    return v2.Compose(steps)


class Normalizer:
    """uint8 N x C x H x W -> normalised float batch in the requested dtype and memory format.

    Mean and std live on the device once, not copied there for every batch.
    """

    def __init__(self, t: Transform, out: Output, device: torch.device):
        self.mean = torch.tensor(t.mean, device=device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(t.std, device=device).view(1, 3, 1, 1) * 255
        self.out = out

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        images = (images.float() - self.mean) / self.std
        return images.to(self.out.torch_dtype).contiguous(memory_format=self.out.memory_format)


def decode_rgb(path: str) -> torch.Tensor:
    """Decode to uint8 3 x H x W: torchvision.io (libjpeg-turbo) for JPEG/PNG, PIL for TIFF/BMP."""
    if os.path.splitext(path)[1].lower() in TORCHVISION_DECODES:
        return decode_image(read_file(path), mode=ImageReadMode.RGB)
    with Image.open(path) as image:
        return torch.from_numpy(np.asarray(image.convert("RGB")).copy()).permute(2, 0, 1).contiguous()


class ManifestDataset(Dataset):
    """Images listed in a manifest; indexed by (index, epoch) pairs from EpochSampler."""

    def __init__(self, root, entries: list[tuple[str, int]], transform: Transform, seed: int):
        self.root = str(root)
        self.entries = entries
        self.transform = build_transform(transform)
        self.seed = seed

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, key: tuple[int, int]):
        index, epoch = key
        path, label = self.entries[index]
        full_path = f"{self.root}/{path}"
        try:
            image = decode_rgb(full_path)
        except (RuntimeError, OSError) as error:
            # prepare() rejects bad files; one that went bad since is reported
            # and skipped, not allowed to end a run hours in.
            log.warning("skipping %s: cannot decode (%s)", full_path, error)
            return None
        # fork_rng: with workers=0 this runs in the training process, whose
        # global RNG (dropout) must not be reseeded by the data pipeline.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(hash((self.seed, epoch, index)) & 0x7FFF_FFFF_FFFF)
            return self.transform(image), label


def collate_skipping_bad(samples):
    """Stack a batch, leaving out samples the dataset could not decode (None)."""
    good = [s for s in samples if s is not None]
    if not good:
        return torch.empty(0, 3, 0, 0, dtype=torch.uint8), torch.empty(0, dtype=torch.long)
    return torch.stack([s[0] for s in good]), torch.tensor([s[1] for s in good], dtype=torch.long)


class EpochSampler(Sampler):
    """Yields (index, epoch) pairs: the loader's positions for its current epoch."""

    def __init__(self, loader: "TorchvisionLoader"):
        self.loader = loader

    def __iter__(self):
        epoch = self.loader.epoch
        return iter([(index, epoch) for index in self.loader._epoch_positions()])

    def __len__(self) -> int:
        return self.loader.num_samples - self.loader.skip_batches * self.loader.spec.batch_size


class TorchvisionLoader(Loader):
    """torchvision decode + transforms in DataLoader workers, normalised on the device."""

    backend = "torchvision"

    def __init__(self, spec: LoaderSpec):
        super().__init__(spec)
        self.sampler = EpochSampler(self)
        self.normalize = Normalizer(spec.transform, spec.output, spec.device)
        on_gpu = spec.device.type == "cuda"
        self.dataloader = DataLoader(
            ManifestDataset(spec.dataset.root, spec.entries, spec.transform, spec.seed),
            batch_size=spec.batch_size,
            sampler=self.sampler,
            num_workers=spec.workers,
            collate_fn=collate_skipping_bad,
            pin_memory=on_gpu,  # page-locked buffers make the copy asynchronous
            drop_last=spec.train,
            persistent_workers=spec.workers > 0,
            prefetch_factor=PREFETCH_FACTOR if spec.workers > 0 else None,
            # Its own generator: the DataLoader must not draw from the global
            # RNG, which dropout uses and a resumed run restores.
            generator=torch.Generator(),
        )

    @property
    def prefetch_depth(self) -> int:
        """Batches the workers prepare ahead of the consumer."""
        return self.spec.workers * PREFETCH_FACTOR

    def _host_batches(self):
        for images, labels in self.dataloader:
            if labels.numel():
                yield images, labels

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.spec.device.type == "cuda":
            yield from self._prefetch_to_gpu()
        else:
            for images, labels in self._host_batches():
                yield self.normalize(images), labels
        self._end_epoch()

    def _prefetch_to_gpu(self):
        """Copy and normalise batch k+1 on a side stream while the model works on batch k."""
        device = self.spec.device
        stream = torch.cuda.Stream(device)
        batches = self._host_batches()

        def stage():
            try:
                images, labels = next(batches)
            except StopIteration:
                return None
            with torch.cuda.stream(stream):
                images = self.normalize(images.to(device, non_blocking=True))
                labels = labels.to(device, non_blocking=True)
            return images, labels

        ready = stage()
        while ready is not None:
            torch.cuda.current_stream(device).wait_stream(stream)
            images, labels = ready
            # The tensors were made on the side stream but are used on the
            # main one: tell the caching allocator not to reuse them early.
            images.record_stream(torch.cuda.current_stream(device))
            labels.record_stream(torch.cuda.current_stream(device))
            ready = stage()
            yield images, labels

    def close(self) -> None:
        # Ends persistent workers now rather than at interpreter exit.
        self.dataloader = None


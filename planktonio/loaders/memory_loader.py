"""The memory backend: the upper bound of an input pipeline, for benchmarks only.

It makes its first few batches once (decoded and augmented in this process
with the shared operations, as the torchvision backend's workers would),
keeps them on the device, and hands them out again and again, an epoch's
worth of batches per epoch. What a consumer sees from it is what it would
see if loading cost nothing: the row every other backend is measured up to.
It reads the same images as the others for its first batches only, so it
does not train (a run refuses it).
"""

from __future__ import annotations

import time
from typing import Iterator

import torch

from .backend import Backend
from .base import Loader, LoaderSpec
from .ops import Normalizer, apply_plan, decode_rgb

REPLAYED = 8  # distinct batches kept: enough that a consumer does not see one tensor over and over


class MemoryLoader(Loader):
    """The first REPLAYED batches of epoch 0, made once and replayed from the device."""

    backend = "memory"

    def __init__(self, spec: LoaderSpec):
        super().__init__(spec)
        self._batches: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    def _make_batches(self) -> None:
        start = time.perf_counter()
        s = self.spec
        normalize = Normalizer(s.transform, s.output, s.device)
        self._batches = []
        for index in range(min(len(self), REPLAYED)):
            batch = self.batch_plan(0, index)
            images = []
            for i, position in enumerate(batch.positions.tolist()):
                data = None if s.shards is None else s.shards.read(position)
                image = decode_rgb(f"{s.dataset.root}/{s.entries[position][0]}", data)
                images.append(apply_plan(image, batch.plan.box(i), s.transform.size))
            labels = torch.tensor([s.entries[p][1] for p in batch.positions.tolist()], dtype=torch.long)
            self._batches.append((normalize(torch.stack(images).to(s.device)), labels.to(s.device)))
        self.build_seconds += time.perf_counter() - start
        self.pipelines_built += 1

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.skip_batches < len(self):
            if self._batches is None:
                self._make_batches()
            for index in range(self.skip_batches, len(self)):
                yield self._batches[index % len(self._batches)]
        self._end_epoch()

    def close(self) -> None:
        self._batches = None


BACKENDS = (
    Backend("memory", "the upper bound: a few batches made once and replayed from the device",
            devices=("cpu", "cuda"), role="upper-bound", trains=False,
            build=lambda spec, options: MemoryLoader(spec)),
)

"""The turbo backend: libjpeg-turbo decode and OpenCV resize in a thread pool, the fastest path on a CPU.

Where a batch is decoded and augmented: `ImageWork.fill`, on the threads of
one pool per loader (`spec.threads`), a slice of a batch per task. Per image:
- read: the file's bytes (loose files) or a view of its shard's memory map;
- decode: simplejpeg (libjpeg-turbo, accurate integer IDCT and fancy
  upsampling by default: the same pixels as torchvision.io's decode). Other
  formats, and JPEGs whose EXIF turns them, go to the shared decoder
  (ops.decode_rgb), which applies the orientation;
- crop and resize the plan's box (planktonio/plans.py) to size x size and
  flip it: ops.crop_resize_flip_hwc (OpenCV's bilinear where the box is
  enlarged, torch's antialiased uint8 kernel where it shrinks: the
  reference's filter either way);
- normalise: on a CPU each channel in one fused pass (ops.PlaneNormalizer),
  written straight into the batch's
  preallocated N x 3 x H x W memory; on a GPU the uint8 batch is copied
  (a quarter of the bytes) and normalised there (ops.Normalizer).
Every heavy call releases the GIL (simplejpeg, OpenCV, torch), so the
threads run in parallel; a thread's own OpenCV and torch calls stay on one
core (cv2.setNumThreads(1): the pool is the parallelism).

Batches are made ahead (PREFETCH_DEPTH) from the loader's BatchStream, across
epoch boundaries, as DALI's feed does; a resume or an abandoned epoch drops
what is in flight and redirects the stream. A file that cannot be decoded
is reported and left out of its batch, as the worker-pool backends do; a
training batch whose every file broke stops the loader with an error naming
them.
"""

from __future__ import annotations

import logging
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from ..declared import setting
from ..errors import PlanktonioError
from .backend import Backend, Goal
from .base import BatchBuffers, BatchPlan, BatchStream, Loader, LoaderSpec, entry_labels
from .ops import Normalizer, PlaneNormalizer, crop_resize_flip_hwc, decode_rgb, is_upright_jpeg, one_core_each

log = logging.getLogger(__name__)

PREFETCH_DEPTH = 2      # batches in flight ahead of the consumer
TASKS_PER_THREAD = 2    # slices of a batch per thread: a slow image does not leave the other threads idle


@dataclass(frozen=True)
class TurboOptions:
    """The turbo backend's own settings (the training config's `loader.options`)."""

    fast_idct: bool = setting(False, help="libjpeg-turbo's fast integer IDCT and upsampling: a few percent "
                                          "faster, pixels up to a few levels off the other backends'")


class ImageWork:
    """What a pool thread does to the images of a batch: decode, crop and resize, flip, normalise into place."""

    def __init__(self, spec: LoaderSpec, options: TurboOptions):
        import simplejpeg
        self.simplejpeg = simplejpeg
        self.root, self.entries, self.shards = str(spec.dataset.root), spec.entries, spec.shards
        self.widths, self.heights = spec.widths, spec.heights
        self.size, self.fast_idct = spec.transform.size, options.fast_idct
        self.normalize_into = PlaneNormalizer(spec.transform)

    def where(self, position: int) -> str:
        return f"{self.root}/{self.entries[position][0]}" if self.shards is None else self.shards.describe(position)

    def read(self, position: int):
        if self.shards is not None:
            return self.shards.read(position)
        with open(f"{self.root}/{self.entries[position][0]}", "rb") as file:
            return file.read()

    def decode(self, position: int, data) -> np.ndarray:
        """uint8 H x W x 3 RGB, upright."""
        if is_upright_jpeg(data):
            return self.simplejpeg.decode_jpeg(data, "RGB", fastdct=self.fast_idct, fastupsample=self.fast_idct)
        path = f"{self.root}/{self.entries[position][0]}"
        return decode_rgb(path, None if self.shards is None else data).permute(1, 2, 0).numpy()

    def image(self, position: int, box) -> np.ndarray | None:
        """One image as planned, or None (reported) where it cannot be decoded or changed size."""
        try:
            image = self.decode(position, self.read(position))
        except (ValueError, RuntimeError, OSError) as error:
            log.warning("skipping %s: cannot decode (%s)", self.where(position), error)
            return None
        expected = (int(self.heights[position]), int(self.widths[position]))
        if image.shape[:2] != expected:
            log.warning("skipping %s: %d x %d px, but prepare recorded %d x %d (the file changed since; rerun "
                        "prepare)", self.where(position), image.shape[1], image.shape[0], *expected[::-1])
            return None
        return crop_resize_flip_hwc(image, box, self.size)

    def fill(self, batch: BatchPlan, out: np.ndarray, rows: range) -> list[int]:
        """Make images `rows` of the batch into out[rows] (float32 normalised, or uint8 N x 3 x H x W);
        returns the rows left out."""
        bad = []
        for row in rows:
            resized = self.image(int(batch.positions[row]), batch.plan.box(row))
            if resized is None:
                bad.append(row)
            elif out.dtype == np.uint8:
                out[row] = resized.transpose(2, 0, 1)
            else:
                self.normalize_into(resized, out[row])
        return bad


class TurboLoader(Loader):
    """Batches made by a thread pool: libjpeg-turbo decode, OpenCV resize, one fused normalise into place."""

    backend = "turbo"
    prefetch_depth = PREFETCH_DEPTH

    def __init__(self, spec: LoaderSpec, options: TurboOptions = TurboOptions()):
        super().__init__(spec)
        self.work = ImageWork(spec, options)
        self.stream = BatchStream(self)
        self.labels = torch.from_numpy(entry_labels(spec.entries))
        on_gpu = spec.device.type == "cuda"
        size = spec.transform.size
        # float32 rows in the layout asked for (channels-last: each row H x W x 3), uint8 for a GPU
        self.channels_last = not on_gpu and spec.output.layout == "NHWC"
        shape = (spec.batch_size, size, size, 3) if self.channels_last else (spec.batch_size, 3, size, size)
        self.buffers = BatchBuffers(shape, np.uint8 if on_gpu else np.float32)
        self.normalize = Normalizer(spec.transform, spec.output, spec.device) if on_gpu else None
        self.pool = ThreadPoolExecutor(spec.threads, thread_name_prefix="turbo", initializer=one_core_each)
        self.tasks = spec.threads * TASKS_PER_THREAD
        self.pending: deque[tuple[BatchPlan, np.ndarray, list]] = deque()

    def _submit(self) -> None:
        batch = self.stream.advance()
        out = self.buffers.take(len(batch.positions))
        slices = np.array_split(np.arange(len(batch.positions)), min(self.tasks, len(batch.positions)))
        futures = [self.pool.submit(self.work.fill, batch, out, range(s[0], s[-1] + 1)) for s in slices if len(s)]
        self.pending.append((batch, out, futures))

    def _position(self, epoch: int, index: int) -> None:
        """Make the next batch received (epoch, index): drop what is in flight for anything else."""
        if self.stream.upcoming() != (epoch, index):
            for _, _, futures in self.pending:
                for future in futures:
                    future.result()  # their buffers must not be reused while a thread still writes them
            self.pending.clear()
            self.stream.in_flight.clear()
            self.stream.redirect(epoch, index)
        while len(self.pending) < PREFETCH_DEPTH:
            self._submit()

    def _receive(self, epoch: int, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        batch, out, futures = self.pending.popleft()
        bad = sorted(row for future in futures for row in future.result())
        self.stream.received(epoch, index)
        self._submit()
        images, labels = torch.from_numpy(out), self.labels[torch.from_numpy(batch.positions)]
        if self.channels_last:
            images = images.permute(0, 3, 1, 2)  # N,H,W,C storage seen as N,C,H,W: channels_last
        if bad:
            keep = torch.from_numpy(np.setdiff1d(np.arange(len(out)), bad))
            images, labels = images[keep], labels[keep]
            if not len(keep) and self.spec.train:
                raise PlanktonioError(self.all_bad_message(epoch, index))
        return self._finish(images), labels.to(self.spec.device)

    def _finish(self, images: torch.Tensor) -> torch.Tensor:
        out = self.spec.output
        if self.normalize is not None:  # uint8 on the host: copy a quarter of the bytes, normalise on the GPU
            return self.normalize(images.pin_memory().to(self.spec.device, non_blocking=True))
        return images.to(out.torch_dtype).contiguous(memory_format=out.memory_format)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch, first = self.epoch, self.skip_batches
        if first < len(self):
            self._position(epoch, first)
            for index in range(first, len(self)):
                images, labels = self._receive(epoch, index)
                if len(labels):
                    yield images, labels
        self._end_epoch()

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.pending.clear()
        self.stream.in_flight.clear()


BACKENDS = (
    Backend("turbo", "libjpeg-turbo decode (simplejpeg) and OpenCV resize in a thread pool, normalised in one "
            "pass into the batch", devices=("cpu", "cuda"), role="candidate", options=TurboOptions,
            build=lambda spec, options: TurboLoader(spec, options),
            goals=(Goal("peers", 1.0, "cpu", "FFCV's own recipe (libjpeg-turbo, OpenCV, threads, memory "
                                             "written in place) with the project's plans"),)),
)

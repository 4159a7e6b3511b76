"""The DALI backend: decode and augment with NVIDIA DALI, on the GPU or the CPU.

One pipeline per loader for the whole run. Its input is an endless stream
of batches fed from Python (`PlanFeed`, through fn.external_source): for
each batch the file names, labels, crop boxes and flips of its images, as
small per-batch arrays computed from the shared plans (planktonio/plans.py).
Inside the pipeline, all in C++:
- fn.io.file.read reads the files;
- where a batch is decoded: dali_graph.decode, fn.decoders.image_slice: only
  the planned box (a region-of-interest decode); dali-gpu uses DALI's "mixed"
  decoder (nvJPEG on the GPU, and the hardware JPEG decoder on
  A100/H100/H200), dali-cpu the CPU decoder;
- where it is augmented: fn.resize to size x size, then
  fn.crop_mirror_normalize flips (per the plan) and normalises.

The stream runs across epoch boundaries: after batch n-1 of epoch e the
feed goes on with batch 0 of epoch e+1, so DALI prefetches the next epoch's
first batches while the consumer finishes this one, and an epoch boundary
costs no more than any other batch. If the consumer asks for something else
(a resume at batch k, an epoch abandoned half-way), the feed is redirected
and the few batches already in flight are read and dropped: still the same
pipeline. Nothing in the pipeline is random, so any batch of any epoch can
be replayed exactly, which is what makes resume exact.

Evaluation uses the same pipeline shape: batch k of shard i is a slice of
the shard's contiguous range of the manifest (sharding.py), the last one
short, so every image is seen exactly once per epoch across the shards.

The outputs reach torch without the host waiting for the GPU
(dali_graph.PipelineOutputs: bound to torch's stream, kept alive until
torch's work on them is done).
"""

from __future__ import annotations

import time
from typing import Iterator

import numpy as np
import torch

from ..errors import PlanktonioError
from .backend import Backend, Goal
from .base import BatchStream, Loader, LoaderSpec, entry_labels
from .dali_graph import PipelineOutputs, decode, device_id

PREFETCH_DEPTH = 2  # batches DALI prepares ahead of the consumer


def build_pipeline(spec: LoaderSpec, decode_on_gpu: bool, feed):
    """The DALI pipeline: read, ROI-decode, resize, flip and normalise each fed batch."""
    from nvidia.dali import fn, pipeline_def, types

    t, out = spec.transform, spec.output
    on_gpu = spec.device.type == "cuda"

    @pipeline_def
    def pipeline():
        names, labels, anchors, shapes, flips = fn.external_source(source=feed, num_outputs=5, batch=True)
        # From packed shards the feed hands over the images' bytes themselves, not file names.
        encoded = names if spec.shards is not None else fn.io.file.read(names)
        # anchor = (x, y), shape = (width, height) in source pixels: the plan's box.
        images = decode(encoded, spec.widths, spec.heights, decode_on_gpu, box=(anchors, shapes))
        images = fn.resize(images, resize_x=t.size, resize_y=t.size, antialias=True)
        if on_gpu and not decode_on_gpu:
            images = images.gpu()  # DALI CPU decode, normalise on the GPU, as torchvision does
        images = fn.crop_mirror_normalize(
            images,
            mirror=flips,
            mean=[255 * m for m in t.mean],
            std=[255 * s for s in t.std],
            dtype=types.FLOAT16 if out.dtype == "float16" else types.FLOAT,
            output_layout="HWC" if out.layout == "NHWC" else "CHW",
        )
        if on_gpu:
            labels = labels.gpu()  # a pinned CPU output would make handing it to torch wait on the host
        return images, labels

    return pipeline(batch_size=spec.batch_size, num_threads=spec.threads, device_id=device_id(spec.device),
                    prefetch_queue_depth=PREFETCH_DEPTH)


class PlanFeed:
    """The pipeline's source: the next batch of the loader's BatchStream, as per-batch arrays.

    DALI calls it (in this process, on the thread that asks for outputs)
    each time it starts preparing a batch.
    """

    def __init__(self, loader: "DaliLoader"):
        self.stream = BatchStream(loader)
        self.root, self.entries = str(loader.spec.dataset.root), loader.spec.entries
        self.labels = entry_labels(loader.spec.entries).astype(np.int32)
        self.shards = loader.spec.shards

    def name(self, position: int) -> np.ndarray:
        """A file's name as the byte array fn.io.file.read takes (made per batch: none kept per image)."""
        return np.frombuffer(f"{self.root}/{self.entries[position][0]}".encode(), dtype=np.uint8)

    def __call__(self):
        batch = self.stream.advance()
        plan, positions = batch.plan, batch.positions
        read = self.name if self.shards is None else self.shards.read  # name, or the bytes
        return ([read(p) for p in positions.tolist()],
                self.labels[positions].reshape(-1, 1),
                np.stack([plan.x, plan.y], axis=1).astype(np.int32),
                np.stack([plan.width, plan.height], axis=1).astype(np.int32),
                plan.flip.astype(np.int32))


class BrokenFile(PlanktonioError):
    """A file DALI stopped on (it cannot skip a sample): which one, and why, for a caller that goes on
    without it (`train predict`); a run reports it in one line."""

    def __init__(self, position: int, path: str, reason: str, detail: str):
        super().__init__(f"{path}: {reason} ({detail}); DALI stopped on it (rerun prepare if it broke since, "
                         f"then resume)")
        self.position, self.path, self.reason, self.detail = position, path, reason, detail


class DaliLoader(Loader):
    """Batches from one DALI pipeline; decode_on_gpu: the mixed decoder (dali-gpu), else the CPU one."""

    prefetch_depth = PREFETCH_DEPTH

    def __init__(self, spec: LoaderSpec, decode_on_gpu: bool):
        super().__init__(spec)
        self.decode_on_gpu = decode_on_gpu
        self.backend = "dali-gpu" if decode_on_gpu else "dali-cpu"
        self.feed = PlanFeed(self)
        self._outputs: PipelineOutputs | None = None
        self.batches_dropped = 0  # read and thrown away after a redirect (resume, abandoned epoch)

    def _position(self, epoch: int, index: int) -> None:
        """Build the pipeline on first use, or redirect it: its next output is batch (epoch, index)."""
        if self._outputs is None:
            start = time.perf_counter()
            self.feed.stream.redirect(epoch, index)
            pipe = build_pipeline(self.spec, self.decode_on_gpu, self.feed)
            pipe.build()
            # The first batch, too, is decoded in _next_output, where a broken file is named.
            self._outputs = PipelineOutputs(pipe, self.spec.device)
            self.build_seconds += time.perf_counter() - start
            self.pipelines_built += 1
        elif self.feed.stream.upcoming() != (epoch, index):
            stream = self.feed.stream
            stale = stream.redirect(epoch, index)
            for _ in range(stale):  # already being decoded: read and drop them
                self._next_output()
                stream.received(*stream.in_flight[0])
            self.batches_dropped += stale

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch, first = self.epoch, self.skip_batches
        if first < len(self):  # else nothing is left of this epoch (a resume that skips all of it)
            self._position(epoch, first)
            for index in range(first, len(self)):
                images, labels = self._next_output()
                self.feed.stream.received(epoch, index)
                if self.spec.output.layout == "NHWC":
                    images = images.permute(0, 3, 1, 2)  # N,H,W,C storage seen as N,C,H,W: channels_last
                yield images, labels.view(-1).long()
        self._end_epoch()

    def _next_output(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The pipeline's next batch; a file that broke since prepare is named, not left to a C++ message."""
        try:
            return self._outputs.next()
        except RuntimeError:
            in_flight = list(self.feed.stream.in_flight)
            self.close()  # a DALI pipeline that failed cannot go on
            # DALI cannot skip a bad file and says only "Failed to decode sample #k": decode the images of
            # every batch in flight again, on the CPU, to find the culprit (a batch or three, once).
            from ..dataset import _decode_check, inspect_image
            suspects = [p for epoch, index in in_flight for p in self.batch_plan(epoch, index).positions.tolist()]
            for position in suspects:
                if self.spec.shards is None:
                    path = self.spec.dataset.root / self.spec.entries[position][0]
                    problem = inspect_image(path).problem
                else:
                    path = self.spec.shards.describe(position)
                    problem = _decode_check(self.spec.entries[position][0],
                                            self.spec.shards.read(position).tobytes()).problem
                if problem:
                    raise BrokenFile(position, str(path), *problem) from None
            raise

    def close(self) -> None:
        if self._outputs is not None:
            self._outputs.close()  # waits for torch's work on the batches DALI's buffers hold
        self._outputs = None
        self.feed.stream.in_flight.clear()  # a new pipeline starts with nothing in flight


BACKENDS = (
    Backend("dali-gpu", "DALI: region-of-interest JPEG decode on the GPU (mixed decoder: nvJPEG, or the "
            "hardware decoder), resize and normalise there", devices=("cuda",), role="candidate",
            build=lambda spec, options: DaliLoader(spec, decode_on_gpu=True),
            goals=(Goal("reference", 10.0, "cuda", "decoding on the GPU removes the CPU bottleneck"),)),
    Backend("dali-cpu", "DALI: the same pipeline on CPU threads (region-of-interest decode, C++ resize)",
            devices=("cpu", "cuda"), role="candidate",
            build=lambda spec, options: DaliLoader(spec, decode_on_gpu=False),
            goals=(Goal("reference", 2.0, "cpu", "C++ threads and decoding only the crop"),)),
)
# A name that stands for a backend chosen by the device.
ALIASES = {"dali": ("dali-gpu", "dali-cpu")}

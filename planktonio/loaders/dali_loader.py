"""The DALI backend: decode and augment with NVIDIA DALI, on the GPU or the CPU.

Where a batch is decoded: `_build_pipeline`, in `fn.decoders.*`; with
decode="gpu" DALI's "mixed" decoder parses on the CPU and decodes with
nvJPEG on the GPU (and the hardware JPEG decoder on A100/H100/H200).
Where it is augmented: the same function, `fn.resize` and
`fn.crop_mirror_normalize`, read from the shared `Transform`.

Epoch rules (see sharding.py):
- evaluation: one pipeline for the whole run; DALI's reader shards the
  manifest (shard_id/num_shards), pads each shard's last batch
  (pad_last_batch) and the iterator trims the padding (PARTIAL +
  reader_name), so every image is seen exactly once.
- training: a pipeline per epoch, reading the epoch's list of files from
  sharding.train_order. DALI's own shuffling cannot do this job: its
  buffer shuffle (random_shuffle) only mixes ~1,000 neighbouring files of a
  class-sorted manifest, and with shuffle_after_epoch the shards of
  different ranks overlapped from the second epoch on (measured here, DALI
  2.4, shard sizes not a multiple of the batch). An explicit list gives
  disjoint shards, the same order as the torchvision backend, and an order
  and augmentation stream that depend only on (seed, epoch, rank), so a
  resumed run reads what an uninterrupted one would. The price is building
  a pipeline per epoch (`build_seconds` records it).
"""

from __future__ import annotations

import time
from typing import Iterator

import torch

from .base import Loader, LoaderSpec

READER_NAME = "Reader"
PREFETCH_DEPTH = 2  # batches DALI prepares ahead of the consumer

# Preallocation for the mixed decoder, from DALI's ResNet-50 example: without
# it nvJPEG's buffers grow batch by batch to a high-water mark, and the first
# epochs pay for reallocations.
MIXED_DECODER_HINTS = {
    "device_memory_padding": 211_025_920,
    "host_memory_padding": 140_544_512,
    "preallocate_width_hint": 512,
    "preallocate_height_hint": 512,
}


def _build_pipeline(spec: LoaderSpec, decode: str, files: list[str] | None, labels: list[int] | None,
                    seed: int):
    # Imported here so that `import planktonio` stays light and DALI's start-up
    # cost is paid only by runs that use it.
    from nvidia.dali import fn, pipeline_def, types

    t, out = spec.transform, spec.output
    on_gpu = spec.device.type == "cuda"
    decoder_device = "mixed" if decode == "gpu" else "cpu"
    hints = MIXED_DECODER_HINTS if decode == "gpu" else {}
    if files is None:  # evaluation: DALI shards the manifest itself
        source = {"file_root": str(spec.dataset.root), "file_list": str(spec.dataset.manifest(spec.split)),
                  "shard_id": spec.shard_index, "num_shards": spec.shard_count,
                  "stick_to_shard": True, "pad_last_batch": True}
    else:  # training: this epoch's files, already in order and sharded
        source = {"files": files, "labels": labels}

    @pipeline_def
    def pipeline():
        jpegs, labels = fn.readers.file(name=READER_NAME, **source)
        if t.crop == "random_resized":
            # Decodes only the randomly chosen region: less work than decode-then-crop.
            images = fn.decoders.image_random_crop(
                jpegs, device=decoder_device, output_type=types.RGB,
                random_area=list(t.scale), random_aspect_ratio=list(t.ratio), num_attempts=10, **hints)
            images = fn.resize(images, resize_x=t.size, resize_y=t.size, antialias=True)
            crop = None
        else:
            images = fn.decoders.image(jpegs, device=decoder_device, output_type=types.RGB, **hints)
            images = fn.resize(images, resize_shorter=t.resize, antialias=True)
            crop = (t.size, t.size)
        if on_gpu and decoder_device == "cpu":
            images = images.gpu()  # DALI CPU decode, normalise on the GPU, as torchvision does
        mirror = fn.random.coin_flip(probability=t.hflip) if t.hflip > 0 else 0
        images = fn.crop_mirror_normalize(
            images,
            crop=crop,
            mirror=mirror,
            mean=[255 * m for m in t.mean],
            std=[255 * s for s in t.std],
            dtype=types.FLOAT16 if out.dtype == "float16" else types.FLOAT,
            output_layout="HWC" if out.layout == "NHWC" else "CHW",
        )
        if on_gpu:
            labels = labels.gpu()
        return images, labels

    return pipeline(batch_size=spec.batch_size, num_threads=spec.workers,
                    device_id=(spec.device.index or 0) if on_gpu else None,
                    seed=seed, prefetch_queue_depth=PREFETCH_DEPTH)


class DaliLoader(Loader):
    """Batches from a DALI pipeline; decode="gpu" (mixed decoder) or "cpu"."""

    def __init__(self, spec: LoaderSpec, decode: str):
        super().__init__(spec)
        self.decode = decode
        self.backend = f"dali-{decode}"
        self._eval_iterator = None
        self.build_seconds = 0.0  # time spent building pipelines, for the benchmarks

    def _iterator(self, files=None, labels=None, seed=0):
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        start = time.perf_counter()
        pipe = _build_pipeline(self.spec, self.decode, files, labels, seed)
        iterator = DALIGenericIterator(
            pipe, ["images", "labels"], reader_name=READER_NAME, auto_reset=True,
            last_batch_policy=LastBatchPolicy.DROP if files is not None else LastBatchPolicy.PARTIAL)
        self.build_seconds += time.perf_counter() - start
        return iterator

    def _epoch_iterator(self):
        s = self.spec
        if not s.train:
            if self._eval_iterator is None:  # built on first use: building allocates decoder memory
                self._eval_iterator = self._iterator(seed=s.seed)
            return self._eval_iterator
        entries = s.entries
        order = self._epoch_positions()
        if not order:  # a resume that skips the whole epoch: nothing left to read
            return iter(())
        root = s.dataset.root
        # Augmentation randomness: a function of (seed, epoch, rank), different on every rank.
        seed = (s.seed * 1_000_003 + self.epoch * 1_009 + s.shard_index) % (2**31)
        return self._iterator([str(root / entries[i][0]) for i in order], [entries[i][1] for i in order], seed)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for outputs in self._epoch_iterator():
            images, labels = outputs[0]["images"], outputs[0]["labels"]
            # An evaluation shard shorter than the longest one ends with an
            # all-padding batch that PARTIAL trims to nothing.
            if images.shape[0] == 0:
                continue
            if self.spec.output.layout == "NHWC":
                images = images.permute(0, 3, 1, 2)  # N,H,W,C storage seen as N,C,H,W: channels_last
            yield images, labels.view(-1).long()
        self._end_epoch()

    @property
    def prefetch_depth(self) -> int:
        return PREFETCH_DEPTH

    def close(self) -> None:
        self._eval_iterator = None

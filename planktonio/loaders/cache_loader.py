"""The cache backend: decode a split once, keep the uint8 images on the device, augment with tensor operations.

Decoded once, on first use: every image the loader will read (the whole
split for training, its evaluation shard's range otherwise), by one DALI
pipeline fed encoded bytes (loose files and shards alike): the "mixed"
decoder on cuda, the CPU decoder otherwise, so the CPU path CI runs is the
GPU path's code but for one argument. The images stay as uint8 tensors
(`ImageStore`) on the device within the process's cache budget
(planktonio/memory.py) and the `budget_bytes` option; past it, by the
`overflow` option, in (pinned, chunked) host memory with each batch copied
over, or an error saying how much is needed and what is left.

Augmented on the device from the plan (planktonio/plans.py), as every
backend: crop the box, resize, flip, normalise.
- On a GPU, equal-size images: crop, resize and flip of a whole batch are
  two batched matrix products with per-image weight matrices
  (`resize_weights`: the weights of torch's antialiased bilinear resize,
  the arithmetic of torchvision's, not an approximation; roi_align and
  grid_sample sample a few points per pixel and alias when shrinking). With
  TF32 matmuls allowed a pixel may come out a level off.
- Other sizes on a GPU: each image's box resized on its own (F.interpolate
  with antialias).
- On a CPU, a thread pool cuts each image's box, resizes it with the turbo
  backend's operations (ops.crop_resize_flip_hwc) and normalises it straight
  into the batch's memory (ops.PlaneNormalizer): the decoding backends' own
  per-image work less the decode. The batched path is tested on the CPU
  against it (`fast_path=True`).
Pixels are rounded to whole levels, as the other backends' uint8 resizes
do, then normalised. Nothing here is random: sharding, order and plans come
from Loader.batch_plan. docs/loaders.md ("Which backend when").
"""

from __future__ import annotations

import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterator

import cv2
import numpy as np
import torch
import torch.nn.functional as TF

from .. import memory
from ..declared import Bytes, setting
from ..errors import PlanktonioError
from ..image_checks import inspect_image
from . import sharding
from .backend import Backend, Goal
from .base import BatchBuffers, BatchPlan, Loader, LoaderSpec, entry_labels
from .dali_graph import decode, device_id
from .ops import Normalizer, PlaneNormalizer, crop_resize_flip_hwc, one_core_each

DECODE_BATCH = 64     # images per DALI decode run
MAX_PENDING = 4       # decoded batches kept alive for copies still queued (GPU memory: a few batches)
KIND = "image cache"  # what its bytes are called in the process's cache budget (planktonio/memory.py)


@dataclass(frozen=True)
class CacheOptions:
    """The cache backend's own settings (the training config's `loader.options`)."""

    budget_bytes: Bytes | None = setting(None, help="decoded bytes the process's cache loaders may keep on the "
                                                    "device together, within the process's cache budget "
                                                    "(planktonio/memory.py; e.g. 2GiB); default: that budget")
    overflow: str = setting("host", choices=("host", "error"),
                            help="past the budget: keep the images in (pinned) host memory and copy each batch "
                                 "over, or refuse with the size needed")

    def problems(self) -> list[tuple[str, str]]:
        if self.budget_bytes is not None and self.budget_bytes < 0:
            return [("budget_bytes", f"budget_bytes must be >= 0, not {self.budget_bytes}")]
        return []


# ---------------------------------------------------------------- resizing


def resize_weights(start: torch.Tensor, length: torch.Tensor, source: int, size: int) -> torch.Tensor:
    """N x size x source: the antialiased bilinear weights of resizing [start, start + length) to size pixels.

    The filter of torch's _upsample_bilinear2d_aa (align_corners=False, PIL's
    algorithm): output pixel i is centred at scale * (i + 0.5) in the box,
    scale = length / size; the triangle filter is stretched by scale when
    shrinking (antialiasing) and is the plain linear interpolation when
    enlarging; the weights of each output pixel are normalised to sum to 1.
    Pixels outside the box get weight 0, which is how the crop happens.
    """
    length = length.to(torch.float32).view(-1, 1, 1)
    scale = length / size
    support = scale.clamp(min=1.0)                      # filter half-width, in source pixels
    centre = scale * (torch.arange(size, dtype=torch.float32, device=start.device).view(1, -1, 1) + 0.5)
    pixel = torch.arange(source, dtype=torch.float32, device=start.device).view(1, 1, -1) - start.view(-1, 1, 1)
    inside = (pixel >= 0) & (pixel < length)
    weights = (1 - ((pixel + 0.5 - centre) / support).abs()).clamp(min=0) * inside
    return weights / weights.sum(dim=2, keepdim=True)


def crop_resize_flip_equal(images: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """Float N x 3 x H x W (all one size) -> N x 3 x size x size: each image's box, resized and flipped.

    boxes: int64 N x 5 on the images' device, rows (x, y, width, height, flip).
    """
    x, y, w, h, flip = boxes.unbind(1)
    rows = resize_weights(y, h, images.shape[2], size)             # N x size x H
    columns = resize_weights(x, w, images.shape[3], size)          # N x size x W
    columns = torch.where(flip.view(-1, 1, 1).bool(), columns.flip(1), columns)
    out = torch.matmul(rows.unsqueeze(1), images)                  # N x 3 x size x W
    return torch.matmul(out, columns.transpose(1, 2).unsqueeze(1))  # N x 3 x size x size


def resize_flip_one(crop: torch.Tensor, flip: int, size: int) -> torch.Tensor:
    """Float 3 x h x w (a plan's box) -> 3 x size x size: resized (antialiased bilinear), flipped if planned."""
    resized = TF.interpolate(crop[None], size=(size, size), mode="bilinear", align_corners=False,
                             antialias=True)[0]
    return resized.flip(-1) if flip else resized


# ---------------------------------------------------------------- the store


class ImageStore:
    """Decoded uint8 3 x h x w images, by slot, in one or more flat chunks.

    On the device: one chunk. In host memory: chunks of memory.CHUNK_BYTES
    (pinned on a GPU host: one 9 GB tensor would pin 16 GB, see memory.py).
    """

    def __init__(self, widths: np.ndarray, heights: np.ndarray, device: torch.device, pin: bool,
                 chunk_bytes: int | None = None):
        self.widths, self.heights = widths, heights
        self.equal = len(widths) > 0 and len(set(widths.tolist())) == 1 and len(set(heights.tolist())) == 1
        sizes = (3 * widths * heights).astype(np.int64)
        self.chunk_of, self.offset, chunk_sizes = memory.plan_chunks(sizes, chunk_bytes)
        self.sizes = sizes
        self.chunks = memory.allocate_chunks(chunk_sizes, device, pin)
        if self.equal:  # each chunk seen as a stack of equal images, for batched gathers
            shape = (3, int(heights[0]), int(widths[0]))
            self.stacks = [c.view(-1, *shape) for c in self.chunks]
            self.index_in_chunk = self.offset // int(sizes[0])

    @property
    def nbytes(self) -> int:
        return sum(c.numel() for c in self.chunks)

    def is_pinned(self) -> bool:
        return all(c.is_pinned() for c in self.chunks)

    def image(self, slot: int) -> torch.Tensor:
        start = int(self.offset[slot])
        flat = self.chunks[int(self.chunk_of[slot])][start:start + int(self.sizes[slot])]
        return flat.view(3, int(self.heights[slot]), int(self.widths[slot]))

    def put(self, slot: int, image_hwc: torch.Tensor) -> None:
        """Queued on torch's stream, not waited for: synchronise before the host reads the store, and keep
        image_hwc's memory (DALI's, freed in DALI's stream order) alive until then."""
        self.image(slot).copy_(image_hwc.permute(2, 0, 1), non_blocking=True)

    def gather(self, slots: np.ndarray, device_slots: torch.Tensor | None = None,
               out: torch.Tensor | None = None) -> torch.Tensor:
        """Equal sizes: the images of `slots` as one N x 3 x H x W tensor (on the store's device).

        device_slots: the same slots as a tensor on the store's device (one
        chunk: a single index_select there); out: a tensor to gather into.
        """
        if len(self.stacks) == 1:
            index = device_slots if device_slots is not None else torch.from_numpy(slots)
            return torch.index_select(self.stacks[0], 0, index, out=out) if out is not None else \
                self.stacks[0].index_select(0, index)
        if out is None:
            out = torch.empty((len(slots), *self.stacks[0].shape[1:]), dtype=torch.uint8)
        chunks = self.chunk_of[slots]
        for chunk in np.unique(chunks).tolist():
            rows = np.flatnonzero(chunks == chunk)
            out[torch.from_numpy(rows)] = self.stacks[chunk].index_select(
                0, torch.from_numpy(self.index_in_chunk[slots[rows]]))
        return out


# ---------------------------------------------------------------- decoding


def loose_files(spec: LoaderSpec):
    """encoded(position) for a prepared folder of loose files: the file's bytes."""
    root = spec.dataset.root

    def encoded(position: int) -> np.ndarray:
        return np.fromfile(f"{root}/{spec.entries[position][0]}", dtype=np.uint8)
    return encoded


def build_decoder(spec: LoaderSpec, positions: np.ndarray):
    """A DALI pipeline that decodes fed batches of encoded images to uint8 H x W x 3 RGB (EXIF applied)."""
    from nvidia.dali import fn, pipeline_def, types

    on_gpu = spec.device.type == "cuda"

    @pipeline_def
    def decoder():
        encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
        return decode(encoded, spec.widths[positions], spec.heights[positions], on_gpu)

    pipe = decoder(batch_size=DECODE_BATCH, num_threads=spec.threads, device_id=device_id(spec.device),
                   prefetch_queue_depth=1)
    pipe.build()
    return pipe


def decode_into(store: ImageStore, spec: LoaderSpec, positions: np.ndarray, encoded) -> None:
    """Decode the images at `positions` (slot i holds positions[i]) into the store, checking their sizes.

    On a GPU nothing here waits for the GPU but to bound the DALI batches kept alive for copies still
    queued; the caller synchronises once at the end before the store is read (CacheLoader.decode).
    """
    pipe = build_decoder(spec, positions)
    stream = torch.cuda.current_stream(spec.device) if spec.device.type == "cuda" else None
    pending: deque[tuple[torch.cuda.Event, object]] = deque()  # (copies done, DALI outputs they read)
    for first in range(0, len(positions), DECODE_BATCH):
        chunk = positions[first:first + DECODE_BATCH].tolist()
        pipe.feed_input("encoded", [encoded(p) for p in chunk])
        try:
            # bound to torch's stream: it waits for DALI's decode on the GPU, the host does not
            (images,) = pipe.run(stream) if stream is not None else pipe.run()
        except RuntimeError as error:
            raise _decode_error(spec, chunk, error) from None
        for i, position in enumerate(chunk):
            shape = images[i].shape()
            expected = [int(spec.heights[position]), int(spec.widths[position]), 3]
            if list(shape) != expected:
                raise PlanktonioError(
                    f"{spec.dataset.root / spec.entries[position][0]}: decoded {shape[1]} x {shape[0]} px, "
                    f"but prepare recorded {expected[1]} x {expected[0]} (the file changed since; rerun prepare)")
            store.put(first + i, torch.from_dlpack(images[i]))  # DALI's buffer itself, no copy
        if stream is not None:
            # DALI frees a buffer in its own stream's order: keep each batch until its copies are done.
            copied = torch.cuda.Event()
            copied.record(stream)
            pending.append((copied, images))
            while pending and (len(pending) > MAX_PENDING or pending[0][0].query()):
                pending.popleft()[0].synchronize()  # waits only when the GPU is MAX_PENDING batches behind
    if stream is not None:
        stream.synchronize()  # the one wait: every copy done, then DALI's buffers may go
    pending.clear()


def _decode_error(spec: LoaderSpec, chunk: list[int], error: Exception) -> PlanktonioError:
    """Name the file that failed: prepare's own check, run on each file of the failing batch."""
    for position in chunk if spec.shards is None else ():  # shards: their bytes passed sha256 checks
        path = spec.dataset.root / spec.entries[position][0]
        problem = inspect_image(path).problem
        if problem is not None:
            return PlanktonioError(f"{path}: cannot decode ({problem[0]}: {problem[1]}); the file changed "
                                   f"since prepare: restore it or rerun prepare")
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return PlanktonioError(f"{spec.dataset.path}: decoding images {chunk[0]}-{chunk[-1]} of the {spec.split} "
                           f"manifest failed ({first_line}); rerun prepare")


# ---------------------------------------------------------------- the loader


class CacheLoader(Loader):
    """Decode once into an ImageStore, then every batch from the plan with tensor operations on the device.

    stats() after the first iteration: decode_seconds (the one decode,
    pipeline build included), cache_bytes (what the store holds),
    bytes_per_image, placement ("device", or "host" past the budget) and
    device_bytes (the share of cache_bytes on the device).
    """

    backend = "cache"
    prefetch_depth = 0  # batches are made on demand; on a GPU the kernels queue asynchronously

    def __init__(self, spec: LoaderSpec, options: CacheOptions = CacheOptions(), *, encoded=None,
                 fast_path: bool | None = None):
        super().__init__(spec)
        self.options = options
        self.encoded = encoded or (spec.shards.read if spec.shards is not None else loose_files(spec))
        # None: batched on a GPU when all images are one size, per image (uint8 kernel) on a CPU;
        # True/False force a GPU's paths anywhere: batched, or per image in float (tests compare them)
        self.fast_path = fast_path
        # The images this loader will ever read: all of them for training (each epoch a new permutation of
        # the whole manifest), the contiguous shard range for evaluation.
        if spec.train:
            self.cached_positions = np.arange(self.manifest_size, dtype=np.int64)
        else:
            shard = sharding.eval_shard_range(self.manifest_size, spec.shard_index, spec.shard_count)
            self.cached_positions = np.arange(shard.start, shard.stop, dtype=np.int64)
        self.slot_of = np.full(self.manifest_size, -1, dtype=np.int64)
        self.slot_of[self.cached_positions] = np.arange(len(self.cached_positions))
        self.needed_bytes = int((3 * spec.widths[self.cached_positions] * spec.heights[self.cached_positions]).sum())
        self.reservation = self._place()  # given back when the loader is closed or dropped
        self.placement = self.reservation.where
        self.labels = torch.as_tensor(entry_labels(spec.entries), device=spec.device)
        self.store: ImageStore | None = None
        self.decode_seconds = 0.0
        self.cache_bytes = 0  # what the store holds; kept after close() for the benchmark's report
        self.normalize = Normalizer(spec.transform, spec.output, spec.device)
        self.normalize_into = PlaneNormalizer(spec.transform)  # the CPU path's: into the batch's memory
        self.pool: ThreadPoolExecutor | None = None            # the CPU path's threads, made on first use

    def _place(self) -> memory.Reservation:
        device, cap = self.spec.device, self.options.budget_bytes
        reservation = memory.place(self.needed_bytes, device, KIND, cap, host=self.options.overflow == "host")
        if reservation is None:
            fix = ("raise loader.options.budget_bytes, or set loader.options.overflow=host to keep it in host "
                   "memory" if self.options.overflow == "error" else "use another backend (dali-gpu decodes "
                   "every epoch and keeps nothing)")
            raise PlanktonioError(f"cache: the {self.spec.split} split needs {self.needed_bytes / 2**20:.1f} MiB "
                                  f"decoded, over {memory.describe(device, KIND, cap)}; {fix}")
        return reservation

    # ------------------------------------------------------------ what it holds

    @property
    def device_bytes(self) -> int:
        return self.cache_bytes if self.placement == "device" else 0

    @property
    def bytes_per_image(self) -> float:
        return self.cache_bytes / len(self.cached_positions) if len(self.cached_positions) else 0.0

    def stats(self) -> dict:
        return {"decode_seconds": self.decode_seconds, "cache_bytes": self.cache_bytes,
                "bytes_per_image": self.bytes_per_image, "placement": self.placement,
                "device_bytes": self.device_bytes}

    def decode(self) -> None:
        """Decode every image this loader reads into the store (done by the first iteration)."""
        if self.store is not None:
            return
        start = time.perf_counter()
        s = self.spec
        on_device = self.placement == "device"
        store_device = s.device if on_device else torch.device("cpu")
        store = ImageStore(s.widths[self.cached_positions], s.heights[self.cached_positions], store_device,
                           self.reservation.pinned, chunk_bytes=None if on_device else memory.CHUNK_BYTES)
        decode_into(store, s, self.cached_positions, self.encoded)
        if s.device.type == "cuda":
            torch.cuda.synchronize(s.device)
        self.store, self.cache_bytes = store, store.nbytes
        self.decode_seconds = time.perf_counter() - start
        self.build_seconds += self.decode_seconds
        self.pipelines_built += 1

    # ------------------------------------------------------------ batches

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.skip_batches < len(self):
            self.decode()
            for index in range(self.skip_batches, len(self)):
                yield self.make_batch(self.batch_plan(self.epoch, index))
        self._end_epoch()

    def make_batch(self, batch: BatchPlan) -> tuple[torch.Tensor, torch.Tensor]:
        """One batch, as the plan says: crop, resize, flip, round to levels, normalise."""
        device, size = self.spec.device, self.spec.transform.size
        slots = self.slot_of[batch.positions]
        # The batch's small arrays go to the device as one pinned, asynchronous copy: a plain
        # copy per array would make the host wait for the GPU's queued work each time.
        plan = batch.plan
        small = torch.from_numpy(np.stack([slots, batch.positions, plan.x, plan.y, plan.width, plan.height,
                                           plan.flip]).astype(np.int64))
        if device.type == "cuda":
            small = small.pin_memory()
        small = small.to(device, non_blocking=True)
        device_slots, positions, boxes = small[0], small[1], small[2:].t()
        # Batched where it pays: one pair of matrix products for the whole batch on a GPU. On a
        # CPU, torch's vectorised uint8 resize per image (the torchvision backend's own kernel)
        # is faster than float matrix products over whole images.
        if device.type == "cpu" and self.fast_path is None:
            return self._cpu_batch(batch, slots), self.labels[positions]
        batched = self.fast_path if self.fast_path is not None else device.type == "cuda"
        if self.store.equal and batched:
            images = self._gather(slots, device_slots).float()
            resized = crop_resize_flip_equal(images, boxes, size)
        else:
            boxes = [batch.plan.box(i) for i in range(len(slots))]
            crops = self._crops(slots.tolist(), boxes)
            resized = torch.stack([resize_flip_one(crop.float(), box[4], size) for crop, box in zip(crops, boxes)])
        resized = resized.round_().clamp_(0, 255)
        labels = self.labels[positions]
        return self.normalize(resized), labels

    def _cpu_batch(self, batch: BatchPlan, slots: np.ndarray) -> torch.Tensor:
        """On a CPU: each image's box cut from the store, resized, flipped and normalised straight into the
        batch's memory by a thread pool (the turbo backend's operations: OpenCV, or torch's uint8 kernel
        where the box shrinks; every call releases the GIL)."""
        size, out = self.spec.transform.size, self.spec.output
        if self.pool is None:
            self.pool = ThreadPoolExecutor(self.spec.threads, thread_name_prefix="cache", initializer=one_core_each)
            shape = (size, size, 3) if out.layout == "NHWC" else (3, size, size)  # channels-last: rows H x W x 3
            self.buffers = BatchBuffers((self.spec.batch_size, *shape), np.float32)
        images = self.buffers.take(len(slots))

        def make(rows: np.ndarray) -> None:
            for row in rows.tolist():
                x, y, w, h, flip = batch.plan.box(row)
                planes = self.store.image(int(slots[row])).numpy()[:, y:y + h, x:x + w]
                crop = cv2.merge(list(planes))  # C x h x w -> h x w x C (numpy's strided copy: 3x slower)
                self.normalize_into(crop_resize_flip_hwc(crop, (0, 0, w, h, flip), size), images[row])
        parts = np.array_split(np.arange(len(slots)), min(len(slots), 2 * self.spec.threads))
        list(self.pool.map(make, [part for part in parts if len(part)]))
        batch = torch.from_numpy(images)
        if out.layout == "NHWC":
            batch = batch.permute(0, 3, 1, 2)  # N,H,W,C storage seen as N,C,H,W: channels_last
        return batch.to(out.torch_dtype).contiguous(memory_format=out.memory_format)

    def _gather(self, slots: np.ndarray, device_slots: torch.Tensor) -> torch.Tensor:
        """The batch's whole images (equal sizes), on the device: copied from host memory past the budget."""
        device = self.spec.device
        if self.placement == "device":
            return self.store.gather(slots, device_slots)
        staging = torch.empty((len(slots), *self.store.stacks[0].shape[1:]), dtype=torch.uint8,
                              pin_memory=device.type == "cuda")  # the caching host allocator reuses these
        return self.store.gather(slots, out=staging).to(device, non_blocking=True)

    def _crops(self, slots: list[int], boxes: list) -> list[torch.Tensor]:
        """The images' boxes (variable sizes), on the device: from host memory past the budget, packed into one
        pinned buffer and sent as one asynchronous copy (a slice of a pinned chunk is not contiguous: `.to`
        would copy it to pageable memory first, and a copy from there makes the host wait for the GPU)."""
        crops = [self.store.image(slot)[:, y:y + h, x:x + w] for slot, (x, y, w, h, _) in zip(slots, boxes)]
        if self.placement == "device":
            return crops
        device = self.spec.device
        ends = np.cumsum([c.numel() for c in crops]).tolist()
        staging = torch.empty(ends[-1] if ends else 0, dtype=torch.uint8,
                              pin_memory=device.type == "cuda")  # the caching host allocator reuses these
        for crop, start, end in zip(crops, [0] + ends, ends):
            staging[start:end].view(crop.shape).copy_(crop)  # host memcpy
        flat = staging.to(device, non_blocking=True)  # kept from reuse until the copy is done
        return [flat[start:end].view(crop.shape) for crop, start, end in zip(crops, [0] + ends, ends)]

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True)
            self.pool = None
        self.store = None
        self.reservation.release()


BACKENDS = (
    Backend("cache", "decode once (DALI) into uint8 images kept on the device; crops and resizes as tensor "
            "operations there", devices=("cpu", "cuda"), role="candidate", options=CacheOptions,
            build=lambda spec, options: CacheLoader(spec, options), streams=False,
            goals=(Goal("candidates", 1.0, "any", "nothing is decoded after the first epoch"),)),
)

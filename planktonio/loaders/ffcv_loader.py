"""The ffcv backend: FFCV's own loader (libffcv/ffcv 1.0.2) on the same images, a peer measured beside ours.

FFCV is what a user would pick instead for fast loading in PyTorch, so
`profiling loaders` measures it on the same work as every backend: the same
split's images, the same batch size, threads, epochs and timer, the same
output (normalised float32 N x 3 x H x W, or what the output asks). It reads
a `.beton` file: the split's very JPEG bytes (not re-encoded), written once
and kept in the prepared folder (ffcv/<split>.beton), written again when the
split's index changes (its checksum covers every image's sha256).

FFCV's recipe, not ours: its RandomResizedCropRGBImageDecoder draws its own
crops (the same RandomResizedCrop distribution, numpy's generator), decodes
the whole JPEG with libjpeg-turbo and resizes with OpenCV's INTER_AREA; its
flips are its own too; its epoch order is its own permutation. So its pixels
are not ours image by image, and it never trains here (role peer): only its
speed on the same work is the point. What cannot match: the plans (crops,
flips, order), the resize filter, resume mid-epoch, bad files (FFCV checks
nothing when reading), sharding over ranks (one process only here).

FFCV is optional: it builds from source against OpenCV and libjpeg-turbo
(Debian: libopencv-dev libturbojpeg0-dev pkg-config) and needs numba;
`pip install 'planktonio[ffcv]'` (docs/fast-cpu.md). Where it is missing the
backend says so (`missing`) and benchmarks skip its row with that reason.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from ..errors import PlanktonioError
from ..files import write_atomic
from . import sharding
from .backend import Backend
from .base import Loader, LoaderSpec
from .ops import decode_rgb, is_upright_jpeg

BETON_FORMAT = 1  # of the file below: a change here writes every .beton again
INSTALL = ("FFCV is not installed: apt-get install libopencv-dev libturbojpeg0-dev pkg-config, then "
           "pip install 'planktonio[ffcv]' (docs/fast-cpu.md)")


def ffcv_missing() -> str | None:
    """Why FFCV cannot run here, or None (a look for the package, without importing it)."""
    return None if importlib.util.find_spec("ffcv") is not None else INSTALL


def beton_path(spec: LoaderSpec) -> Path:
    return spec.dataset.path / "ffcv" / f"{spec.split}.beton"


def fingerprint(spec: LoaderSpec) -> dict:
    """What the .beton was written from: the split's index (paths, labels, sizes, every image's sha256)."""
    return {"format": BETON_FORMAT, "index": spec.dataset.index(spec.split).checksum()}


class SplitImages:
    """The split as FFCV's writer reads it: sample i = (its JPEG bytes, or its upright pixels where FFCV's
    decoder would not show it upright: another format, an EXIF orientation; its label)."""

    def __init__(self, spec: LoaderSpec):
        self.spec = spec

    def __len__(self) -> int:
        return len(self.spec.entries)

    def __getitem__(self, position: int):
        s = self.spec
        path, label = s.entries[position]
        full = f"{s.dataset.root}/{path}"
        data = np.fromfile(full, dtype=np.uint8) if s.shards is None else np.array(s.shards.read(position))
        if not is_upright_jpeg(data):
            return decode_rgb(full, None if s.shards is None else data).permute(1, 2, 0).numpy(), label
        return data, label


def write_beton(spec: LoaderSpec) -> Path:
    """The split's .beton, written unless one from the same index is there."""
    path, stamp = beton_path(spec), fingerprint(spec)
    stamp_file = path.with_suffix(".json")
    if path.exists() and stamp_file.exists() and json.loads(stamp_file.read_text()) == stamp:
        return path
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    class SameBytes(RGBImageField):
        """RGBImageField that stores a JPEG's own bytes (FFCV would decode and encode it again, lossily)."""

        def encode(self, destination, data, malloc):
            if data.ndim == 3:  # upright pixels: FFCV's own encoding
                return super().encode(destination, data, malloc)
            import simplejpeg
            height, width, _, _ = simplejpeg.decode_jpeg_header(data.tobytes())
            destination["mode"], destination["height"], destination["width"] = 0, height, width  # 0: jpg
            destination["data_ptr"], storage = malloc(data.nbytes)
            storage[:] = data

    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}")
    writer = DatasetWriter(str(partial), {"image": SameBytes(write_mode="jpg"), "label": IntField()},
                           num_workers=max(1, spec.workers))
    writer.from_indexed_dataset(SplitImages(spec))
    os.replace(partial, path)
    write_atomic(stamp_file, json.dumps(stamp) + "\n")
    return path


def build_pipelines(spec: LoaderSpec) -> dict:
    """FFCV's own decoders and transforms for the spec's transform and output."""
    from ffcv.fields.basics import IntDecoder
    from ffcv.fields.rgb_image import CenterCropRGBImageDecoder, RandomResizedCropRGBImageDecoder
    from ffcv.transforms import NormalizeImage, RandomHorizontalFlip, Squeeze, ToDevice, ToTensor, ToTorchImage

    t, out = spec.transform, spec.output
    size = (t.size, t.size)
    if t.crop == "random_resized":
        image = [RandomResizedCropRGBImageDecoder(size, scale=t.scale, ratio=t.ratio)]
    else:
        image = [CenterCropRGBImageDecoder(size, ratio=t.size / t.resize)]
    if t.hflip:
        image.append(RandomHorizontalFlip(flip_prob=t.hflip))
    dtype = np.float16 if out.dtype == "float16" else np.float32
    normalize = NormalizeImage(255 * np.array(t.mean), 255 * np.array(t.std), dtype)
    channels_last = out.layout == "NHWC"
    if spec.device.type == "cuda":  # FFCV's GPU recipe: uint8 to the device, normalised there
        image += [ToTensor(), ToDevice(spec.device, non_blocking=True), ToTorchImage(channels_last), normalize]
    else:
        image += [normalize, ToTensor(), ToTorchImage(channels_last)]
    label = [IntDecoder(), ToTensor(), Squeeze()]
    if spec.device.type == "cuda":
        label.append(ToDevice(spec.device, non_blocking=True))
    return {"image": image, "label": label}


class FfcvLoader(Loader):
    """FFCV's Loader over the split's .beton: its crops, flips and order; our batch size, threads and output."""

    backend = "ffcv"
    prefetch_depth = 3  # FFCV's batches_ahead

    def __init__(self, spec: LoaderSpec):
        if spec.train and spec.shard_count != 1:
            raise PlanktonioError("backend ffcv: its training order is measured in one process only "
                                  "(shard_count 1)")
        super().__init__(spec)
        try:
            from ffcv.fields import RGBImageField
            from ffcv.loader import Loader as FFCVLoader, OrderOption
        except ImportError as error:  # found, but broken (a missing libturbojpeg, numba)
            raise PlanktonioError(f"backend ffcv: cannot import FFCV ({error}); {INSTALL}") from None
        self.ffcv, self._epoch = None, None
        if len(self):  # (an empty evaluation shard reads nothing)
            # Its own epoch order for training; an evaluation shard's contiguous range, in order.
            shard = None if spec.train else list(sharding.eval_shard_range(self.manifest_size, spec.shard_index,
                                                                             spec.shard_count))
            self.ffcv = FFCVLoader(str(write_beton(spec)), batch_size=spec.batch_size, num_workers=spec.threads,
                                   order=OrderOption.RANDOM if spec.train else OrderOption.SEQUENTIAL,
                                   seed=spec.seed, drop_last=spec.train, os_cache=True, indices=shard,
                                   pipelines=build_pipelines(spec), custom_fields={"image": RGBImageField},
                                   batches_ahead=self.prefetch_depth)
            self.pipelines_built = 1

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        # len(self) is FFCV's too: N // batch for training (drop_last), the shard's batches otherwise
        self._stop_epoch()
        self._epoch = iter(self.ffcv) if self.ffcv is not None else iter(())
        for index, (images, labels) in enumerate(self._epoch):
            if index >= self.skip_batches:
                yield images, labels.view(-1).long()
        self._end_epoch()

    def _stop_epoch(self) -> None:
        """End FFCV's thread of an epoch left part-way (it would go on decoding ahead until collected)."""
        if getattr(self._epoch, "close", None) is not None:
            self._epoch.close()
            # Joined, not left to run: a daemon thread still in numba's code when the interpreter exits
            # aborts the process ("terminate called without an active exception").
            self._epoch.join(timeout=10)
        self._epoch = None

    def close(self) -> None:
        self._stop_epoch()
        self.ffcv = None


BACKENDS = (
    Backend("ffcv", "FFCV 1.0.2's own loader (another project): a .beton of the same JPEGs, its crops, "
            "libjpeg-turbo and OpenCV in numba-compiled threads", devices=("cpu", "cuda"), role="peer",
            build=lambda spec, options: FfcvLoader(spec), trains=False, streams=False, missing=ffcv_missing),
)

"""Where each CPU backend's time goes per image: read, decode, crop + resize, normalise, collate / hand-off.

    python -m profiling.stages --data PREPARED [--images 256] [--json OUT]

Each stage of each backend's own per-image work, timed alone on one thread
over the same images of the training split with the same plans (epoch 0),
in microseconds per image (CPU time of this thread: what the stage costs a
core, little changed by other work on a shared machine). A batch stage
(torchvision's normalise, the workers' collate) is timed on whole batches
and divided by their images. The sum of a backend's stages bounds its speed
on N cores at N x 1e6 / sum images/s; `profiling loaders` measures what it
reaches (a worker-pool backend pays pickling and process hand-off on top,
a thread pool the GIL between its calls).

Stage rows are named by the operations they time; DALI's graph and FFCV's
numba code are not split into stages. `whole`: every backend's own loader on
one thread (rows named by backend), CPU microseconds per image of this
process: against the sum of its stages, what its Python, locks and hand-offs
add.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from planktonio import make_loader
from planktonio.loaders import ops, reference_backend, runnable_backends
from planktonio.plans import plan_at
from planktonio.transforms import TRAIN_AUGMENT

BATCH = 64
# The operation pipelines timed stage by stage, named by what they run (the registry's backends that run
# them: torchvision, turbo; the pil backend runs PIL's; the cache runs the last from its decoded store).
TV = "torchvision.io + torch uint8 resize"
TURBO = "simplejpeg + OpenCV"
PIL_ROW = "PIL, ToTensor, Normalize"
CACHE_ROW = "decoded store + OpenCV"


def per_image_us(function, items) -> float:
    """CPU microseconds per item of `function` over `items` (one warm-up call first)."""
    function(items[0])
    start = time.thread_time()
    for item in items:
        function(item)
    return 1e6 * (time.thread_time() - start) / len(items)


@dataclass
class Sample:
    """The images every pipeline is timed on: the first `count` of epoch 0's training order, with their plans."""
    paths: list[str]
    encoded: list[bytes]
    boxes: list[tuple]
    output: object  # the loaders' Output (dtype, memory format)


def sample(prepared: str, count: int) -> Sample:
    # any loader gives the split, its order and its plans (the same for every backend)
    with make_loader(reference_backend(torch.device("cpu")), prepared, "train", batch_size=BATCH, device="cpu",
                     workers=0, transform=TRAIN_AUGMENT) as loader:
        positions = loader._epoch_order(0)[:count]
        spec = loader.spec
        plan = plan_at(spec.transform, spec.widths, spec.heights, positions, seed=spec.seed, epoch=0)
    paths = [f"{spec.dataset.root}/{spec.entries[p][0]}" for p in positions.tolist()]
    return Sample(paths, [Path(path).read_bytes() for path in paths],
                  [plan.box(i) for i in range(len(positions))], spec.output)


def stages(prepared: str, count: int) -> dict:
    """{pipeline or backend: {stage: us per image}} on `count` training images, one thread."""
    import cv2
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    images = sample(prepared, count)
    out = {TV: torchvision_stages(images), PIL_ROW: pil_stages(images), TURBO: turbo_stages(images)}
    out[CACHE_ROW] = decoded_store_stages(images, out[TURBO]["normalise"])
    for pipeline in (PIL_ROW, TURBO):
        out[pipeline]["read"] = out[TV]["read"]
    # Every loader of the registry that reads images (not the upper bound), whole, on one thread.
    for name in runnable_backends(torch.device("cpu"), roles=("reference", "baseline", "candidate", "peer")):
        out[name] = {"whole": whole_us(name, prepared, max(count, 4 * BATCH))}
    return out


def _batch_size(items: list) -> int:
    return min(BATCH, len(items))  # fewer images than a batch: one batch of them all


def _batch_starts(items: list) -> range:
    return range(0, len(items) - _batch_size(items) + 1, _batch_size(items))


def torchvision_stages(images: Sample) -> dict[str, float]:
    """torchvision.io, the uint8 kernel, one Normalizer per batch (and the cache's decode-once store)."""
    from torchvision.io import ImageReadMode, decode_image

    def decode(x):
        return decode_image(x, mode=ImageReadMode.RGB, apply_exif_orientation=True)
    size, boxes = TRAIN_AUGMENT.size, images.boxes
    tensors = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for data in images.encoded]
    decoded = [decode(x) for x in tensors]
    resized = [ops.apply_plan(image, box, size) for image, box in zip(decoded, boxes)]
    normalize = ops.Normalizer(TRAIN_AUGMENT, images.output, torch.device("cpu"))
    n = _batch_size(resized)
    batches = [torch.stack(resized[i:i + n]) for i in _batch_starts(resized)]
    return {"read": per_image_us(lambda p: Path(p).read_bytes(), images.paths),
            "decode": per_image_us(decode, tensors),
            "crop+resize": per_image_us(lambda i: ops.apply_plan(decoded[i], boxes[i], size), range(len(boxes))),
            "normalise": per_image_us(normalize, batches) / n,
            "collate": per_image_us(lambda i: torch.stack(resized[i:i + n]), _batch_starts(resized)) / n}


def pil_stages(images: Sample) -> dict[str, float]:
    """The study's pipeline: PIL decode, crop and resize, ToTensor and Normalize per image."""
    from PIL import Image
    from torchvision.transforms import functional as TF

    size, t = TRAIN_AUGMENT.size, TRAIN_AUGMENT

    def crop_resize(i):
        x, y, w, h, _ = images.boxes[i]
        return pils[i].crop((x, y, x + w, y + h)).resize((size, size), Image.BILINEAR)
    pils = [Image.open(path).convert("RGB") for path in images.paths]
    cropped = [crop_resize(i) for i in range(len(pils))]
    tensors = [TF.to_tensor(image) for image in cropped]
    n = _batch_size(tensors)
    return {"decode": per_image_us(lambda p: Image.open(p).convert("RGB"), images.paths),
            "crop+resize": per_image_us(crop_resize, range(len(pils))),
            "normalise": per_image_us(lambda image: TF.normalize(TF.to_tensor(image), list(t.mean), list(t.std)),
                                      cropped),
            "collate": per_image_us(lambda i: torch.stack(tensors[i:i + n]), _batch_starts(tensors)) / n}


def turbo_stages(images: Sample) -> dict[str, float]:
    """simplejpeg, OpenCV (torch's kernel where a box shrinks), one fused normalise into the batch's memory."""
    import simplejpeg
    size, boxes = TRAIN_AUGMENT.size, images.boxes
    hwc = [simplejpeg.decode_jpeg(data, "RGB") for data in images.encoded]
    resized = [ops.crop_resize_flip_hwc(image, box, size) for image, box in zip(hwc, boxes)]
    into, row = ops.PlaneNormalizer(TRAIN_AUGMENT), np.empty((3, size, size), np.float32)
    return {"decode": per_image_us(lambda data: simplejpeg.decode_jpeg(data, "RGB"), images.encoded),
            "crop+resize": per_image_us(lambda i: ops.crop_resize_flip_hwc(hwc[i], boxes[i], size),
                                        range(len(boxes))),
            "normalise": per_image_us(lambda image: into(image, row), resized),
            "collate": 0.0}  # written in place


def decoded_store_stages(images: Sample, normalise_us: float) -> dict[str, float]:
    """The cache on a CPU: turbo's crop, resize and normalise from its C x H x W store (a crop's
    transposition first); nothing read or decoded."""
    import cv2
    import simplejpeg
    size, boxes = TRAIN_AUGMENT.size, images.boxes
    chw = [torch.from_numpy(simplejpeg.decode_jpeg(data, "RGB")).permute(2, 0, 1).contiguous()
           for data in images.encoded]

    def crop_resize(i):
        x, y, w, h, flip = boxes[i]
        crop = cv2.merge(list(chw[i].numpy()[:, y:y + h, x:x + w]))
        return ops.crop_resize_flip_hwc(crop, (0, 0, w, h, flip), size)
    return {"read": 0.0, "decode": 0.0, "crop+resize": per_image_us(crop_resize, range(len(boxes))),
            "normalise": normalise_us, "collate": 0.0}


def whole_us(backend: str, prepared: str, count: int) -> float:
    """A backend's whole per-image cost on one thread (worker pools in this process): the CPU time of this process
    per image of its batches, after two (pipelines built, code compiled, the cache's one decode)."""
    with make_loader(backend, prepared, "train", batch_size=BATCH, device="cpu", workers=0, threads=1,
                     transform=TRAIN_AUGMENT) as loader:
        batches = (batch for _ in itertools.count() for batch in loader)  # epoch after epoch, however small
        next(batches), next(batches)  # pipelines built, code compiled
        start, images = time.process_time(), 0
        for images_batch, _ in batches:
            images += len(images_batch)
            if images >= count:
                break
        return 1e6 * (time.process_time() - start) / max(images, 1)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m profiling.stages", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="a folder written by `python -m planktonio prepare`")
    parser.add_argument("--images", type=int, default=256, help="training images timed per stage")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    result = stages(args.data, args.images)
    names = ("read", "decode", "crop+resize", "normalise", "collate")
    print(f"{'pipeline':<36}" + "".join(f"{n:>12}" for n in names) + f"{'sum':>7}{'2 cores':>9}{'whole':>7}")
    for backend, row in result.items():
        total = sum(row[n] for n in names if n in row)
        cells = "".join(f"{row[n]:>12.0f}" if n in row else f"{'-':>12}" for n in names)
        bound = f"{2e6 / total:>9.0f}" if total else f"{'-':>9}"
        whole = f"{row['whole']:>7.0f}" if "whole" in row else f"{'-':>7}"
        print(f"{backend:<36}{cells}{total:>7.0f}{bound}{whole}")
    if args.json:
        args.json.write_text(json.dumps({"us_per_image": result, "images": args.images}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Make a fixed-size copy of an image folder tree: the study's 255 x 255 JPEGs.

The NDSB images are 21 to 428 px a side; the plankton study used 255 x 255.
Benchmarks need the study's decode cost, so this pads each image to a square
with its own background colour (the median of its border pixels, white for
ISIIS images: the organism keeps its shape) and resizes that to size x size,
re-encoding as JPEG. Class folders and file stems are kept.
"""

from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from .dataset import scan_classes


def pad_to_square(image: Image.Image) -> Image.Image:
    pixels = np.asarray(image)
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    fill = tuple(int(v) for v in np.median(border, axis=0))
    side = max(image.size)
    square = Image.new("RGB", (side, side), fill)
    square.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
    return square


def _square_one(job: tuple[str, str, int, int]) -> str | None:
    source, target, size, quality = job
    try:
        with Image.open(source) as image:
            squared = pad_to_square(image.convert("RGB")).resize((size, size), Image.BICUBIC)
    except (OSError, ValueError) as error:
        return f"{source}: {error}"
    Path(target).parent.mkdir(parents=True, exist_ok=True)
    squared.save(target, quality=quality)
    return None


def square_tree(source: Path, out: Path, size: int = 255, quality: int = 90,
                workers: int | None = None) -> tuple[int, list[str]]:
    """Write out/<class>/<stem>.jpg for every image; returns (written, failures)."""
    jobs = [(str(Path(source) / rel), str(Path(out) / Path(rel).with_suffix(".jpg")), size, quality)
            for files in scan_classes(source).values() for rel in files]
    with ProcessPoolExecutor(max_workers=workers or os.cpu_count()) as pool:
        failures = [f for f in pool.map(_square_one, jobs, chunksize=64) if f]
    return len(jobs) - len(failures), failures

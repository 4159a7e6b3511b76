"""Make a fixed-size copy of an image folder tree: the study's 255 x 255 JPEGs.

The NDSB images are 21 to 428 px a side; the plankton study used 255 x 255.
Benchmarks need the study's decode cost, so this pads each image to a square
with its own background colour (the median of its border pixels, white for
ISIIS images: the organism keeps its shape) and resizes that to size x size,
re-encoding as 8-bit JPEG. Class folders (and their sub-folders) and file
stems are kept; images of 16 bits or floats are scaled to 8 bits (16 bits:
/257; floats: 0..1 to 0..255), EXIF orientation is applied, and two sources
that would land on one name (x.png and x.tif) keep apart (x.jpg, x_tif.jpg).
A file that cannot be read is reported and skipped; the others are written.
"""

from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from .cores import available_cpus
from .errors import PlanktonioError
from .preparation import scan_classes
from .processes import end_with_parent

# Full scale of each wide PIL mode: the value that becomes 255.
FULL_SCALE = {"I;16": 65535, "I;16L": 65535, "I;16B": 65535, "I;16N": 65535, "I": 65535, "F": 1.0}


def to_rgb8(image: Image.Image) -> Image.Image:
    """8-bit RGB, scaling wide grey modes by their full range instead of clipping them to white."""
    if image.mode in FULL_SCALE:
        values = np.asarray(image, dtype=np.float64) * (255.0 / FULL_SCALE[image.mode])
        image = Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), mode="L")
    return image.convert("RGB")


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
            upright = to_rgb8(ImageOps.exif_transpose(image))
            squared = pad_to_square(upright).resize((size, size), Image.BICUBIC)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        return f"{source}: {error}"
    Path(target).parent.mkdir(parents=True, exist_ok=True)
    squared.save(target, quality=quality)
    return None


def target_names(relpaths: list[str]) -> dict[str, str]:
    """Each source's output path: <stem>.jpg, or <stem>_<ext>.jpg when another source already has that name."""
    targets, taken = {}, set()
    for rel in sorted(relpaths):
        target = Path(rel).with_suffix(".jpg").as_posix()
        if target in taken:
            path = Path(rel)
            target = path.with_name(f"{path.stem}_{path.suffix.lstrip('.').lower()}.jpg").as_posix()
        taken.add(target)
        targets[rel] = target
    return targets


def square_tree(source: Path, out: Path, size: int = 255, quality: int = 90,
                workers: int | None = None) -> tuple[int, list[str]]:
    """Write out/<class>/<stem>.jpg for every image; returns (written, failures)."""
    if Path(out).exists() and not Path(out).is_dir():
        raise PlanktonioError(f"--out {out}: is a file, not a folder; choose another --out")
    relpaths = [rel for files in scan_classes(source).classes.values() for rel in files]
    jobs = [(str(Path(source) / rel), str(Path(out) / target), size, quality)
            for rel, target in target_names(relpaths).items()]
    with ProcessPoolExecutor(max_workers=workers or available_cpus(), initializer=end_with_parent,
                             initargs=(os.getpid(),)) as pool:
        failures = [f for f in pool.map(_square_one, jobs, chunksize=64) if f]
    return len(jobs) - len(failures), failures

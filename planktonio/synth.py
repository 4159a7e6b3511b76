"""A deterministic, zooplankton-like image set: the embedded default.

Real plankton photographs (ISIIS camera) are dark, translucent organisms on a
bright, noisy background. Each synthetic class draws one body plan that way,
at a random position, angle and size, so a small CNN can tell the classes
apart from shape alone, while every image still needs real decoding and
resizing work: the same JPEG sizes and costs as the study's 255 x 255 data.

The same (seed, class, index) always gives the same image, whatever the
number of classes or images asked for.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from .errors import PlanktonioError

Point = tuple[float, float]


def _place(points: list[Point], centre: Point, angle: float, scale: float) -> list[Point]:
    """Rotate by `angle`, scale, and move body-plan coordinates (about -1..1) to the canvas."""
    cos, sin = math.cos(angle), math.sin(angle)
    cx, cy = centre
    return [(cx + scale * (x * cos - y * sin), cy + scale * (x * sin + y * cos)) for x, y in points]


def _ellipse(cx: float, cy: float, rx: float, ry: float, n: int = 24) -> list[Point]:
    return [(cx + rx * math.cos(t), cy + ry * math.sin(t)) for t in np.linspace(0, 2 * math.pi, n, endpoint=False)]


def _copepod(draw, rng, place, ink, width):
    draw.polygon(place(_ellipse(0.0, 0.0, 0.55, 0.22)), fill=ink)          # prosome
    draw.polygon(place(_ellipse(0.7, 0.0, 0.25, 0.07)), fill=ink)          # urosome
    for side in (-1, 1):                                                   # long antennae
        sweep = rng.uniform(0.6, 0.9)
        draw.line(place([(-0.5, 0.1 * side), (-0.7, 0.5 * side), (-0.6 + sweep, 0.95 * side)]),
                  fill=ink, width=width)


def _chaetognath(draw, rng, place, ink, width):
    bend = rng.uniform(-0.35, 0.35)
    spine = [(x, bend * (1 - x * x)) for x in np.linspace(-1, 1, 20)]      # long thin arrow worm
    draw.line(place(spine), fill=ink, width=3 * width, joint="curve")
    draw.polygon(place([(0.55, 0.0), (0.8, 0.18), (0.9, 0.0), (0.8, -0.18)]), fill=ink)  # tail fin


def _diatom_chain(draw, rng, place, ink, width):
    cells = int(rng.integers(4, 9))
    for i in range(cells):
        x = -0.9 + 1.8 * i / max(cells - 1, 1)
        draw.polygon(place([(x - 0.09, -0.16), (x + 0.09, -0.16), (x + 0.09, 0.16), (x - 0.09, 0.16)]),
                     outline=ink, width=width)
        draw.polygon(place(_ellipse(x, 0.0, 0.04, 0.04, 8)), fill=ink)


def _medusa(draw, rng, place, ink, width):
    bell = [(0.7 * math.cos(t), -0.55 * math.sin(t)) for t in np.linspace(0, math.pi, 20)]
    draw.polygon(place(bell), fill=ink)
    for i in range(int(rng.integers(4, 9))):                               # trailing tentacles
        x = -0.6 + 1.2 * (i + 0.5) / 8
        wave = rng.uniform(0.05, 0.15)
        draw.line(place([(x + wave * math.sin(4 * y), y) for y in np.linspace(0, 0.95, 10)]),
                  fill=ink, width=width)


def _radiolarian(draw, rng, place, ink, width):
    draw.polygon(place(_ellipse(0, 0, 0.35, 0.35)), outline=ink, width=2 * width)
    draw.polygon(place(_ellipse(0, 0, 0.15, 0.15)), fill=ink)
    for t in np.linspace(0, 2 * math.pi, int(rng.integers(12, 20)), endpoint=False):  # radial spines
        draw.line(place([(0.35 * math.cos(t), 0.35 * math.sin(t)), (0.95 * math.cos(t), 0.95 * math.sin(t))]),
                  fill=ink, width=width)


def _appendicularian(draw, rng, place, ink, width):
    draw.polygon(place(_ellipse(-0.65, 0.0, 0.25, 0.18)), fill=ink)         # trunk
    waves = rng.uniform(1.5, 3.0)
    tail = [(x, 0.15 * math.sin(waves * math.pi * (x + 0.4))) for x in np.linspace(-0.4, 1.0, 24)]
    draw.line(place(tail), fill=ink, width=2 * width, joint="curve")


def _ctenophore(draw, rng, place, ink, width):
    draw.polygon(place(_ellipse(0, 0, 0.45, 0.7)), outline=ink, width=width)  # translucent body
    for x in (-0.3, -0.1, 0.1, 0.3):                                       # comb rows
        draw.line(place([(x, -0.6), (x * 1.2, 0.0), (x, 0.6)]), fill=ink, width=width)


def _detritus(draw, rng, place, ink, width):
    n = int(rng.integers(7, 13))
    angles = np.sort(rng.uniform(0, 2 * math.pi, n))
    radii = rng.uniform(0.25, 0.8, n)                                      # irregular clump
    draw.polygon(place([(r * math.cos(a), r * math.sin(a)) for a, r in zip(angles, radii)]), fill=ink)


BODY_PLANS = {
    "copepod": _copepod,
    "chaetognath": _chaetognath,
    "diatom_chain": _diatom_chain,
    "medusa": _medusa,
    "radiolarian": _radiolarian,
    "appendicularian": _appendicularian,
    "ctenophore": _ctenophore,
    "detritus": _detritus,
}
CLASS_NAMES = tuple(BODY_PLANS)


def render(class_index: int, index: int, *, size: int = 255, seed: int = 0) -> Image.Image:
    """One RGB image of class `class_index`; a pure function of its arguments."""
    rng = np.random.default_rng([seed, class_index, index])
    ss = 2  # draw at twice the size, then downsample: smooth, camera-like edges
    canvas = size * ss
    background = int(rng.integers(200, 245))
    image = Image.new("L", (canvas, canvas), background)
    draw = ImageDraw.Draw(image)
    ink = int(rng.integers(20, 110))
    centre = (canvas * rng.uniform(0.38, 0.62), canvas * rng.uniform(0.38, 0.62))
    scale = canvas * rng.uniform(0.22, 0.36)
    angle = rng.uniform(0, 2 * math.pi)
    width = max(1, int(round(canvas * rng.uniform(0.006, 0.012))))
    BODY_PLANS[CLASS_NAMES[class_index]](draw, rng, lambda pts: _place(pts, centre, angle, scale), ink, width)
    image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.8, 2.0))).resize((size, size), Image.BILINEAR)
    pixels = np.asarray(image, dtype=np.float32)
    pixels += rng.normal(0, rng.uniform(3, 9), pixels.shape)  # sensor noise
    grey = np.clip(pixels, 0, 255).astype(np.uint8)
    return Image.fromarray(np.stack([grey] * 3, axis=-1))  # 3-channel, as the ISIIS JPEGs are


def class_names(classes: int | str) -> list[str]:
    """The first `classes` body plans, or those named in a comma-separated list."""
    if isinstance(classes, str) and not classes.isdigit():
        names = [n.strip() for n in classes.split(",") if n.strip()]
        unknown = [n for n in names if n not in BODY_PLANS]
        if unknown or not names:
            raise PlanktonioError(f"unknown synthetic class(es) {', '.join(unknown)}; known: {', '.join(CLASS_NAMES)}")
        return names
    count = int(classes)
    if not 1 <= count <= len(CLASS_NAMES):
        raise PlanktonioError(f"--classes must be between 1 and {len(CLASS_NAMES)}, not {count}")
    return list(CLASS_NAMES[:count])


def synthesize(out: Path, *, classes: int | str = 6, per_class: int = 120, size: int = 255,
               seed: int = 0, quality: int = 90) -> list[Path]:
    """Write per_class JPEGs of each class as out/<class>/<class>_NNNN.jpg; return their paths.

    classes: how many of CLASS_NAMES (from the first), or a comma-separated list of names.
    """
    names = class_names(classes)
    if per_class < 1 or size < 8:
        raise PlanktonioError("--per-class must be >= 1 and --size >= 8")
    written = []
    for name in names:
        class_index = CLASS_NAMES.index(name)
        folder = Path(out) / name
        folder.mkdir(parents=True, exist_ok=True)
        for index in range(per_class):
            path = folder / f"{name}_{index:04d}.jpg"
            render(class_index, index, size=size, seed=seed).save(path, quality=quality)
            written.append(path)
    return written

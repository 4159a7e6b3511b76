"""Shared fixtures: small data sets the tests make themselves, one finished run, markers and tiers.

Data sets and the finished run are made once per test session (per xdist
worker) and only read by the tests; a test that changes a run works on its own
copy (`run_copy`). Helpers shared by several modules are in tests/helpers.py.

The "coloured" set gives every image one flat, unique colour, so the image
a loader returns can be identified after decoding, resizing and cropping
(all of which keep a flat colour flat): that is how the tests check which
images an epoch saw and that labels travel with their images.
"""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from planktonio import PreparedDataset, prepare
from planktonio.preparation import SplitPlan

from .helpers import REPO, small_config

NDSB = REPO.parent / "shared" / "data" / "ndsb"

# Colour channel levels far enough apart to survive JPEG and resizing.
LEVELS = (20, 70, 120, 170, 220)


def colour_of(index: int) -> tuple[int, int, int]:
    return (LEVELS[index % 5], LEVELS[(index // 5) % 5], LEVELS[(index // 25) % 5])


def index_of(rgb) -> int:
    """Inverse of colour_of for a (possibly slightly off) decoded colour."""
    levels = np.array(LEVELS)
    r, g, b = (int(np.abs(levels - c).argmin()) for c in rgb)
    return r + 5 * g + 25 * b


def write_coloured_set(root: Path, classes: int, per_class: int, size: int = 48) -> dict[str, int]:
    """classes x per_class flat-colour JPEGs; returns {relative path: colour index}."""
    index_by_path = {}
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            index = c * per_class + i
            rel = f"class{c}/img{i:03d}.jpg"
            Image.new("RGB", (size, size), colour_of(index)).save(root / rel, quality=95)
            index_by_path[rel] = index
    return index_by_path


def batch_indices(images: torch.Tensor, transform) -> list[int]:
    """Identify each image of a normalised batch by its mean colour."""
    mean = torch.tensor(transform.mean).view(1, 3)
    std = torch.tensor(transform.std).view(1, 3)
    rgb = (images.float().mean(dim=(2, 3)).cpu() * std + mean) * 255
    return [index_of(row.tolist()) for row in rgb]


def jpeg_bytes(size: int = 64, seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG")
    return buffer.getvalue()


@pytest.fixture(scope="session")
def coloured(tmp_path_factory):
    """3 classes x 20 flat-colour images, prepared 10/5/5 per class."""
    root = tmp_path_factory.mktemp("coloured")
    source = root / "source"
    index_by_path = write_coloured_set(source, classes=3, per_class=20)
    prepare(source, root / "prepared", plan=SplitPlan(per_class=(10, 5, 5)), seed=1, workers=1)
    return root / "prepared", index_by_path


@pytest.fixture(scope="session")
def synthetic(tmp_path_factory):
    """The embedded default at a small size: 4 classes x 24 images, 255 x 255."""
    from planktonio.synth import synthesize
    root = tmp_path_factory.mktemp("synthetic")
    synthesize(root / "source", classes=4, per_class=24)
    prepare(root / "source", root / "prepared", plan=SplitPlan(per_class=(16, 4, 4)), seed=0, workers=1)
    return root / "prepared"


@pytest.fixture(scope="session")
def plankton(tmp_path_factory):
    """4 synthetic classes x 60 images (40/10/10) at 128 px: the data the training tests learn from."""
    from planktonio.synth import synthesize
    root = tmp_path_factory.mktemp("plankton")
    synthesize(root / "images", classes="copepod,chaetognath,diatom_chain,radiolarian", per_class=60, size=128)
    prepare(root / "images", root / "prepared", plan=SplitPlan(per_class=(40, 10, 10)), workers=1)
    return root / "prepared"


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory, plankton):
    """One finished run (tests/helpers.py SMALL, 2 epochs on `plankton`): config.yaml, run.json,
    metrics.jsonl, last.pt, best.pt, summary.json. Read it; change a copy (run_copy)."""
    from train.loop import fit
    run = tmp_path_factory.mktemp("finished") / "run"
    assert fit(small_config(training={"epochs": 2}), plankton, run) == 0
    return run


@pytest.fixture(scope="session")
def test_split_list(plankton, tmp_path_factory):
    """`plankton`'s test images as a file listing their paths: what `train predict` reads, without labels."""
    dataset = PreparedDataset.load(plankton)
    listing = tmp_path_factory.mktemp("list") / "test-images.txt"
    listing.write_text("".join(f"{dataset.root / path}\n" for path, _ in dataset.entries("test")))
    return listing


@pytest.fixture
def run_copy(finished_run, tmp_path):
    """A copy of the finished run for a test that changes it."""
    return Path(shutil.copytree(finished_run, tmp_path / "run"))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; none here")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def ndsb():
    if not NDSB.is_dir():
        pytest.skip(f"real plankton images not found at {NDSB}")
    return NDSB


os.environ.setdefault("OMP_NUM_THREADS", "2")

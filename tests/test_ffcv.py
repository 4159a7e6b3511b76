"""The FFCV peer row: its .beton holds the split's own JPEG bytes, written once and again when the split changes.

FFCV is optional (the `ffcv` extra): these tests skip where it is not installed; where it is, the
registry's contract tests (test_loaders.py) also run it through the batch format checks.
"""

from __future__ import annotations

import shutil

import pytest

from planktonio.loaders import loader_spec
from planktonio.transforms import TRAIN_AUGMENT

pytest.importorskip("ffcv")


def test_the_beton_is_written_once_and_again_when_the_split_changes(synthetic, tmp_path, monkeypatch):
    from ffcv.reader import Reader

    from planktonio.loaders import ffcv_loader
    prepared = shutil.copytree(synthetic, tmp_path / "prepared")
    spec = loader_spec(prepared, "train", batch_size=8, transform=TRAIN_AUGMENT, device="cpu", workers=1)
    path = ffcv_loader.write_beton(spec)
    assert path == prepared / "ffcv" / "train.beton"
    # The split's very bytes, sample by sample (FFCV would re-encode them: another image, another cost).
    reader = Reader(str(path), custom_handlers={"image": __import__("ffcv").fields.RGBImageField})
    assert reader.num_samples == len(spec.entries)
    first = (prepared / "train.txt").read_text().split()[0]
    size = (spec.dataset.root / first).stat().st_size
    assert reader.alloc_table["size"].tolist().count(size) >= 1
    written = path.stat().st_mtime_ns
    assert ffcv_loader.write_beton(spec) == path and path.stat().st_mtime_ns == written  # kept
    monkeypatch.setattr(ffcv_loader, "BETON_FORMAT", ffcv_loader.BETON_FORMAT + 1)  # as if the index changed
    ffcv_loader.write_beton(spec)
    assert path.stat().st_mtime_ns != written

"""A prepared folder read back (planktonio/dataset.py PreparedDataset): manifest lines that leave the data
root or carry a bad label are one-line errors naming the line, any text either gives valid entries or such
an error, an empty split and moved files are refused before any work."""

from __future__ import annotations

import json
import os
import shutil

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from planktonio import PlanktonioError, PreparedDataset, make_loader, prepare
from planktonio.dataset import SplitPlan

from .conftest import write_coloured_set


def test_an_empty_split_is_refused_before_any_work(tmp_path):
    """Chosen: a split with no images is an error when a loader for it is made (before training:
    validation drives early stopping and best.pt), not a loss of 0 or a crash."""
    source = tmp_path / "source"
    write_coloured_set(source, classes=2, per_class=5, size=16)
    prepare(source, tmp_path / "prepared", plan=SplitPlan(fractions=(1.0, 0.0, 0.0)), workers=1)
    for backend in ("dali-cpu", "torchvision"):
        with pytest.raises(PlanktonioError, match="valid.txt: the valid split has no images"):
            make_loader(backend, tmp_path / "prepared", "valid", batch_size=2, device="cpu", workers=1)


@pytest.mark.parametrize("line, message", [
    ("../../../etc/passwd 0", "leaves the data root"),
    ("/etc/passwd 0", "leaves the data root"),
    ("class0/img000.jpg \u0662", "label of digits 0-9"),   # an Arabic-Indic two
    ("class0/img000.jpg \u00b2", "label of digits 0-9"),   # a superscript two
    ("class0/img000.jpg 7", "label 7 is not a class"),
    ("class0/img000.jpg", "label of digits 0-9"),
])
def test_a_bad_manifest_line_is_a_one_line_error_naming_the_line(coloured, tmp_path, line, message):
    prepared, _ = coloured
    shutil.copytree(prepared, tmp_path / "p")
    with open(tmp_path / "p" / "valid.txt", "a") as f:
        f.write(line + "\n")
    with pytest.raises(PlanktonioError, match=f"valid.txt:16: .*{message}"):
        PreparedDataset.load(tmp_path / "p").entries("valid")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(alphabet=st.characters(codec="utf-8"), max_size=60))
def test_the_manifest_reader_gives_entries_or_a_one_line_error(tmp_path_factory, text):
    """Property: any text as a manifest gives valid entries (relative paths, labels in range)
    or a PlanktonioError; never another exception."""
    folder = tmp_path_factory.mktemp("manifest")
    (folder / "classes.json").write_text(json.dumps({"root": str(folder), "classes": ["a", "b", "c"]}))
    (folder / "train.txt").write_text(text, encoding="utf-8")
    try:
        entries = PreparedDataset.load(folder).entries("train")
    except PlanktonioError as error:
        assert "\n" not in str(error).strip() or "in '" in str(error)  # the line is quoted with repr
        return
    for path, label in entries:
        assert 0 <= label < 3 and not os.path.isabs(path) and ".." not in path.split("/")


def test_prepared_dataset_reports_moved_files(coloured, tmp_path):
    prepared, _ = coloured
    meta = json.loads((prepared / "classes.json").read_text())
    moved = tmp_path / "moved"
    moved.mkdir()
    for name in ("train.txt", "valid.txt", "test.txt", "image_info.json"):
        (moved / name).write_text((prepared / name).read_text())
    (moved / "classes.json").write_text(json.dumps({**meta, "root": str(tmp_path / "gone")}))
    with pytest.raises(PlanktonioError, match="listed in .*valid.txt but missing"):
        make_loader("torchvision", moved, "valid", batch_size=2, device="cpu", workers=0)
    with pytest.raises(PlanktonioError, match="classes.json: not found"):
        PreparedDataset.load(tmp_path)


@pytest.mark.parametrize("backend", ["dali-cpu", "torchvision"])
def test_an_edited_image_size_is_refused_by_every_backend(coloured, tmp_path, backend):
    """Finding 9: with one width in image_info.json changed by hand, dali-cpu (which crops by the recorded
    size) cut the wrong box and said nothing, while torchvision noticed. The recorded sizes carry a checksum
    that every backend checks."""
    prepared, _ = coloured
    shutil.copytree(prepared, tmp_path / "p")
    info = json.loads((tmp_path / "p" / "image_info.json").read_text())
    info["valid"]["width"][0] += 10
    (tmp_path / "p" / "image_info.json").write_text(json.dumps(info))
    with pytest.raises(PlanktonioError, match="image_info.json: its content does not match its checksum"):
        make_loader(backend, tmp_path / "p", "valid", batch_size=2, device="cpu", workers=0)


def test_a_byte_order_mark_in_a_manifest_is_named(coloured, tmp_path):
    """A manifest saved by an editor as 'UTF-8 with BOM' was refused with a message that did not show why."""
    prepared, _ = coloured
    shutil.copytree(prepared, tmp_path / "p")
    manifest = tmp_path / "p" / "valid.txt"
    manifest.write_text("\ufeff" + manifest.read_text(encoding="utf-8"), encoding="utf-8")
    with pytest.raises(PlanktonioError, match="valid.txt: starts with a byte-order mark \\(U\\+FEFF"):
        PreparedDataset.load(tmp_path / "p").entries("valid")

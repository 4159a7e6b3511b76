"""A prepared folder read back (planktonio/dataset.py PreparedDataset): manifest lines that leave the data
root or carry a bad label are one-line errors naming the line, any text either gives valid entries or such
an error, an empty split and moved files are refused before any work."""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from planktonio import PlanktonioError, PreparedDataset, make_loader, prepare
from planktonio.dataset import SplitPlan, read_manifest
from planktonio.index import SplitIndex, index_file

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
    (folder / "train.txt").write_text(text, encoding="utf-8")
    try:
        entries = read_manifest(folder / "train.txt", 3)
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
    for name in ("train.txt", "valid.txt", "test.txt"):
        (moved / name).write_text((prepared / name).read_text())
    shutil.copytree(prepared / "index", moved / "index")
    (moved / "classes.json").write_text(json.dumps({**meta, "root": str(tmp_path / "gone")}))
    with pytest.raises(PlanktonioError, match="listed in .*valid.txt but missing"):
        make_loader("torchvision", moved, "valid", batch_size=2, device="cpu", workers=0)
    with pytest.raises(PlanktonioError, match="classes.json: not found"):
        PreparedDataset.load(tmp_path)


@pytest.mark.parametrize("backend", ["dali-cpu", "torchvision"])
def test_an_edited_image_size_is_refused_by_every_backend(coloured, tmp_path, backend):
    """Finding 9: with one recorded width changed by hand, dali-cpu (which crops by the recorded size) cut the
    wrong box and said nothing, while torchvision noticed. The index carries a checksum every backend checks."""
    prepared, _ = coloured
    shutil.copytree(prepared, tmp_path / "p")
    path = index_file(tmp_path / "p", "valid")
    with np.load(path) as arrays:
        columns = dict(arrays)
    columns["width"][0] += 10
    np.savez(path, **columns)
    with pytest.raises(PlanktonioError, match="valid.npz: its content does not match its checksum"):
        make_loader(backend, tmp_path / "p", "valid", batch_size=2, device="cpu", workers=0)


def test_the_index_and_the_text_manifests_agree(coloured):
    """What a run reads (the binary index) is what people read (the manifests), image by image, with what
    prepare recorded of each file."""
    prepared, _ = coloured
    dataset = PreparedDataset.load(prepared)
    for split in ("train", "valid", "test"):
        index = dataset.index(split)
        assert list(dataset.entries(split)) == read_manifest(dataset.manifest(split), dataset.num_classes)
        assert index.manifest_text() == dataset.manifest(split).read_bytes()
        for position in (0, len(index) - 1):
            path = dataset.root / index.path(position)
            status = path.stat()
            assert (int(index.bytes[position]), int(index.mtime_ns[position])) == (status.st_size,
                                                                                  status.st_mtime_ns)
            assert bytes(index.sha256[position]) == hashlib.sha256(path.read_bytes()).digest()
        assert (index.width == 48).all() and (index.height == 48).all()  # write_coloured_set's size


def test_a_manifest_edited_after_prepare_is_refused(coloured, tmp_path):
    """Lines swapped by hand (every line still valid): the run would read the index, not the edit."""
    prepared, _ = coloured
    shutil.copytree(prepared, tmp_path / "p")
    manifest = tmp_path / "p" / "valid.txt"
    lines = manifest.read_text().splitlines(keepends=True)
    manifest.write_text("".join([lines[1], lines[0], *lines[2:]]))
    with pytest.raises(PlanktonioError, match="valid.txt: differs from what prepare wrote .* rerun prepare"):
        PreparedDataset.load(tmp_path / "p").entries("valid")


@pytest.mark.parametrize("path, problem", [
    ("../up.jpg", "leaves the data root ('..')"),
    ("a/../../up.jpg", "leaves the data root ('..')"),
    ("..", "leaves the data root ('..')"),
    ("/etc/passwd", "leaves the data root (absolute)"),
    ("a\\b.jpg", "leaves the data root (a backslash)"),
    ("a\tb.jpg", "has a control character"),
    (" a.jpg", "starts or ends with a space"),
])
def test_an_index_whose_path_leaves_the_data_root_is_refused(tmp_path, path, problem):
    """The vectorised checks of the index refuse what the line checks refuse, naming the image (an index
    crafted with a valid checksum: nothing read from a prepared folder may reach outside its root)."""
    def index_of(paths, labels):
        n = len(paths)
        return SplitIndex.build(paths, labels, [5] * n, [5] * n, [9] * n, [1] * n, np.zeros((n, 32)), b"")
    with pytest.raises(PlanktonioError) as error:
        index_of(["a/ok.jpg", path, "b/ok.jpg"], [0, 1, 0]).check(tmp_path / "x.npz", num_classes=2)
    assert f"image 1 ({path.encode()!r}): the path {problem}" in str(error.value)
    index_of(["a/ok.jpg", "b c/ok 2.jpg"], [0, 1]).check(tmp_path / "x.npz", num_classes=2)  # inner spaces: fine
    with pytest.raises(PlanktonioError, match="image 1 .*label 2 is not a class"):
        index_of(["a.jpg", "b.jpg"], [0, 2]).check(tmp_path / "x.npz", num_classes=2)


def test_every_changed_file_is_found_by_the_parallel_check(coloured, tmp_path):
    """The stat of every file, made by many threads at once, compared in one step: the first changed file is
    named with how many more changed; a missing one is named as missing."""
    prepared, _ = coloured
    shutil.copytree(prepared.parent / "source", tmp_path / "source")
    shutil.copytree(prepared, tmp_path / "p")
    meta = json.loads((tmp_path / "p" / "classes.json").read_text())
    (tmp_path / "p" / "classes.json").write_text(json.dumps({**meta, "root": str(tmp_path / "source")}))
    dataset = PreparedDataset.load(tmp_path / "p")
    dataset.check_files_unchanged("train", workers=8)
    index = dataset.index("train")
    for position in (3, 7):
        with open(dataset.root / index.path(position), "ab") as f:
            f.write(b"\0")
    with pytest.raises(PlanktonioError, match=f"{index.path(3)}: changed since prepare .*[(]1 more changed[)]"):
        dataset.check_files_unchanged("train", workers=8)
    (dataset.root / index.path(1)).unlink()
    with pytest.raises(PlanktonioError, match=f"{index.path(1)}: listed in .*train.txt but missing"):
        dataset.check_files_unchanged("train", workers=8)


def test_a_byte_order_mark_in_a_manifest_is_named(coloured, tmp_path):
    """A manifest saved by an editor as 'UTF-8 with BOM' was refused with a message that did not show why."""
    prepared, _ = coloured
    shutil.copytree(prepared, tmp_path / "p")
    manifest = tmp_path / "p" / "valid.txt"
    manifest.write_text("\ufeff" + manifest.read_text(encoding="utf-8"), encoding="utf-8")
    with pytest.raises(PlanktonioError, match="valid.txt: starts with a byte-order mark \\(U\\+FEFF"):
        PreparedDataset.load(tmp_path / "p").entries("valid")

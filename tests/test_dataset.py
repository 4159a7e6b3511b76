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
from planktonio.dataset import read_manifest
from planktonio.index import SplitIndex, index_file
from planktonio.preparation import SplitPlan

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
    ("a\tb.jpg", "has a line break or control character"),
    (" a.jpg", "starts or ends with whitespace"),
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


# Paths as a file system gives them: any characters, a few chosen to break rules, bytes that are not UTF-8.
PATH_PARTS = st.one_of(
    st.text(alphabet=st.characters(codec="utf-8", exclude_characters="\n"), max_size=6),
    st.sampled_from(["..", ".", "", " ", "\u3000", "\x85", "\u2028", "\\", "\t", "\x7f", "\udcff", "\udcc3",
                     "a\udc80b", "\xa0"]))
RELATIVE_PATHS = st.lists(PATH_PARTS, min_size=1, max_size=4).map(
    lambda parts: os.fsdecode(os.fsencode("/".join(parts)))).filter(bool)  # the bytes' one spelling


@settings(max_examples=400, deadline=None)
@given(paths=st.lists(RELATIVE_PATHS, min_size=1, max_size=5))
def test_the_per_path_and_vectorised_path_rules_agree(paths):
    """Property: path_problem (prepare, the manifest reader) and first_path_problem (the index, on all
    paths at once) find the same first path at fault and name the same problem."""
    from planktonio.path_rules import first_path_problem, path_problem
    encoded = [os.fsencode(p) for p in paths]
    blob = np.frombuffer(b"".join(p + b"\n" for p in encoded), dtype=np.uint8)
    ends = np.cumsum([len(p) + 1 for p in encoded]) - 1
    per_path = next(((at, problem) for at, p in enumerate(paths) if (problem := path_problem(p))), None)
    assert first_path_problem(blob, ends) == per_path


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


def test_checked_indexes_keep_one_data_set_s_splits_each_at_its_latest_state():
    """The cache of checked indexes: train, valid and test of one data set stay together; a split's newer
    state replaces its older one; asking for another data set's split lets the first data set's go."""
    from planktonio.dataset import CheckedIndexes
    checked, index = CheckedIndexes(), object()
    a = {split: (f"/a/index/{split}.npz", 2, 1, 1, 1) for split in ("train", "valid", "test")}
    for key in a.values():
        checked.put(key, index)
    assert len(checked) == 3 and all(checked.get(key) is index for key in a.values())
    newer = ("/a/index/train.npz", 2, 9, 9, 9)
    checked.put(newer, index)
    assert checked.get(a["train"]) is None and checked.get(newer) is index and len(checked) == 3
    checked.put(("/b/index/train.npz", 2, 1, 1, 1), index)
    assert len(checked) == 1 and checked.get(a["valid"]) is None
    checked.put(None, index)  # no state to key it by: not kept
    assert len(checked) == 1 and checked.get(None) is None


def test_a_split_s_index_is_read_and_checked_once_while_unchanged(coloured, tmp_path, monkeypatch):
    prepared, _ = coloured
    shutil.copytree(prepared, tmp_path / "p")
    reads = []
    real_read = SplitIndex.read.__func__
    monkeypatch.setattr(SplitIndex, "read", classmethod(lambda cls, path: reads.append(path) or real_read(cls, path)))
    dataset = PreparedDataset.load(tmp_path / "p")
    for _ in range(2):
        for split in ("train", "valid", "test"):
            dataset.index(split)
    assert len(reads) == 3
    os.utime(index_file(tmp_path / "p", "valid"), ns=(1, 1))  # a new state: read again
    dataset.index("valid")
    assert len(reads) == 4


@pytest.mark.parametrize("column, forged", [
    ("label", lambda column: np.asarray(column[0])),       # 0-d: was a TypeError
    ("width", lambda column: column.astype(np.float64)),   # floats: every image skipped, then an empty torch.cat
    ("height", lambda column: column.astype(np.float32)),
    ("sha256", lambda column: column.reshape(-1)),
])
def test_an_index_whose_columns_have_other_types_is_one_line(coloured, tmp_path, capsys, column, forged):
    """Issue 34 #7: a forged index with a recomputed checksum (no security boundary) is refused by the types and
    dimensions of its columns, not only their lengths: one line saying to rerun prepare, exit 2."""
    import dataclasses

    from .helpers import one_line_error, run_planktonio
    prepared, _ = coloured
    shutil.copytree(prepared, tmp_path / "p")
    path = index_file(tmp_path / "p", "train")
    index = SplitIndex.read(path)
    dataclasses.replace(index, **{column: forged(getattr(index, column))}).write(path)
    code, _, err = run_planktonio(["pack", "--data", tmp_path / "p"], capsys)
    line = one_line_error(code, err)
    assert f"train.npz: column {column} " in line and "rerun `python -m planktonio prepare`" in line

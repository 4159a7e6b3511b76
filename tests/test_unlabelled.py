"""Images without labels as predict finds them (planktonio/unlabelled.py, planktonio/shard_reading.py): every
image found is accounted for once, read or rejected with the reason (issue 34: duplicates, unsupported
formats, linked sample folders, names that are not UTF-8, damaged tar shards, inputs that are no input)."""

from __future__ import annotations

import io
import os
import tarfile

import numpy as np
import pytest
from PIL import Image

from planktonio import PlanktonioError
from planktonio.image_checks import problem_at
from planktonio.unlabelled import discover, read_headers

from .conftest import jpeg_bytes


def image(path, size=(30, 20)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (9, 9, 9)).save(path)
    return path


def rejected(catalog) -> dict[str, tuple[str, str]]:
    """path -> (reason, detail) of every image read_headers rejects, the way predict lists them."""
    _, _, problems = read_headers(catalog, np.arange(len(catalog)))
    return {catalog.paths[p]: problem for p, problem in problems.items()}


def test_a_path_listed_twice_is_rejected_the_second_time(tmp_path):
    a, b = image(tmp_path / "a.jpg"), image(tmp_path / "b.jpg")
    listing = tmp_path / "list.txt"
    listing.write_text(f"a.jpg\nb.jpg\n./a.jpg\n{a}\n")
    catalog = discover(listing)
    assert sorted(catalog.paths) == sorted([str(a)] * 3 + [str(b)])  # every line accounted for
    found = read_headers(catalog, np.arange(len(catalog)))[2]
    assert sorted(catalog.paths[p] for p in found) == [str(a), str(a)]
    assert all(reason == "duplicate path" and "first at line 1" in detail for reason, detail in found.values())


def test_other_image_formats_are_rejected_and_linked_sample_folders_entered(tmp_path):
    source = tmp_path / "src"
    image(source / "bin1" / "a.jpg")
    (source / "bin1" / "b.gif").write_bytes(b"GIF89a")
    (source / "bin1" / "c.webp").write_bytes(b"RIFF")
    (source / "bin1" / "notes.txt").write_text("not an image: not listed")
    image(tmp_path / "elsewhere" / "d.png")
    (source / "linked").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (source / "bin1" / "loop").symlink_to(source, target_is_directory=True)  # a link back up: walked once
    catalog = discover(source)
    assert catalog.paths == ["bin1/a.jpg", "bin1/b.gif", "bin1/c.webp", "linked/d.png"]
    assert catalog.samples == ["bin1", "bin1", "bin1", "linked"]
    reasons = {path: reason for path, (reason, _) in rejected(catalog).items()}
    assert reasons == {"bin1/b.gif": "unsupported format", "bin1/c.webp": "unsupported format"}


def test_a_name_that_is_not_utf8_is_rejected_and_shown_escaped(tmp_path):
    source = tmp_path / "src"
    image(source / "bin" / "good.jpg")
    bad = os.fsencode(source / "bin") + b"/caf\xe9.jpg"  # Latin-1, as old instrument disks write names
    with open(bad, "wb") as f:
        f.write((source / "bin" / "good.jpg").read_bytes())
    catalog = discover(source)
    assert catalog.paths == ["bin/caf\\xe9.jpg", "bin/good.jpg"]
    assert rejected(catalog)["bin/caf\\xe9.jpg"][0] == "unsafe name"
    assert all(len(catalog.digest(unit)) == 64 for unit in catalog.units)  # was a UnicodeEncodeError


def _empty_tar(folder):
    (folder / "one.tar").write_bytes(b"")
    return folder


def _empty_folder(folder):
    (folder / "empty").mkdir()
    return folder / "empty"


@pytest.mark.parametrize("make, words", [
    (lambda folder: image(folder / "one.jpg"), "an image, not a list of images; give a file of paths"),
    (_empty_tar, "not a readable tar file (empty file (0 bytes))"),  # was 5 lines (each of tarfile's openers)
    (lambda folder: folder / "nowhere", "no such file or folder; give a file of paths"),
    (_empty_folder, "no images under it"),
])
def test_an_input_that_holds_no_images_is_one_line(tmp_path, make, words):
    with pytest.raises(PlanktonioError) as error:
        discover(make(tmp_path))
    assert words in str(error.value) and "\n" not in str(error.value)


def write_shard(path, count: int) -> list[str]:
    """A webdataset shard as pack writes it: KEY.jpg and KEY.cls per image, keys numbered from 0."""
    keys = [f"{k:08d}" for k in range(count)]
    with tarfile.open(path, "w") as tar:
        for k, key in enumerate(keys):
            for name, data in ((f"{key}.jpg", jpeg_bytes(48, seed=k)), (f"{key}.cls", b"0")):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return keys


@pytest.mark.parametrize("where", [0.5, 0.9])
def test_a_damaged_shard_loses_no_image_silently(tmp_path, where):
    """4 KB overwritten inside a shard: Python's tarfile stopped at the first bad header and every member after
    it was gone without a word. Every image is now in the catalog: read, or reported."""
    folder = tmp_path / "shards"
    folder.mkdir()
    keys = write_shard(folder / "a-00000.tar", 40)
    data = bytearray((folder / "a-00000.tar").read_bytes())
    at = int(len(data) * where)
    data[at:at + 4096] = b"\x5a" * 4096
    (folder / "a-00000.tar").write_bytes(bytes(data))
    catalog = discover(folder)
    reported = rejected(catalog)
    keys_found = [os.path.splitext(p)[0] for p in catalog.paths if ".tar:" not in p]  # not a stretch's own line
    assert sorted(keys_found) == keys  # each image once: none dropped, none twice
    lost = {p for p, (reason, _) in reported.items() if reason == "damaged shard"}
    unreadable = {catalog.paths[p] for p in range(len(catalog)) if catalog.paths[p] not in reported
                  and problem_at(catalog.paths[p], catalog.shards, p) is not None}
    read = len(catalog) - len(reported) - len(unreadable)
    assert lost and read >= 30  # the members after the damage were read
    assert all("hold no valid tar header" in reported[p][1] for p in lost)

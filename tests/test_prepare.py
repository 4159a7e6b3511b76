"""prepare and square (planktonio/preparation.py, planktonio/square.py): validation, stratified reproducible
splits, manifests, duplicates, what is taken and what is skipped, bit depths, and clear errors."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from planktonio import PlanktonioError, PreparedDataset, prepare
from planktonio.image_checks import inspect_image
from planktonio.inspection import JOURNAL
from planktonio.preparation import SplitPlan
from planktonio.square import square_tree

from .conftest import jpeg_bytes, write_coloured_set
from .helpers import (
    REPO,
    descendants,
    one_line_error,
    process_env,
    python,
    run_planktonio,
    wait_for,
)


@pytest.fixture
def source(tmp_path):
    """4 classes with 30, 30, 30 and 8 good images."""
    src = tmp_path / "source"
    write_coloured_set(src, classes=3, per_class=30, size=16)
    (src / "rare").mkdir()
    for i in range(8):
        (src / "rare" / f"r{i}.jpg").write_bytes(jpeg_bytes(16, seed=i))
    return src


def read_manifest(path):
    return [(line.rsplit(" ", 1)[0], int(line.rsplit(" ", 1)[1])) for line in path.read_text().splitlines()]


def test_split_sizes_stratification_and_disjointness(source, tmp_path):
    result = prepare(source, tmp_path / "out", min_images=20, plan=SplitPlan(per_class=(12, 5, 4)), workers=1)
    assert result.classes == ["class0", "class1", "class2"]  # "rare" (8 images) dropped
    splits = {s: read_manifest(tmp_path / "out" / f"{s}.txt") for s in ("train", "valid", "test")}
    for split, want in (("train", 12), ("valid", 5), ("test", 4)):
        per_label = {}
        for path, label in splits[split]:
            per_label[label] = per_label.get(label, 0) + 1
            assert path.startswith(f"class{label}/")  # the label is the class folder's index
        assert per_label == {0: want, 1: want, 2: want}
    paths = [set(p for p, _ in splits[s]) for s in splits]
    assert not (paths[0] & paths[1] or paths[0] & paths[2] or paths[1] & paths[2])
    meta = json.loads((tmp_path / "out" / "classes.json").read_text())
    assert meta["classes"] == result.classes and meta["dropped_classes"] == {"rare": 8}
    assert meta["split_sizes"] == {"train": 36, "valid": 15, "test": 12}


def test_split_is_reproducible_and_depends_on_seed(source, tmp_path):
    plan = SplitPlan(per_class=(10, 10, 10))
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        prepare(source, tmp_path / name, min_images=20, plan=plan, seed=seed, workers=1)
    text = {n: (tmp_path / n / "valid.txt").read_text() for n in "abc"}
    assert text["a"] == text["b"]
    assert text["a"] != text["c"]


def test_default_fractions_use_every_usable_image(source, tmp_path):
    result = prepare(source, tmp_path / "out", workers=1)
    sizes = {s: len(e) for s, e in result.splits.items()}
    assert sum(sizes.values()) == 98
    assert sizes == {"train": 78, "valid": 10, "test": 10}  # 30 -> 24/3/3, 8 -> 6/1/1 per class


def test_bad_files_are_rejected_with_reasons(source, tmp_path):
    good = jpeg_bytes(32)
    broken = {
        "class0/empty.jpg": (b"", "empty"),
        "class0/half.jpg": (good[: len(good) // 2], "truncated"),
        "class1/notes.jpg": (b"these are field notes, not a picture\n" * 20, "not an image"),
        "class1/noise.png": (bytes(range(256)) * 8, "not an image"),
        "class2/damaged.jpg": (good[:400] + random.Random(0).randbytes(200) + good[600:], "unreadable"),
    }
    for rel, (data, _) in broken.items():
        (source / rel).write_bytes(data)
    (source / "class2" / "readme.txt").write_text("not an image extension: ignored")

    result = prepare(source, tmp_path / "out", min_images=20, plan=SplitPlan(per_class=(20, 5, 5)), workers=2)

    with open(tmp_path / "out" / "rejected.csv") as f:
        rows = {r["path"]: r for r in csv.DictReader(f)}
    assert {p: r["reason"] for p, r in rows.items()} == {
        str(source.resolve() / rel): reason for rel, (_, reason) in broken.items()}
    assert all(r["detail"] for r in rows.values())
    listed = {p for s in result.splits.values() for p, _ in s}
    assert not listed & set(broken)  # no bad file reaches a manifest
    assert len(listed) == 90


def test_inspect_image_accepts_good_formats(tmp_path):
    from PIL import Image
    for ext in ("png", "bmp", "tif", "jpeg"):
        Image.new("RGB", (9, 7), (1, 2, 3)).save(tmp_path / f"ok.{ext}")
        assert inspect_image(tmp_path / f"ok.{ext}").problem is None


@pytest.mark.parametrize("setup, kwargs, message", [
    ("missing", {}, "no such directory"),
    ("flat", {}, "no class folders"),
    ("ok", {"min_images": 31}, "no class has at least 31 usable images"),
    ("ok", {"plan": SplitPlan(per_class=(20, 10, 5))}, "asks for 35"),
])
def test_error_messages(tmp_path, source, setup, kwargs, message):
    src = {"missing": tmp_path / "nowhere", "flat": tmp_path / "flat", "ok": source}[setup]
    if setup == "flat":
        src.mkdir()
        (src / "a.jpg").write_bytes(jpeg_bytes())
    kwargs.setdefault("min_images", 20)
    with pytest.raises(PlanktonioError, match=message):
        prepare(src, tmp_path / "out", workers=1, **kwargs)


def test_cli_prints_error_not_traceback(tmp_path, capsys):
    code, _, err = run_planktonio(["prepare", "--source", tmp_path / "x", "--out", tmp_path / "o"], capsys)
    assert one_line_error(code, err).startswith("error: source")


def test_cli_prepare_prints_summary(source, tmp_path, capsys):
    code, out, err = run_planktonio(["prepare", "--source", source, "--out", tmp_path / "o", "--min-images", "20",
                                      "--per-class", "10,5,5", "--workers", "1"], capsys)
    assert code == 0, err
    assert re.search(r"^total\s+90\s+30\s+15\s+15$", out, re.MULTILINE), out
    assert "3 classes kept, 1 dropped" in out


def test_excluding_another_sets_classes_leaves_the_rest(source, tmp_path, capsys):
    """Pretraining data without the target's classes: `--exclude-classes-of TARGET`."""
    target = tmp_path / "target"
    prepare(source, target, min_images=20, plan=SplitPlan(per_class=(10, 5, 5)), workers=1)
    code, _, err = run_planktonio(["prepare", "--source", source, "--out", tmp_path / "others", "--fractions",
                                    "0.75,0.25,0", "--exclude-classes-of", target, "--workers", "1"], capsys)
    assert code == 0, err
    others = PreparedDataset.load(tmp_path / "others")
    assert others.classes == ("rare",) and not set(others.classes) & set(PreparedDataset.load(target).classes)
    assert json.loads((tmp_path / "others" / "classes.json").read_text())["excluded_classes"] == [
        "class0", "class1", "class2"]
    with pytest.raises(PlanktonioError, match="every class folder is excluded"):
        prepare(source, tmp_path / "none", exclude=("class0", "class1", "class2", "rare"), workers=1)


# ------------------------------------------------------------------ byte-identical copies


def reference_split(files, counts, seed, class_name):
    """The split as prepare made it before it knew about copies (commit 43b7b19): kept here to prove
    that a set without copies is split exactly as before."""
    shuffled = sorted(files)
    random.Random(f"{seed}:{class_name}").shuffle(shuffled)
    n_train, n_valid, n_test = counts
    return {"train": sorted(shuffled[:n_train]), "valid": sorted(shuffled[n_train:n_train + n_valid]),
            "test": sorted(shuffled[n_train + n_valid:n_train + n_valid + n_test])}


def read_duplicates(prepared):
    with open(prepared / "duplicates.csv") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("plan", [SplitPlan(), SplitPlan(per_class=(12, 5, 4)), SplitPlan(fractions=(0.5, 0.25, 0.25))])
def test_a_set_without_copies_is_split_as_before(source, tmp_path, plan):
    for seed in (0, 1, 7):
        result = prepare(source, tmp_path / f"out{seed}", min_images=20, plan=plan, seed=seed, workers=1)
        for label, name in enumerate(result.classes):
            files = sorted(p for p in (source / name).iterdir())
            before = reference_split([f"{name}/{p.name}" for p in files], plan.counts(len(files)), seed, name)
            for split in ("train", "valid", "test"):
                assert [p for p, lab in result.splits[split] if lab == label] == before[split], (seed, name, split)
        assert read_duplicates(tmp_path / f"out{seed}") == []  # checked, and none found


def test_copies_within_a_class_are_listed_and_stay_in_one_split(source, tmp_path):
    """Three copies of one image and two of another: whatever the seed, all copies of an image land
    in the same split (or, with fixed counts, in none), and the counts are met in distinct images."""
    (source / "class0" / "sub").mkdir()
    first = (source / "class0" / "img000.jpg").read_bytes()
    (source / "class0" / "copy_a.jpg").write_bytes(first)
    (source / "class0" / "sub" / "copy_b.jpg").write_bytes(first)
    (source / "class1" / "again.jpg").write_bytes((source / "class1" / "img005.jpg").read_bytes())
    groups = [{"class0/copy_a.jpg", "class0/img000.jpg", "class0/sub/copy_b.jpg"},
              {"class1/again.jpg", "class1/img005.jpg"}]
    for seed in range(6):
        for plan, name in ((SplitPlan(), f"f{seed}"), (SplitPlan(per_class=(12, 5, 4)), f"p{seed}")):
            result = prepare(source, tmp_path / name, min_images=20, plan=plan, seed=seed, workers=1)
            where = {path: split for split, entries in result.splits.items() for path, _ in entries}
            for group in groups:
                assert len({where.get(path) for path in group}) == 1, (seed, plan, group, where)
            # The counts are of distinct images: the extra copies come with the image they copy.
            extra_copies = {p for g in groups for p in sorted(g)[1:]}
            for label in range(3):
                distinct = {s: sum(1 for p, lab in e if lab == label and p not in extra_copies)
                            for s, e in result.splits.items()}
                assert tuple(distinct.values()) == plan.counts(30), (seed, label, distinct)  # 30 distinct each
            rows = read_duplicates(tmp_path / name)
            listed = {}
            for row in rows:
                path = os.path.relpath(row["path"], source.resolve())
                listed.setdefault(row["group"], set()).add(path)
                assert row["class"] == path.split("/")[0] and row["split"] == where.get(path, ""), row
                assert row["sha256"] == hashlib.sha256((source / path).read_bytes()).hexdigest()
            assert sorted(map(sorted, listed.values())) == sorted(map(sorted, groups))
            assert not result.rejected


def test_copies_in_two_classes_are_dropped_listed_and_reported(source, tmp_path, capsys):
    """The same bytes under two labels: no label can be trusted, so every copy is dropped."""
    stray = (source / "class0" / "img001.jpg").read_bytes()
    (source / "class1" / "stray.jpg").write_bytes(stray)
    (source / "class2" / "stray.jpg").write_bytes(stray)
    (source / "class2" / "stray2.jpg").write_bytes(stray)
    copies = {"class0/img001.jpg": "class1, class2", "class1/stray.jpg": "class0, class2",
              "class2/stray.jpg": "class0, class1", "class2/stray2.jpg": "class0, class1"}
    code, out, err = run_planktonio(["prepare", "--source", source, "--out", tmp_path / "o", "--min-images", "20",
                                      "--workers", "1"], capsys)
    assert code == 0, err
    assert "4 files of 1 image found in more than one class dropped" in out, out
    listed = {p for s in ("train", "valid", "test") for p, _ in read_manifest(tmp_path / "o" / f"{s}.txt")}
    assert not listed & set(copies) and len(listed) == 29 + 30 + 30
    with open(tmp_path / "o" / "rejected.csv") as f:
        rows = {os.path.relpath(r["path"], source.resolve()): r for r in csv.DictReader(f)}
    assert set(rows) == set(copies)
    for path, others in copies.items():
        assert rows[path]["reason"] == "duplicate in another class"
        assert f"also in {others}" in rows[path]["detail"], rows[path]["detail"]
    rows = read_duplicates(tmp_path / "o")
    assert {os.path.relpath(r["path"], source.resolve()) for r in rows} == set(copies)
    assert {r["group"] for r in rows} == {"1"} and {r["split"] for r in rows} == {""}
    meta = json.loads((tmp_path / "o" / "classes.json").read_text())
    assert meta["usable_per_class"] == {"class0": 29, "class1": 30, "class2": 30}


# ------------------------------------------------------------------ what prepare takes, and what it refuses


def rejected_reasons(prepared) -> dict[str, str]:
    with open(prepared / "rejected.csv") as f:
        return {os.path.basename(r["path"]): r["reason"] for r in csv.DictReader(f)}


def test_images_wider_than_8_bits_are_refused_with_the_reason_and_square_converts_them(tmp_path):
    """Chosen: prepare refuses 16-bit and float images (the backends would read them differently:
    DALI scales 16 bits to 8, torchvision kept uint16 and crashed on a mix), naming the fix;
    `square` converts them by their full range (16 bits / 257, floats 0..1 x 255) instead of
    turning them white."""
    source = tmp_path / "source"
    write_coloured_set(source, classes=2, per_class=4, size=16)
    # Three different greys: the same picture under two classes would be dropped as a conflicting duplicate.
    greys = {"class0/wide.jpg": 128, "class1/wide.jpg": 100, "class1/float.jpg": 64}
    Image.fromarray(np.full((16, 16), 128 * 257, dtype=np.uint16)).save(source / "class0" / "wide.png")
    Image.fromarray(np.full((16, 16), 100 * 257, dtype=np.uint16)).save(source / "class1" / "wide.tif")
    Image.fromarray(np.full((16, 16), 64 / 255, dtype=np.float32)).save(source / "class1" / "float.tif")
    result = prepare(source, tmp_path / "prepared", plan=SplitPlan(per_class=(2, 1, 1)), workers=1)
    assert rejected_reasons(tmp_path / "prepared") == {
        "wide.png": "unsupported bit depth", "wide.tif": "unsupported bit depth", "float.tif": "unsupported bit depth"}
    assert sum(len(e) for e in result.splits.values()) == 8  # every 8-bit image kept
    with open(tmp_path / "prepared" / "rejected.csv") as f:
        assert "python -m planktonio square" in f.read()

    written, failures = square_tree(source, tmp_path / "squared", size=16, workers=1)
    assert written == 11 and not failures
    for name, grey in greys.items():
        pixels = np.asarray(Image.open(tmp_path / "squared" / name))
        assert abs(float(pixels.mean()) - grey) < 2, name
    prepared = prepare(tmp_path / "squared", tmp_path / "prepared2", plan=SplitPlan(per_class=(3, 1, 1)), workers=1)
    assert not prepared.rejected


def test_prepare_takes_sub_folders_lists_what_it_skips_and_refuses_unsafe_names(tmp_path):
    """Chosen: images in sub-folders of a class folder belong to the class; every other file is
    listed in skipped.csv with why; names that would break a manifest line are rejected."""
    source = tmp_path / "source"
    write_coloured_set(source, classes=2, per_class=3, size=16)
    good = (source / "class0" / "img000.jpg").read_bytes()
    for d, day in enumerate(("day1", "day2")):
        (source / "class1" / day).mkdir()
        for i in range(2):  # pictures of their own: copies of class0's would be dropped as mislabelled
            (source / "class1" / day / f"{day}_{i}.jpg").write_bytes(jpeg_bytes(16, seed=2 * d + i))
    (source / "class0" / "notes").write_text("no extension")
    (source / "class0" / "frame.webp").write_bytes(b"RIFF")
    (source / "top-level.jpg").write_bytes(good)
    for name in ("line\nbreak.jpg", "form\x0cfeed.jpg", "para\u2028sep.jpg", "tab\tname.jpg"):
        (source / "class0" / name).write_bytes(good)
    result = prepare(source, tmp_path / "prepared", workers=1)
    assert result.usable == {"class0": 3, "class1": 7}
    listed = [p for entries in result.splits.values() for p, _ in entries]
    assert {p for p in listed if "/day" in p} == {f"class1/{d}/{d}_{i}.jpg" for d in ("day1", "day2") for i in (0, 1)}
    with open(tmp_path / "prepared" / "skipped.csv") as f:
        skipped = {os.path.relpath(r["path"], source): r["reason"] for r in csv.DictReader(f)}
    assert set(skipped) == {"class0/notes", "class0/frame.webp", "top-level.jpg"}
    assert skipped["top-level.jpg"] == "not in a class folder"
    assert sum(reason == "unsafe name" for reason in rejected_reasons(tmp_path / "prepared").values()) == 4
    dataset = PreparedDataset.load(tmp_path / "prepared")
    assert sorted(p for s in ("train", "valid", "test") for p, _ in dataset.entries(s)) == sorted(listed)
    assert "4 skipped as not images" not in result.summary() and "3 skipped as not images" in result.summary()


@pytest.mark.parametrize("args, message", [
    (["--fractions", "0.5,nan,0.5"], "fractions in \\[0, 1\\] summing to 1"),
    (["--fractions", "nan,0.5,0.5"], "fractions in \\[0, 1\\] summing to 1"),
    (["--workers", "-1"], "integer >= 1"),
    (["--min-images", "-5"], "integer >= 1"),
])
def test_prepare_options_are_checked(coloured, tmp_path, capsys, args, message):
    prepared, _ = coloured
    root = PreparedDataset.load(prepared).root
    code, _, err = run_planktonio(["prepare", "--source", root, "--out", tmp_path / "never-written", *args], capsys)
    line = one_line_error(code, err)
    assert re.search(message, line), line
    assert not (tmp_path / "never-written").exists()


def test_out_naming_a_file_and_a_bad_square_input_are_clear(coloured, tmp_path, capsys):
    prepared, _ = coloured
    root = PreparedDataset.load(prepared).root
    (tmp_path / "file").write_text("x")
    for command in ("prepare", "square"):
        code, _, err = run_planktonio([command, "--source", root, "--out", tmp_path / "file"], capsys)
        assert "is a file, not a folder" in one_line_error(code, err)


def test_square_skips_a_decompression_bomb_and_keeps_colliding_names_apart(tmp_path, monkeypatch):
    """One bad file is reported and skipped, not the end of the run; x.png and x.tif both survive."""
    source = tmp_path / "source"
    (source / "c").mkdir(parents=True)
    Image.new("RGB", (20, 10), (200, 10, 10)).save(source / "c" / "x.png")
    Image.new("RGB", (20, 10), (10, 10, 200)).save(source / "c" / "x.tif")
    Image.new("RGB", (3000, 3000), (0, 0, 0)).save(source / "c" / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2_000_000)  # 3000 x 3000 is over twice that: a bomb
    written, failures = square_tree(source, tmp_path / "out", 16, workers=1)
    assert written == 2 and len(failures) == 1 and "bomb.png" in failures[0], failures
    red = np.asarray(Image.open(tmp_path / "out" / "c" / "x.jpg"))[..., 0].mean()
    blue = np.asarray(Image.open(tmp_path / "out" / "c" / "x_tif.jpg"))[..., 2].mean()
    assert red > 150 and blue > 150


def test_an_unreadable_class_folder_is_a_one_line_error(tmp_path, monkeypatch):
    """Tests run as root, who reads everything: the folder's permission error is simulated."""
    from planktonio import preparation
    source = tmp_path / "source"
    write_coloured_set(source, classes=2, per_class=2, size=8)

    def walk(top, onerror=None):
        onerror(PermissionError(13, "Permission denied", str(top)))
        return iter(())
    monkeypatch.setattr(preparation.os, "walk", walk)
    with pytest.raises(PlanktonioError, match="class0: cannot be read \\(Permission denied\\); fix its permissions"):
        prepare(source, tmp_path / "prepared", workers=1)


def test_a_class_folder_that_links_back_to_the_source_is_skipped_with_the_reason(source, tmp_path):
    """A link to the source folder inside it was taken as a class holding every image again: each image was
    then a copy under two classes, all were dropped, and the summary did not say why."""
    (source / "everything").symlink_to(source)
    result = prepare(source, tmp_path / "prepared", min_images=20, workers=1)
    assert result.usable == {"class0": 30, "class1": 30, "class2": 30}
    with open(tmp_path / "prepared" / "skipped.csv") as f:
        reasons = {os.path.basename(r["path"]): r["reason"] for r in csv.DictReader(f)}
    assert "the source folder itself" in reasons["everything"]


# ------------------------------------------------------------------ stopped and resumed


def prepared_files(folder) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_a_prepare_stopped_mid_way_goes_on_to_the_same_folder(source, tmp_path, sig):
    """Stopped after 2 of its journal's parts (8 images each here; 16,384 normally), the same command again
    decodes only the parts left and writes byte for byte what an uninterrupted prepare writes: manifests,
    index, lists; and no journal is left."""
    args = ["-m", "tests.prepare_with_hooks", "prepare", "--source", str(source), "--per-class", "4,2,2",
            "--workers", "2"]
    whole = python(*args, "--out", str(tmp_path / "whole"))
    assert whole.returncode == 0, whole.stderr
    hold = tmp_path / "held"
    process = subprocess.Popen([sys.executable, *args, "--out", str(tmp_path / "stopped")], cwd=REPO,
                               env=process_env(HOLD_AFTER_PARTS="2", HOLD_FILE=str(hold)),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not hold.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert hold.exists(), process.communicate()[1]
        os.killpg(process.pid, sig)  # the process and its decoding workers, as a job's end would
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == -sig
    assert len(list((tmp_path / "stopped" / JOURNAL).glob("part-*.npz"))) == 2
    again = python(*args, "--out", str(tmp_path / "stopped"))
    assert again.returncode == 0, again.stderr
    assert "2 of " in again.stderr and "parts were decoded by an earlier run" in again.stderr
    assert prepared_files(tmp_path / "stopped") == prepared_files(tmp_path / "whole")
    assert not (tmp_path / "stopped" / JOURNAL).exists()


def _running(pid: int) -> bool:
    """The process exists and is not a zombie (a dead child that no one reaped yet)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_prepare_s_decoding_workers_end_with_it(source, tmp_path, sig):
    """Issue 34 #4: prepare stopped by SIGTERM or SIGKILL (the parent alone, as the OOM killer or a kill of
    its pid does) left its pool workers alive under init for ever; they now end with it."""
    hold = tmp_path / "held"
    args = ["-m", "tests.prepare_with_hooks", "prepare", "--source", str(source), "--per-class", "4,2,2",
            "--workers", "2", "--out", str(tmp_path / "out")]
    process = subprocess.Popen([sys.executable, *args], cwd=REPO, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True,
                               env=process_env(HOLD_AFTER_PARTS="2", HOLD_FILE=str(hold)))
    try:
        wait_for(hold, process=process)
        workers = descendants(process.pid)
        assert len(workers) == 2
        os.kill(process.pid, sig)
        process.wait(timeout=60)
        deadline = time.monotonic() + 30
        while any(_running(w) for w in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [w for w in workers if _running(w)]
    finally:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_a_name_that_is_not_utf8_is_rejected_with_its_reason_shown_escaped(tmp_path):
    """Issue 34 #6: a file name that is not UTF-8 (os gives bytes, Python surrogates) was a traceback that left
    a half-written folder; it is now rejected as an unsafe name, listed in rejected.csv with \\xNN escapes."""
    source = tmp_path / "source"
    write_coloured_set(source, classes=2, per_class=3, size=16)
    for name in (b"caf\xe9.jpg", b"notes\xff.txt"):
        with open(os.fsencode(source / "class0") + b"/" + name, "wb") as f:
            f.write((source / "class0" / "img000.jpg").read_bytes())
    result = prepare(source, tmp_path / "prepared", workers=1)
    assert result.usable == {"class0": 3, "class1": 3}
    reasons = rejected_reasons(tmp_path / "prepared")
    assert reasons == {"caf\\xe9.jpg": "unsafe name"}
    with open(tmp_path / "prepared" / "rejected.csv", encoding="utf-8") as f:
        assert "the name is not valid UTF-8" in f.read()
    assert "class0/notes\\xff.txt" in (tmp_path / "prepared" / "skipped.csv").read_text(encoding="utf-8")


def test_classes_that_hold_the_same_files_are_refused_saying_why(tmp_path):
    """The smaller case of issue 34: every class holding the same pictures was refused as "largest: t0 with 0",
    without the reason (each copy is dropped as filed under several classes)."""
    source = tmp_path / "source"
    for name in ("t0", "t1"):
        (source / name).mkdir(parents=True)
        for i in range(3):
            (source / name / f"{i}.jpg").write_bytes(jpeg_bytes(16, seed=i))
    with pytest.raises(PlanktonioError) as error:
        prepare(source, tmp_path / "prepared", workers=1)
    message = str(error.value)
    assert "largest: t0 with 0" in message and "6 of 6 files rejected: 6 duplicate in another class" in message
    assert "also in t1" in message and "\n" not in message

"""prepare: validation, stratified reproducible splits, manifests, clear errors."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import random
import re
import subprocess
import sys

import pytest

from planktonio import PlanktonioError, PreparedDataset, make_loader, prepare
from planktonio.dataset import SplitPlan, inspect_image

from .conftest import REPO, jpeg_bytes, write_coloured_set


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


def test_cli_prints_error_not_traceback(tmp_path):
    run = subprocess.run([sys.executable, "-m", "planktonio", "prepare", "--source", str(tmp_path / "x"),
                          "--out", str(tmp_path / "o")], capture_output=True, text=True, cwd=REPO)
    assert run.returncode == 2
    assert run.stderr.startswith("error: source") and "Traceback" not in run.stderr


def test_cli_prepare_prints_summary(source, tmp_path):
    run = subprocess.run([sys.executable, "-m", "planktonio", "prepare", "--source", str(source),
                          "--out", str(tmp_path / "o"), "--min-images", "20", "--per-class", "10,5,5",
                          "--workers", "1"], capture_output=True, text=True, cwd=REPO)
    assert run.returncode == 0, run.stderr
    assert re.search(r"^total\s+90\s+30\s+15\s+15$", run.stdout, re.MULTILINE), run.stdout
    assert "3 classes kept, 1 dropped" in run.stdout


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


def test_excluding_another_sets_classes_leaves_the_rest(source, tmp_path):
    """Pretraining data without the target's classes: `--exclude-classes-of TARGET`."""
    target = tmp_path / "target"
    prepare(source, target, min_images=20, plan=SplitPlan(per_class=(10, 5, 5)), workers=1)
    run = subprocess.run([sys.executable, "-m", "planktonio", "prepare", "--source", str(source), "--out",
                          str(tmp_path / "others"), "--fractions", "0.75,0.25,0", "--exclude-classes-of", str(target),
                          "--workers", "1"], capture_output=True, text=True, cwd=REPO)
    assert run.returncode == 0, run.stderr
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
                assert [p for p, l in result.splits[split] if l == label] == before[split], (seed, name, split)
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
                distinct = {s: sum(1 for p, l in e if l == label and p not in extra_copies)
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


def test_copies_in_two_classes_are_dropped_listed_and_reported(source, tmp_path):
    """The same bytes under two labels: no label can be trusted, so every copy is dropped."""
    stray = (source / "class0" / "img001.jpg").read_bytes()
    (source / "class1" / "stray.jpg").write_bytes(stray)
    (source / "class2" / "stray.jpg").write_bytes(stray)
    (source / "class2" / "stray2.jpg").write_bytes(stray)
    copies = {"class0/img001.jpg": "class1, class2", "class1/stray.jpg": "class0, class2",
              "class2/stray.jpg": "class0, class1", "class2/stray2.jpg": "class0, class1"}
    run = subprocess.run([sys.executable, "-m", "planktonio", "prepare", "--source", str(source), "--out",
                          str(tmp_path / "o"), "--min-images", "20", "--workers", "1"],
                         capture_output=True, text=True, cwd=REPO)
    assert run.returncode == 0, run.stderr
    assert "4 files of 1 image found in more than one class dropped" in run.stdout, run.stdout
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

"""Bad and unusual input (issue: "Bad input never ends a run badly or changes a result silently").

One test (or a few) per finding; the behaviour chosen is in each docstring.
The file changed after prepare (finding 9) is tested in test_loaders.py.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from planktonio import EVAL_TRANSFORM, PlanktonioError, PreparedDataset, make_loader, prepare
from planktonio.dataset import SplitPlan
from planktonio.square import square_tree

from .conftest import REPO, jpeg_bytes, write_coloured_set


def rejected_reasons(prepared) -> dict[str, str]:
    with open(prepared / "rejected.csv") as f:
        return {os.path.basename(r["path"]): r["reason"] for r in csv.DictReader(f)}


def cli(*args, module="planktonio"):
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True, text=True)


def one_line_error(result) -> str:
    """The error of a command that must fail with exit 2 and a one-line message, no traceback."""
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip() and not line.startswith("usage:")
             and not line.startswith(" ")]
    assert len(lines) == 1, result.stderr
    return lines[0]


# ------------------------------------------------------------------ 2. bit depth


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


# ------------------------------------------------------------------ 3. EXIF orientation


def test_exif_orientation_is_applied_alike_by_every_backend(tmp_path):
    """Chosen: every backend shows the picture upright (DALI's decoders do; torchvision now applies
    the EXIF orientation too), and prepare records the upright size for the plans."""
    source = tmp_path / "source"
    for c in range(2):
        (source / f"c{c}").mkdir(parents=True)
        for i in range(3):
            pixels = np.zeros((40, 80, 3), dtype=np.uint8)  # 80 wide, 40 high: left half dark, right bright
            pixels[:, 40:] = 230
            pixels[:, :40] = 30 + 20 * i + 5 * c  # no two alike: a copy under two classes would be dropped
            exif = Image.Exif()
            exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
            Image.fromarray(pixels).save(source / f"c{c}" / f"img{i}.jpg", exif=exif.tobytes(), quality=95)
    prepare(source, tmp_path / "prepared", plan=SplitPlan(per_class=(1, 1, 1)), workers=1)
    info = PreparedDataset.load(tmp_path / "prepared").image_info("valid", 2)
    assert info.width.tolist() == [40, 40] and info.height.tolist() == [80, 80]  # upright: 40 wide, 80 high
    transform = EVAL_TRANSFORM.__class__(size=32, resize=32)
    outputs = {}
    for backend in ("dali-cpu", "torchvision"):
        with make_loader(backend, tmp_path / "prepared", "valid", batch_size=2, device="cpu", workers=1,
                         transform=transform) as loader:
            outputs[backend] = next(iter(loader))[0]
    std = torch.tensor(transform.std).view(1, 3, 1, 1)
    assert ((outputs["dali-cpu"] - outputs["torchvision"]).abs() * std * 255).max() <= 2
    # Turned clockwise, the dark left half is on top: the top rows are darker than the bottom ones.
    image = outputs["torchvision"][0].mean(dim=0)
    assert image[:8].mean() < image[-8:].mean() - 1


# ------------------------------------------------------------------ 5. empty splits


def test_an_empty_split_is_refused_before_any_work(tmp_path):
    """Chosen: a split with no images is an error when a loader for it is made (before training:
    validation drives early stopping and best.pt), not a loss of 0 or a crash."""
    source = tmp_path / "source"
    write_coloured_set(source, classes=2, per_class=5, size=16)
    prepare(source, tmp_path / "prepared", plan=SplitPlan(fractions=(1.0, 0.0, 0.0)), workers=1)
    for backend in ("dali-cpu", "torchvision"):
        with pytest.raises(PlanktonioError, match="valid.txt: the valid split has no images"):
            make_loader(backend, tmp_path / "prepared", "valid", batch_size=2, device="cpu", workers=1)


# ------------------------------------------------------------------ 6. what prepare takes


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


# ------------------------------------------------------------------ 7. manifests


@pytest.mark.parametrize("line, message", [
    ("../../../etc/passwd 0", "leaves the data root"),
    ("/etc/passwd 0", "leaves the data root"),
    ("class0/img000.jpg \u0662", "label of digits 0-9"),   # an Arabic-Indic two
    ("class0/img000.jpg \u00b2", "label of digits 0-9"),   # a superscript two
    ("class0/img000.jpg 7", "label 7 is not a class"),
    ("class0/img000.jpg", "label of digits 0-9"),
])
def test_a_bad_manifest_line_is_a_one_line_error_naming_the_line(coloured, tmp_path, line, message):
    import shutil
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


# ------------------------------------------------------------------ 8. one-line errors


@pytest.mark.parametrize("args, message", [
    (["--fractions", "0.5,nan,0.5"], "fractions in \\[0, 1\\] summing to 1"),
    (["--fractions", "nan,0.5,0.5"], "fractions in \\[0, 1\\] summing to 1"),
    (["--workers", "-1"], "integer >= 1"),
    (["--min-images", "-5"], "integer >= 1"),
])
def test_prepare_options_are_checked(coloured, args, message):
    prepared, _ = coloured
    root = PreparedDataset.load(prepared).root
    line = one_line_error(cli("prepare", "--source", str(root), "--out", "/tmp/never-written", *args))
    assert __import__("re").search(message, line), line


def test_out_naming_a_file_and_a_bad_square_input_are_clear(coloured, tmp_path):
    prepared, _ = coloured
    root = PreparedDataset.load(prepared).root
    (tmp_path / "file").write_text("x")
    line = one_line_error(cli("prepare", "--source", str(root), "--out", str(tmp_path / "file")))
    assert "is a file, not a folder" in line
    line = one_line_error(cli("square", "--source", str(root), "--out", str(tmp_path / "file")))
    assert "is a file, not a folder" in line


def test_square_skips_a_decompression_bomb_and_keeps_colliding_names_apart(tmp_path, monkeypatch):
    """One bad file is reported and skipped, not the end of the run; x.png and x.tif both survive."""
    source = tmp_path / "source"
    (source / "c").mkdir(parents=True)
    Image.new("RGB", (20, 10), (200, 10, 10)).save(source / "c" / "x.png")
    Image.new("RGB", (20, 10), (10, 10, 200)).save(source / "c" / "x.tif")
    Image.new("RGB", (3000, 3000), (0, 0, 0)).save(source / "c" / "bomb.png")
    result = subprocess.run([sys.executable, "-c", (
        "import PIL.Image as I, sys; I.MAX_IMAGE_PIXELS = 2_000_000; "  # 3000 x 3000 is over twice that: a bomb
        "from planktonio.square import square_tree; w, f = square_tree(sys.argv[1], sys.argv[2], 16, workers=1); "
        "print(w, len(f), f[0] if f else '')"), str(source), str(tmp_path / "out")],
        cwd=REPO, capture_output=True, text=True)
    written, failed, message = result.stdout.split(" ", 2)
    assert (written, failed) == ("2", "1") and "bomb.png" in message, result.stderr
    red = np.asarray(Image.open(tmp_path / "out" / "c" / "x.jpg"))[..., 0].mean()
    blue = np.asarray(Image.open(tmp_path / "out" / "c" / "x_tif.jpg"))[..., 2].mean()
    assert red > 150 and blue > 150


@pytest.mark.parametrize("args, message", [
    (["--epochs", "0"], "must be >= 1"),
    (["--repeats", "0"], "must be >= 1"),
    (["--backends", "memory"], "name at least one loader backend"),
    (["--backends", "ffcv"], "unknown loader backend 'ffcv'"),
])
def test_loader_benchmark_options_are_checked(coloured, args, message):
    prepared, _ = coloured
    line = one_line_error(cli("loaders", "--data", str(prepared), "--batch-size", "4", *args, module="profiling"))
    assert message in line


@pytest.mark.parametrize("values, message", [
    ({"scale": 0.5}, "scale must be a list of 2 numbers"),
    ({"hflip": "yes"}, "hflip is a probability"),
    ({"size": True}, "size must be a positive integer"),
    ({"std": [0, 1, 1]}, "std positive"),
])
def test_bad_transform_values_are_clear_errors(values, message):
    from planktonio.transforms import Transform
    with pytest.raises(PlanktonioError, match=message):
        Transform.from_dict(values)
    with pytest.raises(PlanktonioError, match="a transform is a mapping"):
        Transform.from_dict(5)


# ------------------------------------------------------------------ 1. stopping a job


def test_sigterm_to_the_whole_process_group_with_torchvision_workers(synthetic, tmp_path):
    """What scancel, preemption and a time limit do: SIGTERM to every process of the job step,
    DataLoader workers included. Chosen: workers ignore it, the training process finishes its
    step, writes last.pt and exits 75; the resumed run ends bitwise where an uninterrupted one does."""
    config = tmp_path / "tv.yaml"
    config.write_text(json.dumps({
        "model": {"name": "tiny-cnn"}, "loader": {"backend": "torchvision", "batch_size": 4, "workers": 2},
        "optimizer": {"name": "adamw", "lr": 0.003}, "training": {"epochs": 4, "progress": False, "seed": 2},
        "augment": {"train": {"crop": "random_resized", "size": 48, "resize": 56, "hflip": 0.5},
                    "eval": {"crop": "center", "size": 48, "resize": 56}}}))
    fit = [sys.executable, "-m", "train", "fit", "--config", str(config), "--data", str(synthetic)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    whole = subprocess.run([*fit, "--out", str(tmp_path / "whole")], cwd=REPO, env=env, capture_output=True,
                           text=True)
    assert whole.returncode == 0, whole.stderr

    run = tmp_path / "split"
    process = subprocess.Popen([*fit, "--out", str(run)], cwd=REPO, env=env, start_new_session=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while not (run / "metrics.jsonl").exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGTERM)  # the whole group: the training process and its workers
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 75, output
    assert "killed by signal" not in output and "--resume" in output
    resumed = subprocess.run([*fit, "--out", str(run), "--resume"], cwd=REPO, env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr

    a = torch.load(tmp_path / "whole" / "last.pt", weights_only=False)["model"]
    b = torch.load(run / "last.pt", weights_only=False)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------ 4. runs and their data

TINY_RUN = {
    "model": {"name": "tiny-cnn"}, "loader": {"backend": "torchvision", "batch_size": 8, "workers": 0},
    "optimizer": {"name": "adamw", "lr": 0.003}, "training": {"epochs": 2, "progress": False},
    "augment": {"train": {"crop": "random_resized", "size": 32, "resize": 36},
                "eval": {"crop": "center", "size": 32, "resize": 36}}}


@pytest.fixture
def tiny_config(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(json.dumps(TINY_RUN))
    return path


def test_resume_and_evaluate_refuse_other_data(tmp_path, tiny_config):
    """Chosen: a run records a fingerprint of its data's class names and manifests (run.json);
    resuming on other data, or evaluating after prepare rewrote the run's folder, is refused."""
    source = tmp_path / "source"
    write_coloured_set(source, classes=2, per_class=12, size=16)
    data, other = tmp_path / "data", tmp_path / "other"
    prepare(source, data, plan=SplitPlan(per_class=(8, 2, 2)), seed=0, workers=1)
    prepare(source, other, plan=SplitPlan(per_class=(8, 2, 2)), seed=1, workers=1)
    fit = ["fit", "--config", str(tiny_config), "--out", str(tmp_path / "run")]
    assert cli(*fit, "--data", str(data), "--set", "training.epochs=1", module="train").returncode == 0
    line = one_line_error(cli(*fit, "--data", str(other), "--set", "training.epochs=2", "--resume", module="train"))
    assert "--resume:" in line and "is not the data" in line
    prepare(source, data, plan=SplitPlan(per_class=(8, 2, 2)), seed=1, workers=1)  # rewritten in place
    line = one_line_error(cli("evaluate", "--run", str(tmp_path / "run"), module="train"))
    assert "evaluate:" in line and "was prepare rerun into it" in line
    assert cli("evaluate", "--run", str(tmp_path / "run"), "--data", str(other), "--other-data",
               module="train").returncode == 0


def test_resume_with_a_mistyped_out_and_no_config_is_refused(tmp_path, synthetic):
    line = one_line_error(cli("fit", "--data", str(synthetic), "--out", str(tmp_path / "typo"), "--resume",
                              module="train"))
    assert "holds no run" in line and not (tmp_path / "typo" / "last.pt").exists()


def test_a_torn_last_metrics_line_does_not_stop_a_resume(tmp_path, synthetic, tiny_config):
    run = tmp_path / "run"
    fit = ["fit", "--config", str(tiny_config), "--data", str(synthetic), "--out", str(run)]
    assert cli(*fit, "--set", "training.epochs=1", module="train").returncode == 0
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 1, "train_lo')  # a crash in the middle of writing epoch 1's line
    resumed = cli(*fit, "--set", "training.epochs=2", "--resume", module="train")
    assert resumed.returncode == 0, resumed.stderr
    assert [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [0, 1]


def test_run_folder_errors_are_one_line(tmp_path, synthetic, tiny_config):
    (tmp_path / "file").write_text("x")
    line = one_line_error(cli("fit", "--config", str(tiny_config), "--data", str(synthetic), "--out",
                              str(tmp_path / "file"), module="train"))
    assert "is a file, not a folder" in line
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("model: {name: tiny-cnn}\n")
    line = one_line_error(cli("evaluate", "--run", str(tmp_path / "run"), module="train"))
    assert "run.json: cannot be read" in line


def test_an_empty_validation_split_stops_fit_before_training(tmp_path, tiny_config):
    source = tmp_path / "source"
    write_coloured_set(source, classes=2, per_class=10, size=16)
    prepare(source, tmp_path / "data", plan=SplitPlan(fractions=(1.0, 0.0, 0.0)), workers=1)
    line = one_line_error(cli("fit", "--config", str(tiny_config), "--data", str(tmp_path / "data"), "--out",
                              str(tmp_path / "run"), module="train"))
    assert "the valid split has no images" in line and not (tmp_path / "run" / "metrics.jsonl").exists()


# ------------------------------------------------------------------ 8. config values


@pytest.mark.parametrize("override, message", [
    ("optimizer.momentum=-1", "optimizer.momentum must be in"),
    ("training.seed=100000000000000000000", "training.seed must be in"),
    ("training.device=cuda:abc", "training.device must be"),
    ("optimizer.lr=.nan", "expected a finite number"),
    ("augment.train.scale=0.5", "scale must be a list of 2 numbers"),
    ("augment.train.hflip=yes", "hflip is a probability"),
    ("augment.train=5", "a transform is a mapping"),
])
def test_bad_config_values_are_one_line_errors(override, message):
    from train import config as config_module
    with pytest.raises(PlanktonioError, match=message):
        config_module.load(REPO / "train" / "configs" / "study.yaml", [override])


VALUES = st.one_of(st.none(), st.booleans(), st.integers(min_value=-2**70, max_value=2**70),
                   st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
                   st.lists(st.floats(allow_nan=True), max_size=4), st.dictionaries(st.text(max_size=5), st.integers(),
                                                                                  max_size=2))


@settings(max_examples=400, deadline=None)
@given(data=st.data())
def test_config_validation_gives_a_config_or_a_one_line_error(data):
    """Property: any value for any key (and any junk key) gives a valid Config or a PlanktonioError."""
    from dataclasses import fields
    from train import config as config_module
    section = data.draw(st.sampled_from([*config_module.SECTIONS, "augment", "junk"]))
    if section == "augment":
        key = data.draw(st.sampled_from(["train", "eval"]))
        sub = data.draw(st.sampled_from(["crop", "size", "resize", "scale", "ratio", "hflip", "mean", "std", "x"]))
        values = {"augment": {key: {sub: data.draw(VALUES)}}}
    elif section == "junk":
        values = {data.draw(st.text(max_size=8)): data.draw(VALUES)}
    else:
        key = data.draw(st.sampled_from([f.name for f in fields(config_module.SECTIONS[section])] + ["x"]))
        values = {section: {key: data.draw(VALUES)}}
    try:
        config = config_module.from_dict(values)
    except PlanktonioError as error:
        assert str(error).strip() and "\n" not in str(error)
        return
    assert isinstance(config, config_module.Config)
    config.transform("train"), config.transform("eval")  # a config that loads has transforms that build


def test_an_unreadable_class_folder_is_a_one_line_error(tmp_path, monkeypatch):
    """Tests run as root, who reads everything: the folder's permission error is simulated."""
    import planktonio.dataset as dataset
    source = tmp_path / "source"
    write_coloured_set(source, classes=2, per_class=2, size=8)

    def walk(top, onerror=None):
        onerror(PermissionError(13, "Permission denied", str(top)))
        return iter(())
    monkeypatch.setattr(dataset.os, "walk", walk)
    with pytest.raises(PlanktonioError, match="class0: cannot be read \\(Permission denied\\); fix its permissions"):
        prepare(source, tmp_path / "prepared", workers=1)

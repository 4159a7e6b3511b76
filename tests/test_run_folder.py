"""Trusting the run folder: no code from a checkpoint, one writer per run, every interrupt saved,
divergence caught, configs read as written. Each test is a fault found by trying the program as a careful
user and an adversarial tester would; each ends in a correct result or a one-line error."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from planktonio import PlanktonioError
from train import checkpoint
from train import config as config_module

from .conftest import REPO

TINY = {
    "model": {"name": "tiny-cnn"}, "loader": {"backend": "torchvision", "batch_size": 8, "workers": 0},
    "optimizer": {"name": "adamw", "lr": 0.003}, "training": {"epochs": 2, "progress": False, "seed": 3},
    "augment": {"train": {"crop": "random_resized", "size": 32, "resize": 36, "hflip": 0.5},
                "eval": {"crop": "center", "size": 32, "resize": 36}}}


def write_config(folder: Path, **training) -> Path:
    values = json.loads(json.dumps(TINY))
    values["training"].update(training)
    path = folder / "tiny.yaml"
    path.write_text(json.dumps(values))
    return path


def cli(*args, module="train", **kwargs):
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, **kwargs)


def one_line_error(result) -> str:
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.stderr, result.stderr
    return lines[0]


@pytest.fixture
def finished_run(tmp_path, synthetic):
    run = tmp_path / "run"
    done = cli("fit", "--config", str(write_config(tmp_path)), "--data", str(synthetic), "--out", str(run))
    assert done.returncode == 0, done.stderr
    return run


# ------------------------------------------------------------------ 1. a checkpoint runs no code


class Payload:
    """What an attacker pickles: unpickling it runs a command (here: creates a file)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("name", ["last.pt", "best.pt"])
def test_a_checkpoint_carrying_code_is_refused_and_the_code_never_runs(finished_run, tmp_path, synthetic, name):
    marker = tmp_path / "pwned"
    state = torch.load(finished_run / name, weights_only=True)
    state["config"] = Payload(marker)  # a state that would run `touch` when unpickled
    torch.save(state, finished_run / name)
    resumed = cli("fit", "--out", str(finished_run), "--data", str(synthetic), "--resume",
                  "--set", "training.epochs=3")
    evaluated = cli("evaluate", "--run", str(finished_run), "--checkpoint", name.removesuffix(".pt"))
    as_weights = cli("fit", "--config", str(write_config(tmp_path)), "--data", str(synthetic), "--out",
                     str(tmp_path / "other"), "--set", f"model.weights={finished_run / name}")
    refusals = [one_line_error(r) for r in ((resumed, evaluated) if name == "last.pt" else (evaluated, as_weights))]
    assert all("posix.system" in line and "refused" in line for line in refusals), refusals
    assert "weights_only" not in " ".join(refusals)  # not torch's advice to load it unsafely
    assert not marker.exists()


def test_a_checkpoint_with_changed_bytes_is_refused(finished_run, synthetic):
    """1 KiB changed in the middle of last.pt (inside a weight tensor's data): the checksum catches it."""
    last = finished_run / "last.pt"
    data = bytearray(last.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 1024] = bytes(b ^ 0x5A for b in data[middle:middle + 1024])
    last.write_bytes(bytes(data))
    line = one_line_error(cli("fit", "--out", str(finished_run), "--data", str(synthetic), "--resume",
                              "--set", "training.epochs=3"))
    assert "last.pt" in line and ("checksum" in line or "cannot be read" in line) and "best weights" in line


def test_the_checksum_covers_every_value(tmp_path):
    state = {"model": {"w": torch.arange(6.0)}, "epoch": 3, "rng": [1, 2], "name": "x"}
    checkpoint.save_atomic(state, tmp_path / "c.pt")
    assert checkpoint.load(tmp_path / "c.pt")["epoch"] == 3
    for change in (lambda s: s["model"]["w"].__setitem__(2, 2.5), lambda s: s.update(epoch=4),
                   lambda s: s["rng"].append(3), lambda s: s.update(name="y")):
        raw = torch.load(tmp_path / "c.pt", weights_only=True)
        change(raw)
        torch.save(raw, tmp_path / "d.pt")
        with pytest.raises(PlanktonioError, match="does not match its checksum"):
            checkpoint.load(tmp_path / "d.pt")


def test_a_weights_file_that_is_text_or_a_pickle_is_a_one_line_error(tmp_path, synthetic):
    text, plain = tmp_path / "text.pth", tmp_path / "plain.pth"
    text.write_text("not weights")
    plain.write_bytes(pickle.dumps({"w": [1.0, 2.0]}, protocol=4))
    config = write_config(tmp_path)
    for path, reason in ((text, "not a file of tensors"), (plain, "not a file of tensors")):
        line = one_line_error(cli("fit", "--config", str(config), "--data", str(synthetic), "--out",
                                  str(tmp_path / path.stem), "--set", f"model.weights={path}"))
        assert f"weights file {path}" in line and reason in line and "weights_only" not in line


# ------------------------------------------------------------------ 2. one writer per run


def test_a_second_fit_on_the_same_out_is_refused_until_the_first_dies(tmp_path, synthetic):
    run = tmp_path / "run"
    config = write_config(tmp_path, epochs=200, checkpoint_every_s=0.0)
    fit = ["fit", "--config", str(config), "--data", str(synthetic), "--out", str(run)]
    first = subprocess.Popen([sys.executable, "-m", "train", *fit], cwd=REPO, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.time() + 120
        while not (run / "last.pt").exists() and time.time() < deadline:
            time.sleep(0.1)
        assert (run / "last.pt").exists(), "the first run wrote no checkpoint"
        line = one_line_error(cli(*fit, "--resume"))
        assert f"another process is writing this run (train fit, pid {first.pid} on " in line
        assert one_line_error(cli("evaluate", "--run", str(run), "--checkpoint", "last")).count("pid") == 1
    finally:
        first.kill()  # SIGKILL: no clean-up of its own; the kernel drops the lock
        first.wait()
    resumed = cli(*fit, "--resume", "--set", "training.epochs=1")
    assert resumed.returncode == 0 and "resuming" in resumed.stdout, resumed.stderr


# ------------------------------------------------------------------ 4. Ctrl-C and hang-up


def interrupted_and_resumed(tmp_path, synthetic, sig, twice=False):
    config = write_config(tmp_path, epochs=3)
    values = json.loads(config.read_text())
    values["loader"]["workers"] = 2  # DataLoader workers in the process group too
    config.write_text(json.dumps(values))
    # twice: every step takes 0.2 s more (tests/fit_with_hooks.py), so the epoch's end, where the first
    # Ctrl-C is obeyed, comes well after the second one
    fit = [sys.executable, "-m", "tests.fit_with_hooks" if twice else "train", "fit", "--config", str(config),
           "--data", str(synthetic)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "STEP_SECONDS": "0.2" if twice else "0"}
    run = tmp_path / f"run-{sig.name}"
    process = subprocess.Popen([*fit, "--out", str(run)], cwd=REPO, env=env, start_new_session=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (run / "metrics.jsonl").exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.02)
    os.killpg(process.pid, sig)  # the whole group, as a terminal does
    if twice:
        time.sleep(0.3)
        os.killpg(process.pid, sig)
    out, err = process.communicate(timeout=120)
    return process.returncode, out, err, run, fit, env


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGHUP])
def test_ctrl_c_and_hang_up_checkpoint_and_resume_exactly(tmp_path, synthetic, sig):
    code, out, err, run, fit, env = interrupted_and_resumed(tmp_path, synthetic, sig)
    assert code == 75, out + err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    assert f"stopping on {sig.name}" in out and "--resume" in out
    assert subprocess.run([*fit, "--out", str(run), "--resume"], cwd=REPO, env=env).returncode == 0
    whole = tmp_path / "whole"
    assert subprocess.run([*fit, "--out", str(whole)], cwd=REPO, env=env, capture_output=True).returncode == 0
    a, b = (checkpoint.load(path / "last.pt")["model"] for path in (whole, run))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_second_ctrl_c_aborts_at_once_with_one_line(tmp_path, synthetic):
    code, out, err, run, _, _ = interrupted_and_resumed(tmp_path, synthetic, signal.SIGINT, twice=True)
    assert code == 130 and "aborted by a second Ctrl-C" in err and "Traceback" not in err, out + err
    assert len([line for line in err.splitlines() if line.strip()]) <= 2  # the first press's line, this one


# ------------------------------------------------------------------ 5. divergence


def test_a_diverging_run_never_writes_non_finite_values(tmp_path, synthetic):
    """SGD at lr 1e6: BatchNorm's running variance overflows while the loss may stay finite. The run stops
    with exit 3, saying which checkpoint holds the last good state; no checkpoint holds a NaN or an inf."""
    config = write_config(tmp_path, epochs=4, checkpoint_every_s=0.0)
    done = cli("fit", "--config", str(config), "--data", str(synthetic), "--out", str(tmp_path / "run"),
               "--set", "optimizer.name=sgd", "--set", "optimizer.lr=1e6")
    assert done.returncode == 3, done.stdout + done.stderr
    assert "holds a NaN or an infinity" in done.stdout or "the loss became" in done.stdout
    for name in ("last.pt", "best.pt"):
        path = tmp_path / "run" / name
        if path.exists():
            state = checkpoint.load(path)["model"]
            assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point()), name
    last = tmp_path / "run" / "last.pt"
    assert (f"{last} keeps the last good checkpoint" in done.stdout) == last.exists()
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["stop_reason"] in ("non_finite_loss", "non_finite_weights")


# ------------------------------------------------------------------ 6. config values as written


def test_numbers_in_scientific_notation_are_numbers(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optimizer:\n  lr: 1e-3\n  weight_decay: 3E-4\ntraining:\n  checkpoint_every_s: 1e2\n")
    config = config_module.load(path, ["optimizer.momentum=5e-1"])
    assert (config.optimizer.lr, config.optimizer.weight_decay) == (0.001, 0.0003)
    assert config.training.checkpoint_every_s == 100.0 and config.optimizer.momentum == 0.5


def test_on_and_off_are_the_words_they_look_like(tmp_path):
    """YAML 1.1 would read `off` as false (and refuse it for a choice of words); YAML 1.2 reads a string."""
    path = tmp_path / "c.yaml"
    path.write_text("training:\n  feature_cache: off\n  progress: false\n")
    config = config_module.load(path, ["training.tensorboard=true"])
    assert config.training.feature_cache == "off" and config.training.progress is False
    assert config_module.load(None, ["training.feature_cache=on"]).training.feature_cache == "on"
    with pytest.raises(PlanktonioError, match=r"--set training.progress=yes: training.progress: expected true or "
                                              r"false, got 'yes'"):
        config_module.load(None, ["training.progress=yes"])


def test_a_bad_set_value_names_the_set_and_a_bad_file_value_its_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optimizer:\n  lr: -1\n")
    with pytest.raises(PlanktonioError, match=rf"{path}:2: optimizer.lr must be >= 0"):
        config_module.load(path)
    with pytest.raises(PlanktonioError, match=r"--set training.epochs=zero: training.epochs: expected an integer"):
        config_module.load(None, ["training.epochs=zero"])


def test_a_duplicated_key_is_an_error_naming_it_and_its_lines(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optimizer:\n  lr: 0.1\n  momentum: 0.9\n  lr: 0.01\n")
    with pytest.raises(PlanktonioError, match=r"duplicate key 'lr' at line 4 \(first given at line 2\)"):
        config_module.load(path)


def _spell(value: float, style: int) -> str:
    """A finite float as people write it: 0.001, 1.000000e-03, 1.000000E-03, 1.000e5 (no exponent sign), 1e-03."""
    return [repr(value), f"{value:e}", f"{value:E}", f"{value:.3e}".replace("e+", "e"), f"{value:g}"][style]


@settings(max_examples=200, deadline=None)
@given(value=st.floats(min_value=1e-12, max_value=1e6, allow_nan=False), style=st.integers(0, 4),
       via_set=st.booleans())
def test_any_spelling_of_a_number_reads_as_that_number(tmp_path_factory, value, style, via_set):
    text = _spell(value, style)
    if via_set:
        config = config_module.load(None, [f"optimizer.lr={text}"])
    else:
        path = tmp_path_factory.mktemp("spelling") / "c.yaml"
        path.write_text(f"optimizer:\n  lr: {text}\n")
        config = config_module.load(path)
    assert config.optimizer.lr == float(text)


# ------------------------------------------------------------------ 8. an --out that cannot be


@pytest.mark.parametrize("out", ["file/run", "/proc/planktonio-run"])
def test_an_out_that_cannot_be_a_folder_is_a_one_line_error(tmp_path, synthetic, out):
    (tmp_path / "file").write_text("x")
    target = tmp_path / out if not out.startswith("/") else Path(out)
    line = one_line_error(cli("fit", "--config", str(write_config(tmp_path)), "--data", str(synthetic),
                              "--out", str(target)))
    assert f"--out {target}: cannot be used as a run folder" in line and "choose another --out" in line

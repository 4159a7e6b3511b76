"""Signals from outside the process, as a scheduler, a terminal or a lost ssh session sends them
(train/signals.py): a checkpoint, exit 75, one line, and a resume that ends bitwise where the uninterrupted
run ends; a second Ctrl-C aborts at once. Each signal goes to the whole process group, DataLoader workers
included, as scancel and a terminal send it. The run is held at a known step while the signal arrives
(tests/fit_with_hooks.py HOLD_AT), so no test depends on how fast this machine is."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from train import writers
from train.loop import fit
from train.signals import EXIT_ABORTED, EXIT_INTERRUPTED

from .helpers import REPO, process_env, python, read_checkpoint, same_run, small_config, wait_for, weights, write_config

# tiny-cnn at 32 px on the synthetic set (64 training images: 8 steps of 8), 2 DataLoader workers in the
# process group too; 3 epochs.
SETTINGS = {"loader": {"batch_size": 8, "workers": 2}, "training": {"epochs": 3, "seed": 3},
            "augment": {"train": {"crop": "random_resized", "size": 32, "resize": 36, "hflip": 0.5},
                        "eval": {"crop": "center", "size": 32, "resize": 36}}}


@pytest.fixture(scope="module")
def signals_run(synthetic, tmp_path_factory):
    """The config of this module's runs, and its uninterrupted run."""
    root = tmp_path_factory.mktemp("signals")
    config = write_config(root / "tiny.yaml", **SETTINGS)
    whole = root / "whole"
    done = python("-m", "train", "fit", "--config", config, "--data", synthetic, "--out", whole)
    assert done.returncode == 0, done.stderr
    return config, whole


def interrupted(config, synthetic, run, sig, forever=False) -> subprocess.CompletedProcess:
    """A run held after epoch 1's second step until the signal, sent to its whole process group, arrives."""
    held = run.parent / f"{run.name}.held"
    env = process_env(HOLD_AT="1:2", HOLD_FILE=str(held), HOLD_UNTIL="forever" if forever else "signal")
    process = subprocess.Popen([sys.executable, "-m", "tests.fit_with_hooks", "fit", "--config", str(config),
                                "--data", str(synthetic), "--out", str(run)], cwd=REPO, env=env,
                               start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(held, process=process)
        os.killpg(process.pid, sig)  # the whole group, as a terminal or scancel does
        first = ""
        if forever:  # held still: the second press comes once the first one was seen (never two at once:
            # a signal pending twice is delivered once)
            while "stopping at the next check" not in first and process.poll() is None:
                first += process.stderr.readline()
            os.killpg(process.pid, sig)
        out, err = process.communicate(timeout=120)
        err = first + err
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_a_signal_to_the_process_group_checkpoints_and_the_run_resumes_exactly(signals_run, synthetic, tmp_path,
                                                                               sig):
    """SIGTERM: scancel, preemption, a time limit; SIGINT: Ctrl-C; SIGHUP: the terminal went away. Chosen:
    the DataLoader workers ignore it, the training process stops at the step boundary where it was held
    (one process honours the flag at every step), writes last.pt, says so in one line and exits 75; the
    resumed run ends bitwise as the uninterrupted one."""
    config, whole = signals_run
    run = tmp_path / "run"
    done = interrupted(config, synthetic, run, sig)
    assert done.returncode == EXIT_INTERRUPTED, done.stdout + done.stderr
    assert "Traceback" not in done.stderr and "KeyboardInterrupt" not in done.stderr
    assert "killed by signal" not in done.stderr
    assert f"stopping on {sig.name}" in done.stdout and "--resume" in done.stdout
    state = read_checkpoint(run / "last.pt")
    assert state["finished"] is None and (state["epoch"], state["batches_done"]) == (1, 2)
    assert weights(run).keys() == weights(whole).keys()
    resumed = python("-m", "train", "fit", "--config", config, "--data", synthetic, "--out", run, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert same_run(whole, run)


def test_a_second_ctrl_c_aborts_at_once_with_one_line(signals_run, synthetic, tmp_path):
    config, _ = signals_run
    done = interrupted(config, synthetic, tmp_path / "run", signal.SIGINT, forever=True)
    assert done.returncode == EXIT_ABORTED, done.stdout + done.stderr
    assert "aborted by a second Ctrl-C" in done.stderr and "Traceback" not in done.stderr
    assert len([line for line in done.stderr.splitlines() if line.strip()]) <= 2  # the first press's line, this one
    last = tmp_path / "run" / "last.pt"  # nothing written by the aborted stop (an earlier epoch's checkpoint aside)
    assert not last.exists() or read_checkpoint(last)["epoch"] < 2


def test_a_signal_while_the_learning_curves_are_drawn_leaves_a_finished_run(plankton, tmp_path, monkeypatch):
    """Finding 6: SIGTERM while the final plot was drawn killed the process (143), left a 0-byte temporary
    and no plot, and --resume then said the run had finished. The handler now covers the run to its last
    file: the plot completes, the run ends as finished (exit 0), and nothing half-written is left."""
    draw = writers.plot_curves

    def drawn_while_signalled(records, path, title):
        os.kill(os.getpid(), signal.SIGTERM)
        draw(records, path, title)
    monkeypatch.setattr(writers, "plot_curves", drawn_while_signalled)
    assert fit(small_config(training={"epochs": 1}), plankton, tmp_path / "run") == 0
    assert (tmp_path / "run" / "learning-curves.png").read_bytes()[:4] == b"\x89PNG"
    assert not list((tmp_path / "run").glob(".*.tmp")) and (tmp_path / "run" / "summary.json").exists()

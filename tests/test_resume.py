"""A run continued from last.pt ends where the uninterrupted run ends (bitwise on the CPU), from any step,
with any backend; a finished run continues when given more epochs; what would change the computation is
refused. (Stopping by real signals from outside, and under torchrun: test_signals.py, test_distributed.py.)"""

from __future__ import annotations

import json
import math

import pytest

from planktonio import PlanktonioError
from train import checkpoint_file
from train.loop import fit
from train.signals import EXIT_INTERRUPTED

from .helpers import (
    SMALL,
    learned,
    one_line_error,
    read_checkpoint,
    read_metrics,
    run_train,
    same_run,
    sigterm_after_step,
    small_config,
)


@pytest.fixture(scope="module")
def uninterrupted(plankton, tmp_path_factory):
    """The uninterrupted run of a config, made once per config in this module."""
    made = {}

    def run(config):
        key = json.dumps(config.to_dict(), sort_keys=True)
        if key not in made:
            made[key] = tmp_path_factory.mktemp("whole") / "run"
            assert fit(config, plankton, made[key]) == 0
        return made[key]
    return run


@pytest.mark.parametrize("backend, augment, step", [
    ("torchvision", "random", 13),    # every backend applies the shared plans: exact from any step
    ("dali-cpu", "random", 13),       # ... DALI too, random crops and flips included
    ("dali-cpu", "centre-crop", 13),
    ("dali-cpu", "random", 10),       # the flag raised in the epoch's last step: stops at the boundary
])
def test_interrupted_and_resumed_run_ends_like_an_uninterrupted_one(plankton, uninterrupted, tmp_path, monkeypatch,
                                                                    backend, augment, step):
    overrides = {"loader": {"backend": backend, "workers": 2 if backend == "dali-cpu" else 0},
                 "training": {"check_every": 2}}
    if augment == "centre-crop":
        overrides["augment"] = {"train": SMALL["augment"]["eval"], "eval": SMALL["augment"]["eval"]}
    config = small_config(**overrides)
    whole = uninterrupted(config)

    with monkeypatch.context() as patch:
        sigterm_after_step(patch, step=step)  # 10 steps per epoch, a check every 2
        assert fit(config, plankton, tmp_path / "split") == EXIT_INTERRUPTED
    state = read_checkpoint(tmp_path / "split" / "last.pt")
    if step == 13:  # epoch 1's third step: one process obeys at the next step boundary, not the next check
        assert (state["epoch"], state["batches_done"]) == (1, 3)
        assert len(read_metrics(tmp_path / "split")) == 1
        # The resumed epoch's images/s counts the time before the stop too, with its images.
        partial = state["ranks"][0]["partial"]
        assert partial["images"] == 3 * 16 and partial["seconds"] > 0
    else:  # seen after epoch 0's last step: epoch 0 completes (validated, logged), then the run stops
        assert (state["epoch"], state["batches_done"]) == (1, 0)
        assert [m["epoch"] for m in read_metrics(tmp_path / "split")] == [0]
    with pytest.raises(PlanktonioError, match="already holds a run"):
        fit(config, plankton, tmp_path / "split")
    assert fit(config, plankton, tmp_path / "split", resume=True) == 0
    assert same_run(whole, tmp_path / "split")  # bitwise, on the CPU with fixed seeds


def test_resume_with_more_epochs_continues_a_finished_run(run_copy, plankton, uninterrupted, capsys):
    """The finished run (2 epochs) asked to resume: nothing to do; given 4 epochs, it ends as a 4-epoch run."""
    assert fit(small_config(training={"epochs": 2}), plankton, run_copy, resume=True) == 0  # nothing left to do
    assert "already finished" in capsys.readouterr().out and len(read_metrics(run_copy)) == 2
    assert fit(small_config(training={"epochs": 4}), plankton, run_copy, resume=True) == 0
    whole = uninterrupted(small_config(training={"epochs": 4}))
    continued = read_checkpoint(run_copy / "last.pt")
    assert continued["finished"] == "max_epochs" and continued["epoch"] == 4
    assert same_run(whole, run_copy)
    # From the command line: the run's own config, one more epoch.
    code, out, err = run_train(["fit", "--out", run_copy, "--data", plankton, "--resume", "--set",
                                 "training.epochs=5"], capsys)
    assert code == 0, err
    assert "resuming" in out and "had finished: max_epochs" in out
    assert [m["epoch"] for m in read_metrics(run_copy)] == [0, 1, 2, 3, 4]
    # What changes the computation is still refused.
    with pytest.raises(PlanktonioError, match="differs from the run's in optimizer.lr"):
        fit(small_config(training={"epochs": 6}, optimizer={"lr": 0.01}), plankton, run_copy, resume=True)


def test_a_finished_cosine_run_is_extended_with_its_schedule_planned_over_the_new_length(plankton, tmp_path,
                                                                                       capsys):
    """Issue 33: `--resume --set training.epochs=N` was refused (exit 2) under the cosine schedule, which
    demo.yaml uses. The added epochs now follow the cosine schedule of an N-epoch run, as if the run had been
    planned for N epochs from the start (the epochs done keep the rates they had)."""
    cosine = {"optimizer": {"schedule": "cosine"}}
    run = tmp_path / "run"
    assert fit(small_config(training={"epochs": 2}, **cosine), plankton, run) == 0
    code, out, err = run_train(["fit", "--out", run, "--data", plankton, "--resume", "--set", "training.epochs=4"],
                               capsys)
    assert code == 0, err
    assert "cosine schedule is planned again over 4 epochs (was 2)" in out
    lr = SMALL["optimizer"]["lr"]
    planned = [lr * 0.5 * (1 + math.cos(math.pi * e / 2)) for e in (0, 1)] + \
        [lr * 0.5 * (1 + math.cos(math.pi * e / 4)) for e in (2, 3)]
    assert [m["lr"] for m in read_metrics(run)] == pytest.approx(planned)
    assert read_checkpoint(run / "last.pt")["finished"] == "max_epochs"


def test_a_torn_last_metrics_line_does_not_stop_a_resume(run_copy, plankton, capsys):
    with open(run_copy / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 2, "train_lo')  # a crash in the middle of writing epoch 2's line
    code, _, err = run_train(["fit", "--out", run_copy, "--data", plankton, "--set", "training.epochs=3",
                               "--resume"], capsys)
    assert code == 0, err
    assert [m["epoch"] for m in read_metrics(run_copy)] == [0, 1, 2]
    assert all("train_loss" in m for m in learned(run_copy))


def test_resume_with_a_mistyped_out_and_no_config_is_refused(tmp_path, plankton, capsys):
    code, _, err = run_train(["fit", "--data", plankton, "--out", tmp_path / "typo", "--resume"], capsys)
    line = one_line_error(code, err)
    assert "holds no run" in line and not (tmp_path / "typo" / "last.pt").exists()


def test_a_resume_on_another_number_of_processes_is_refused(run_copy, plankton):
    """last.pt holds each rank's random state and share of the epoch: it continues with as many ranks only."""
    state = checkpoint_file.load(run_copy / "last.pt")
    assert state["world_size"] == 1
    state["world_size"] = 2
    checkpoint_file.save_atomic(state, run_copy / "last.pt")
    with pytest.raises(PlanktonioError, match="trained by 2 process\\(es\\), this run has 1"):
        fit(small_config(training={"epochs": 3}), plankton, run_copy, resume=True)

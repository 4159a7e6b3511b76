"""Checkpoints (train/checkpoint_file.py, train/checkpointer.py): data never code, a checksum checked on load,
written on a time budget, best.pt kept with last.pt, never a non-finite value."""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
from pathlib import Path

import pytest
import torch

from planktonio import PlanktonioError
from train import checkpoint_file, checkpointer
from train.loop import fit
from train.model import build_model
from train.signals import EXIT_NON_FINITE

from .helpers import count_training_steps, one_line_error, read_checkpoint, run_train, small_config, write_config

# ------------------------------------------------------------------ a checkpoint runs no code


class Payload:
    """What an attacker pickles: unpickling it runs a command (here: creates a file)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("name", ["last.pt", "best.pt"])
def test_a_checkpoint_carrying_code_is_refused_and_the_code_never_runs(run_copy, plankton, tmp_path, capsys, name):
    marker = tmp_path / "pwned"
    state = torch.load(run_copy / name, weights_only=True)
    state["config"] = Payload(marker)  # a state that would run `touch` when unpickled
    torch.save(state, run_copy / name)
    resumed = run_train(["fit", "--out", run_copy, "--data", plankton, "--resume", "--set", "training.epochs=3"],
                         capsys)
    evaluated = run_train(["evaluate", "--run", run_copy, "--checkpoint", name.removesuffix(".pt")], capsys)
    as_weights = run_train(["fit", "--config", write_config(tmp_path / "c.yaml"), "--data", plankton, "--out",
                             tmp_path / "other", "--set", f"model.weights={run_copy / name}"], capsys)
    refusals = [one_line_error(code, err) for code, _, err in
                ((resumed, evaluated) if name == "last.pt" else (evaluated, as_weights))]
    assert all("posix.system" in line and "refused" in line for line in refusals), refusals
    assert "weights_only" not in " ".join(refusals)  # not torch's advice to load it unsafely
    assert not marker.exists()


def test_a_checkpoint_with_changed_bytes_is_refused(run_copy, plankton, capsys):
    """1 KiB changed in the middle of last.pt (inside a weight tensor's data): the checksum catches it."""
    last = run_copy / "last.pt"
    data = bytearray(last.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 1024] = bytes(b ^ 0x5A for b in data[middle:middle + 1024])
    last.write_bytes(bytes(data))
    code, _, err = run_train(["fit", "--out", run_copy, "--data", plankton, "--resume", "--set", "training.epochs=3"],
                              capsys)
    line = one_line_error(code, err)
    assert "last.pt" in line and ("checksum" in line or "cannot be read" in line) and "best weights" in line


def test_the_checksum_covers_every_value(tmp_path):
    state = {"model": {"w": torch.arange(6.0)}, "epoch": 3, "rng": [1, 2], "name": "x"}
    checkpoint_file.save_atomic(state, tmp_path / "c.pt")
    assert checkpoint_file.load(tmp_path / "c.pt")["epoch"] == 3
    for change in (lambda s: s["model"]["w"].__setitem__(2, 2.5), lambda s: s.update(epoch=4),
                   lambda s: s["rng"].append(3), lambda s: s.update(name="y")):
        raw = torch.load(tmp_path / "c.pt", weights_only=True)
        change(raw)
        torch.save(raw, tmp_path / "d.pt")
        with pytest.raises(PlanktonioError, match="does not match its checksum"):
            checkpoint_file.load(tmp_path / "d.pt")


def test_a_weights_file_that_is_text_or_a_pickle_is_a_one_line_error(tmp_path, plankton, capsys):
    text, plain = tmp_path / "text.pth", tmp_path / "plain.pth"
    text.write_text("not weights")
    plain.write_bytes(pickle.dumps({"w": [1.0, 2.0]}, protocol=4))
    config = write_config(tmp_path / "c.yaml")
    for path, reason in ((text, "not a file of tensors"), (plain, "not a file of tensors")):
        code, _, err = run_train(["fit", "--config", config, "--data", plankton, "--out", tmp_path / path.stem,
                                   "--set", f"model.weights={path}"], capsys)
        line = one_line_error(code, err)
        assert f"weights file {path}" in line and reason in line and "weights_only" not in line


def test_best_checkpoint_serves_as_weights_of_a_new_run(finished_run):
    model = build_model("tiny-cnn", 7, str(finished_run / "best.pt"), "all-but-head")
    best = read_checkpoint(finished_run / "best.pt")["model"]
    assert torch.equal(model.features[0].weight, best["features.0.weight"])
    assert model.classifier[1].out_features == 7


# ------------------------------------------------------------------ when they are written


def test_last_pt_keeps_the_keys_of_every_run_written_so_far(finished_run):
    """The Checkpointer's parts (each Stateful) write under the keys last.pt always had: runs written before
    resume, and resumed runs read by older tools, keep working."""
    state = read_checkpoint(finished_run / "last.pt")
    assert set(state) == {"model", "optimizer", "scaler", "epoch", "batches_done", "early_stopping", "ranks",
                          "config", "classes", "world_size", "finished"}
    assert set(state["early_stopping"]) == {"best_loss", "best_epoch", "bad_epochs"}
    assert set(state["ranks"][0]) == {"rng", "partial"}


def test_the_settings_a_resume_may_change_are_those_marked_resumable():
    from train.config import TrainingConfig, resumable_keys
    marked = {f"training.{f.name}" for f in dataclasses.fields(TrainingConfig) if f.metadata["resumable"]}
    assert resumable_keys() == marked and {"training.epochs", "training.patience"} <= marked
    assert not {"training.seed", "training.precision", "optimizer.lr"} & resumable_keys()


def test_the_checkpoint_policy_follows_its_clock(monkeypatch):
    now = {"s": 100.0}
    monkeypatch.setattr(checkpointer, "clock", lambda: now["s"])
    policy = checkpointer.CheckpointPolicy(every_s=60)
    now["s"] = 159.0
    assert not policy.due()
    now["s"] = 160.0
    assert policy.due()
    policy.written()
    assert not policy.due()
    assert checkpointer.CheckpointPolicy(every_s=0).due()  # 0: every epoch


def test_checkpoints_follow_the_time_budget(plankton, tmp_path, monkeypatch):
    """A clock that moves 10 s a training step (100 s an epoch), a budget of 250 s: last.pt after
    epochs 2 and 5 (300 s after the previous checkpoint) and at the end; best.pt, kept in memory,
    written just before a last.pt whenever it changed."""
    now = {"s": 0.0}
    monkeypatch.setattr(checkpointer, "clock", lambda: now["s"])
    count_training_steps(monkeypatch, lambda n: now.update(s=10.0 * n))
    saved, save_atomic = [], checkpoint_file.save_atomic

    def recording(state, path):
        saved.append((path.name, state["epoch"]))  # last.pt: epochs done; best.pt: the best epoch
        save_atomic(state, path)
    monkeypatch.setattr(checkpoint_file, "save_atomic", recording)
    assert fit(small_config(training={"epochs": 7, "checkpoint_every_s": 250}), plankton, tmp_path / "run") == 0
    assert [epoch for name, epoch in saved if name == "last.pt"] == [3, 6, 7]
    assert all(saved[i + 1][0] == "last.pt" for i, (name, _) in enumerate(saved) if name == "best.pt")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert [epoch for name, epoch in saved if name == "best.pt"][-1] == summary["best_epoch"]
    assert read_checkpoint(tmp_path / "run" / "best.pt")["epoch"] == summary["best_epoch"]


def test_early_stopping_keeps_the_best_checkpoint(plankton, tmp_path):
    # lr 0 and frozen features (BatchNorm statistics too): the validation loss never
    # improves after the first epoch, so patience 2 stops after epoch 2.
    config = small_config(model={"freeze": "features"}, optimizer={"lr": 0.0}, training={"epochs": 10, "patience": 2})
    assert fit(config, plankton, tmp_path / "run") == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["stop_reason"] == "early_stopping" and summary["epochs_run"] == 3
    assert read_checkpoint(tmp_path / "run" / "best.pt")["epoch"] == summary["best_epoch"] == 0


# ------------------------------------------------------------------ never a non-finite value


@pytest.mark.parametrize("check_every, poisoned_step, stopped_after", [(1, 13, 13), (4, 13, 14), (4, 16, 18)])
def test_non_finite_loss_stops_within_n_steps_and_keeps_the_last_good_checkpoint(
        plankton, tmp_path, monkeypatch, check_every, poisoned_step, stopped_after):
    """The NaN of training step k is seen at the first check from k on: with check_every 4, epoch 1
    (steps 11-20) is checked after steps 14, 18 and 20 (its end). Only last.pt is written every epoch here:
    it is what the test is about."""
    from train import step
    original = step.F.cross_entropy

    def poison_from(n):  # from step `poisoned_step` on, every loss (and so every update) is NaN
        if n == poisoned_step - 1:
            monkeypatch.setattr(step.F, "cross_entropy", lambda *a, **k: original(*a, **k) * float("nan"))
    taken = count_training_steps(monkeypatch, poison_from)
    config = small_config(training={"check_every": check_every, "checkpoint_every_s": 0})
    assert fit(config, plankton, tmp_path / "run") == EXIT_NON_FINITE
    assert poisoned_step <= taken["steps"] <= poisoned_step + check_every - 1
    assert taken["steps"] == stopped_after
    state = read_checkpoint(tmp_path / "run" / "last.pt")
    assert (state["epoch"], state["batches_done"]) == (1, 0)  # the end of epoch 0: the last good state
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["stop_reason"] == "non_finite_loss"


def test_a_diverging_run_never_writes_non_finite_values(plankton, tmp_path, capsys):
    """SGD at lr 1e6: BatchNorm's running variance overflows while the loss may stay finite. The run stops
    with exit 3, saying which checkpoint holds the last good state; no checkpoint holds a NaN or an inf."""
    config = write_config(tmp_path / "c.yaml", training={"epochs": 4, "checkpoint_every_s": 0.0})
    code, out, err = run_train(["fit", "--config", config, "--data", plankton, "--out", tmp_path / "run",
                                 "--set", "optimizer.name=sgd", "--set", "optimizer.lr=1e6"], capsys)
    assert code == EXIT_NON_FINITE, out + err
    assert "holds a NaN or an infinity" in out or "the loss became" in out
    for name in ("last.pt", "best.pt"):
        path = tmp_path / "run" / name
        if path.exists():
            state = checkpoint_file.load(path)["model"]
            assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point()), name
    last = tmp_path / "run" / "last.pt"
    assert (f"{last} keeps the last good checkpoint" in out) == last.exists()
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["stop_reason"] in ("non_finite_loss", "non_finite_weights")

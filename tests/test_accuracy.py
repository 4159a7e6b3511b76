"""`profiling accuracy`: the statistics on known inputs, and a small sweep that resumes."""

from __future__ import annotations

import json
import math

import pytest

from planktonio import PlanktonioError
from profiling import accuracy, stats

TINY = {  # tiny-cnn at 48 px: a run of 3 epochs on the synthetic set takes seconds
    "model": {"name": "tiny-cnn"},
    "loader": {"batch_size": 16, "workers": 1},
    "optimizer": {"name": "adamw", "lr": 0.003},
    "training": {"epochs": 2, "patience": 5},
    "augment": {"train": {"crop": "random_resized", "size": 48, "resize": 56, "hflip": 0.5},
                "eval": {"crop": "center", "size": 48, "resize": 56}},
}


def test_paired_interval_and_verdict_on_known_inputs():
    mean, low, high = stats.paired_interval([1.0, 2.0, 3.0])  # sd 1, t(0.975, 2) = 4.303
    assert mean == 2.0 and low == pytest.approx(2 - 4.303 / math.sqrt(3)) and high == pytest.approx(2 + 4.303 / math.sqrt(3))
    assert stats.equivalence_verdict(low, high, 1.0) == "too few seeds to tell"
    assert stats.equivalence_verdict(low, high, 5.0) == "within 5 of the reference"
    _, low, high = stats.paired_interval([0.1, -0.1, 0.0, 0.05, -0.05])
    assert stats.equivalence_verdict(low, high, 1.0) == "within 1 of the reference"
    _, low, high = stats.paired_interval([3.0, 3.1, 2.9])
    assert stats.equivalence_verdict(low, high, 1.0) == "differs by more than 1"
    assert stats.paired_interval([0.5]) == (0.5, None, None)
    assert stats.equivalence_verdict(None, None, 1.0) == "too few seeds to tell"
    assert stats.mean_and_sd([2.0, 4.0, 6.0]) == (4.0, 2.0)


def test_default_arms_are_the_backends_and_precisions_this_machine_runs():
    import torch

    from planktonio.loaders import BACKENDS, reference_backend, runnable_backends
    cpu = torch.device("cpu")
    arms = accuracy.default_arms(cpu)
    backends = [b for b in runnable_backends(cpu) if BACKENDS[b].trains]  # not the upper bound
    assert "dali-cpu" in backends and "dali-gpu" not in backends and "memory" not in backends
    assert sorted(a.name for a in arms) == sorted(f"{b}-{p}" for p in ("fp32", "amp-bf16") for b in backends)
    # the reference of the comparison first: the registry's reference backend, as the study ran it
    assert arms[0].overrides == (f"loader.backend={reference_backend(cpu)}", "training.precision=fp32")


def test_a_bad_arm_fails_before_any_training(synthetic, tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(json.dumps(TINY))
    sweep = accuracy.Sweep(config, synthetic, tmp_path / "sweep",
                           [accuracy.Arm("ok", ()), accuracy.Arm("typo", ("training.epoch=3",))], seeds=1)
    with pytest.raises(PlanktonioError, match="arm typo: .*--set training.epoch=3: unknown key 'training.epoch'"):
        accuracy.run(sweep, {})
    assert not (tmp_path / "sweep" / "ok").exists()
    with pytest.raises(PlanktonioError, match="start with the arm's name"):
        accuracy.parse_arm(["loader.backend=dali-cpu"])


def test_the_report_records_the_whole_command(tmp_path, monkeypatch, capsys):
    """Issue 33: `profiling accuracy` recorded its command without its --arm, --seeds and --set (the
    process's arguments, not those main() was given). The training and its collection are stubbed: only what
    the report records is looked at."""
    from .helpers import run_profiling
    config = tmp_path / "tiny.yaml"
    config.write_text(json.dumps(TINY))
    monkeypatch.setattr(accuracy, "train_runs", lambda sweep, log: None)
    monkeypatch.setattr(accuracy, "collect", lambda sweep: {
        "kind": "accuracy", "reference": "a", "margin_pp": 1.0, "seeds": 2, "config": str(config), "data": "d",
        "overrides": ["training.epochs=1"], "arms": []})
    monkeypatch.setattr(accuracy, "plot", lambda result, path: None)
    code, _, err = run_profiling(["accuracy", "--config", config, "--data", tmp_path, "--out", tmp_path / "out",
                                  "--arm", "a", "loader.backend=torchvision", "--seeds", "2", "--set",
                                  "training.epochs=1"], capsys)
    assert code == 0, err
    command = json.loads((tmp_path / "out" / "accuracy.json").read_text())["environment"]["command"]
    assert command.endswith(f"-m profiling accuracy --config {config} --data {tmp_path} --out {tmp_path / 'out'} "
                            f"--arm a loader.backend=torchvision --seeds 2 --set training.epochs=1")


def test_a_sweep_reports_its_runs_and_resumes_without_redoing_them(synthetic, tmp_path, monkeypatch):
    config = tmp_path / "tiny.yaml"
    config.write_text(json.dumps(TINY))
    arms = [accuracy.Arm("torchvision", ("loader.backend=torchvision",)),
            accuracy.Arm("dali", ("loader.backend=dali-cpu",))]
    sweep = accuracy.Sweep(config, synthetic, tmp_path / "sweep", arms, seeds=2)

    # The sweep is stopped after its second run (as a time limit would) ...
    real_run, started = accuracy.subprocess.run, []

    def run_twice(command, **kwargs):
        if len(started) == 2:
            raise KeyboardInterrupt
        started.append(command)
        return real_run(command, **kwargs)
    monkeypatch.setattr(accuracy.subprocess, "run", run_twice)
    with pytest.raises(KeyboardInterrupt):
        accuracy.run(sweep, {})
    first_two = {arm.name: sweep.run_dir(arm, 0) / "summary.json" for arm in arms}
    stamps = {name: path.stat().st_mtime_ns for name, path in first_two.items()}

    # ... and the same command continues it: only the two seed-1 runs are trained now.
    started.clear()
    monkeypatch.setattr(accuracy.subprocess, "run", lambda command, **kw: (started.append(command), real_run(command, **kw))[1])
    report = accuracy.run(sweep, {"device": "cpu"})
    assert len(started) == 2 and all("training.seed=1" in command for command in started)
    assert {name: path.stat().st_mtime_ns for name, path in first_two.items()} == stamps

    result = json.loads((tmp_path / "sweep" / "accuracy.json").read_text())
    assert [row["arm"] for row in result["arms"]] == ["torchvision", "dali"]
    for row, arm in zip(result["arms"], arms):
        accs = []
        for seed in range(2):
            summary = json.loads((sweep.run_dir(arm, seed) / "summary.json").read_text())
            assert row["seeds"][seed]["acc"] == summary["test_of_best"]["acc"]
            accs.append(summary["test_of_best"]["acc"])
        assert row["acc"]["mean"] == pytest.approx(sum(accs) / 2)
    difference = result["arms"][1]["acc_difference_pp"]
    reference = result["arms"][0]["seeds"]
    assert difference["per_seed"] == pytest.approx([100 * (s["acc"] - r["acc"])
                                                    for s, r in zip(result["arms"][1]["seeds"], reference)])
    text = report.read_text()
    assert "| torchvision |" in text and "| dali |" in text and "reference" in text
    assert (tmp_path / "sweep" / "accuracy.png").read_bytes()[:4] == b"\x89PNG"

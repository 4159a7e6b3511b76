"""`python -m profiling suite`: everything in one command, within its time budget (here on a CPU, tiny)."""

from __future__ import annotations

import json
import subprocess
import sys

from .conftest import REPO


def suite(*args):
    return subprocess.run([sys.executable, "-m", "profiling", "suite", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=600)


def test_suite_runs_every_stage_within_its_budget_and_writes_the_report(synthetic, tmp_path):
    """One loader backend keeps it short (the loaders, AMP, two training runs: fp32 and AMP, a trace):
    it takes well under a minute; the budget is generous so that a busy machine does not time a stage
    out (each stage's share is a fraction of it), and the suite ends when its stages do."""
    out = tmp_path / "suite"
    result = suite("--data", str(synthetic), "--out", str(out), "--minutes", "5", "--backends", "dali-cpu")
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads((out / "suite.json").read_text())
    assert summary["seconds"] <= summary["budget_s"] == 300  # stages are stopped when they overrun
    status = {s["name"]: s["status"] for s in summary["stages"]}
    assert list(status) == ["doctor", "loaders", "amp", "train dali-cpu-fp32", "train dali-cpu-amp", "trace",
                            "inspect"]  # no GPU: no GPU tests
    assert all(status[name] == "ok" for name in list(status)[1:]), status
    assert status["doctor"] != "not run"  # ok, or failed: either way recorded, never fatal
    assert all((out / "logs" / f"{name.replace(' ', '-')}.log").is_file() for name in status)

    training = json.loads((out / "training.json").read_text())
    assert [(r["loader"], r["precision"]) for r in training["runs"]] == [("dali-cpu", "fp32"),
                                                                        ("dali-cpu", "amp-bf16")]
    assert all(r["epochs"] == 2 and r["images_per_s"] > 0 and 0 <= r["data_wait_fraction"] <= 1
               for r in training["runs"])
    assert training["config"]["model"] == "tiny-cnn"  # a CPU: the fast configuration made tiny
    amp = json.loads((out / "amp.json").read_text())
    assert amp["settings"]["cudnn_benchmark"] is True and amp["settings"]["tf32"] == "off"

    report = (out / "report" / "report.md").read_text()
    for heading in ("## What ran", "## Loader throughput", "## Mixed precision against FP32",
                    "## End-to-end training", "## Trace"):
        assert heading in report
    assert "| dali-cpu | amp-bf16 |" in report and "TF32 off" in report
    assert (out / "report" / "training-3.png").read_bytes()[:4] == b"\x89PNG"


def test_a_budget_too_small_for_anything_is_a_clear_error(synthetic, tmp_path):
    result = suite("--data", str(synthetic), "--out", str(tmp_path / "suite"), "--minutes", "0.2")
    assert result.returncode == 2
    assert "--minutes 0.2: too small for any measurement" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "suite").exists()

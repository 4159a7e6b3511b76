"""The run folder (train/run_folder.py, train/run_record.py): one writer at a time, an --out that cannot be
a folder refused in one line, and a run that never mixes data sets on resume or evaluation."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from planktonio import prepare
from planktonio.preparation import SplitPlan

from .conftest import write_coloured_set
from .helpers import REPO, one_line_error, process_env, run_train, wait_for, write_config


def test_a_second_fit_on_the_same_out_is_refused_until_the_first_dies(tmp_path, plankton, capsys):
    """The first fit is held in epoch 1 (tests/fit_with_hooks.py HOLD_AT), after last.pt was written: it
    cannot finish before the checks, however fast the machine."""
    run, held = tmp_path / "run", tmp_path / "held"
    config = write_config(tmp_path / "c.yaml", training={"epochs": 2, "checkpoint_every_s": 0.0})
    fit = ["fit", "--config", str(config), "--data", str(plankton), "--out", str(run)]
    first = subprocess.Popen([sys.executable, "-m", "tests.fit_with_hooks", *fit], cwd=REPO,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             env=process_env(HOLD_AT="1:1", HOLD_FILE=str(held), HOLD_UNTIL="forever"))
    try:
        wait_for(held, process=first)
        assert (run / "last.pt").exists(), "the first run wrote no checkpoint"
        code, _, err = run_train([*fit, "--resume"], capsys)
        line = one_line_error(code, err)
        assert f"another process is writing this run (train fit, pid {first.pid} on " in line
        code, _, err = run_train(["evaluate", "--run", run, "--checkpoint", "last"], capsys)
        assert one_line_error(code, err).count("pid") == 1
    finally:
        first.kill()  # SIGKILL: no clean-up of its own; the kernel drops the lock
        first.wait()
    code, out, err = run_train([*fit, "--resume", "--set", "training.epochs=1"], capsys)
    assert code == 0 and "resuming" in out, err


@pytest.mark.parametrize("out", ["file/run", "/proc/planktonio-run"])
def test_an_out_that_cannot_be_a_folder_is_a_one_line_error(tmp_path, plankton, capsys, out):
    (tmp_path / "file").write_text("x")
    target = tmp_path / out if not out.startswith("/") else Path(out)
    code, _, err = run_train(["fit", "--config", write_config(tmp_path / "c.yaml"), "--data", plankton,
                               "--out", target], capsys)
    line = one_line_error(code, err)
    assert f"--out {target}: cannot be used as a run folder" in line and "choose another --out" in line


def test_run_folder_errors_are_one_line(tmp_path, plankton, capsys):
    (tmp_path / "file").write_text("x")
    code, _, err = run_train(["fit", "--config", write_config(tmp_path / "c.yaml"), "--data", plankton,
                               "--out", tmp_path / "file"], capsys)
    assert "is a file, not a folder" in one_line_error(code, err)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("model: {name: tiny-cnn}\n")
    code, _, err = run_train(["evaluate", "--run", tmp_path / "run"], capsys)
    assert "run.json: cannot be read" in one_line_error(code, err)


def test_resume_and_evaluate_refuse_other_data(tmp_path, capsys):
    """Chosen: a run records a fingerprint of its data's class names and manifests (run.json);
    resuming on other data, or evaluating after prepare rewrote the run's folder, is refused."""
    source = tmp_path / "source"
    write_coloured_set(source, classes=2, per_class=12, size=16)
    data, other = tmp_path / "data", tmp_path / "other"
    prepare(source, data, plan=SplitPlan(per_class=(8, 2, 2)), seed=0, workers=1)
    prepare(source, other, plan=SplitPlan(per_class=(8, 2, 2)), seed=1, workers=1)
    config = write_config(tmp_path / "c.yaml", loader={"batch_size": 8},
                          augment={"train": {"crop": "center", "size": 16, "resize": 16},
                                   "eval": {"crop": "center", "size": 16, "resize": 16}})
    fit = ["fit", "--config", config, "--out", tmp_path / "run"]
    assert run_train([*fit, "--data", data, "--set", "training.epochs=1"], capsys)[0] == 0
    code, _, err = run_train([*fit, "--data", other, "--set", "training.epochs=2", "--resume"], capsys)
    line = one_line_error(code, err)
    assert "--resume:" in line and "is not the data" in line
    prepare(source, data, plan=SplitPlan(per_class=(8, 2, 2)), seed=1, workers=1)  # rewritten in place
    code, _, err = run_train(["evaluate", "--run", tmp_path / "run"], capsys)
    line = one_line_error(code, err)
    assert "evaluate:" in line and "was prepare rerun into it" in line
    assert run_train(["evaluate", "--run", tmp_path / "run", "--data", other, "--other-data"], capsys)[0] == 0

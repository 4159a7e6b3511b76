"""What many test modules share: the small training config, reading a run, running a program.

A program's error path is tested in-process (`run_main`: its `main(argv)`,
output read back), which costs no interpreter start; a subprocess
(`run_process`, `torchrun`) is kept for what only a process boundary shows:
signals, exit codes, torchrun, Slurm. A subprocess that outlives its time
limit is sent SIGABRT first, which makes Python's faulthandler print every
thread's stack (PYTHONFAULTHANDLER is set for it), so a hang in CI shows
where it hung; then it is killed with its process group.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

# tiny-cnn at 64 px on the `plankton` set (4 classes x 40/10/10): an epoch of 160 images takes about a second.
SMALL = {
    "model": {"name": "tiny-cnn"},
    "loader": {"backend": "torchvision", "batch_size": 16, "workers": 0},
    "optimizer": {"name": "adamw", "lr": 0.003},
    "training": {"epochs": 3, "patience": 10, "progress": False, "seed": 1},
    "augment": {"train": {"crop": "random_resized", "size": 64, "resize": 72, "scale": [0.4, 1.0], "hflip": 0.5},
                "eval": {"crop": "center", "size": 64, "resize": 72}},
}
# The timing fields of a metrics line: the only ones a resumed or otherwise equal run may change.
TIMING = ("images_per_s", "data_wait_fraction", "epoch_seconds", "gpu_busy_fraction")


def config_values(**sections) -> dict:
    """SMALL with some sections' keys replaced: config_values(training={"epochs": 2})."""
    values = json.loads(json.dumps(SMALL))
    for section, updates in sections.items():
        if section == "augment":
            values[section] = updates
        else:
            values[section].update(updates)
    return values


def small_config(**sections):
    from train import config as config_module
    return config_module.from_dict(config_values(**sections))


def write_config(path: Path, **sections) -> Path:
    """SMALL (with changes) as a config file, for a program's command line."""
    path.write_text(json.dumps(config_values(**sections)))
    return path


# ------------------------------------------------------------------ reading a run


def read_metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def learned(run: Path) -> list[dict]:
    """Each epoch's losses and accuracies without its timings: what must not change when a run is resumed."""
    return [{k: v for k, v in m.items() if k not in TIMING} for m in read_metrics(run)]


def weights(run: Path, name: str = "last.pt") -> dict:
    return read_checkpoint(run / name)["model"]


def read_checkpoint(path: Path) -> dict:
    """A checkpoint's content, read as the programs read it (tensors and plain values only, checksum checked)."""
    from train.checkpoint_file import load
    return load(path)


def loader(backend: str, prepared, split: str, **kwargs):
    """A CPU loader; worker-pool backends decode in this process (workers=0), DALI on 2 threads."""
    from planktonio import make_loader
    kwargs.setdefault("workers", 0)
    kwargs.setdefault("threads", 2)
    return make_loader(backend, prepared, split, device="cpu", **kwargs)


def same_weights(a: dict, b: dict) -> bool:
    """Bitwise equal state dicts."""
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def same_run(a: Path, b: Path) -> bool:
    """Two runs that end bitwise alike: last.pt's weights and every metrics line but the timings."""
    return same_weights(weights(a), weights(b)) and learned(a) == learned(b)


# ------------------------------------------------------------------ programs, in-process


def run_main(main, argv: list[str], capsys) -> tuple[int, str, str]:
    """A program's main(argv), in this process: (exit code, stdout, stderr). argparse's exit is a code too."""
    capsys.readouterr()
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(code: int, err: str) -> str:
    """The error of a command that must fail with exit 2 and a one-line message, no traceback."""
    assert code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("usage:")
             and not line.startswith(" ")]
    assert len(lines) == 1, err
    return lines[0]


def run_train(argv, capsys) -> tuple[int, str, str]:
    from train.__main__ import main
    return run_main(main, argv, capsys)


def run_planktonio(argv, capsys) -> tuple[int, str, str]:
    from planktonio.__main__ import main
    return run_main(main, argv, capsys)


def run_profiling(argv, capsys) -> tuple[int, str, str]:
    from profiling.__main__ import main
    return run_main(main, argv, capsys)


# ------------------------------------------------------------------ programs, as processes


def process_env(**extra: str) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1", **extra}


def descendants(pid: int) -> list[int]:
    """Every process under pid, children first (torchrun starts its ranks in sessions of their own, which a
    signal to its process group misses)."""
    children = [int(c) for c in subprocess.run(["pgrep", "-P", str(pid)], capture_output=True,
                                               text=True).stdout.split()]
    return [grandchild for child in children for grandchild in [child, *descendants(child)]]


def _signal_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def _stack_dump_and_kill(process: subprocess.Popen) -> str:
    """SIGABRT to the process and everything under it (faulthandler prints every thread's stack), then SIGKILL
    (to the tree as it was: a parent's death hands its children to init)."""
    tree = [*descendants(process.pid), process.pid]
    _signal_all(tree, signal.SIGABRT)
    time.sleep(2)
    _signal_all(tree, signal.SIGKILL)
    out, err = process.communicate()
    return (out or "") + (err or "")


def run_process(command: list[str], timeout: float = 300, env: dict | None = None,
                **popen) -> subprocess.CompletedProcess:
    """A command in its own process group, its output captured; past `timeout` the test fails with every
    thread's stack of the hung process."""
    process = subprocess.Popen([str(c) for c in command], cwd=REPO, env=env or process_env(), text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True, **popen)
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        dump = _stack_dump_and_kill(process)
        pytest.fail(f"{' '.join(map(str, command[:6]))} ... did not end within {timeout:.0f} s; its stacks:\n"
                    f"{dump[-6000:]}")
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


def python(*args, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python ARGS...` from the checkout, as a process."""
    return run_process([sys.executable, *args], timeout, env)


def torchrun(*args, ranks: int = 2, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node RANKS ARGS...` (gloo on the CPU)."""
    return run_process([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                        str(ranks), *args], timeout, process_env(**(env or {})))


def wait_for(path: Path, timeout: float = 120, process: subprocess.Popen | None = None) -> None:
    """Until `path` exists (or the process ended, or the time is up: then fail)."""
    deadline = time.time() + timeout
    while not path.exists() and time.time() < deadline and (process is None or process.poll() is None):
        time.sleep(0.02)
    assert path.exists(), f"{path} was not written within {timeout} s"


def count_training_steps(monkeypatch, after=None) -> dict:
    """Count the run's training steps; after(n) is called after step number n (from 1)."""
    from train import loop
    taken = {"steps": 0}
    original = loop.train_step

    def train_step(*args, **kwargs):
        result = original(*args, **kwargs)
        taken["steps"] += 1
        if after is not None:
            after(taken["steps"])
        return result
    monkeypatch.setattr(loop, "train_step", train_step)
    return taken


def sigterm_after_step(monkeypatch, step: int) -> None:
    """Send this process a real SIGTERM right after its training step number `step`."""
    count_training_steps(monkeypatch, lambda n: n == step and os.kill(os.getpid(), signal.SIGTERM))

"""A stress test of one thing, run by hand (not by pytest): does a finished 2-rank gloo run always exit?

    python -m tests.stress_exit --runs 30 [--timeout 60] [--work DIR]

It prepares a small synthetic set once, then starts the same short 2-rank
`train fit` (mobilenet_v3_small, 2 epochs, gloo, under torchrun) `--runs`
times, one after another, and counts the runs whose torchrun exited within
`--timeout` seconds of starting. A run that has not exited by then is a hang:
its process tree is shown (with `py-spy dump` of every rank when py-spy is
installed), killed, and counted. The last line is the verdict:
"exited: 30 of 30". torch's process-group destructor can block while it
holds the GIL (pytorch/pytorch#56297): train/distributed.py's `session`
releases things in the order that avoids it, and this is how that was
checked (the counts are in the issue's note).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CONFIG = {  # the run of test_two_process_run_stopped_by_sigterm..., where the hang was first seen
    "model": {"name": "mobilenet_v3_small"},
    "loader": {"backend": "torchvision", "batch_size": 16, "workers": 0},
    "optimizer": {"name": "sgd", "lr": 0.01},
    "training": {"epochs": 2, "patience": 10, "progress": False, "seed": 1, "check_every": 2},
    "augment": {"train": {"crop": "random_resized", "size": 64, "resize": 72, "scale": [0.4, 1.0], "hflip": 0.5},
                "eval": {"crop": "center", "size": 64, "resize": 72}},
}


def prepare_data(work: Path) -> Path:
    from planktonio import prepare
    from planktonio.preparation import SplitPlan
    from planktonio.synth import synthesize
    prepared = work / "prepared"
    if not (prepared / "train.txt").exists():
        synthesize(work / "images", classes="copepod,chaetognath,diatom_chain,radiolarian", per_class=60, size=128)
        prepare(work / "images", prepared, plan=SplitPlan(per_class=(40, 10, 10)), workers=1)
    return prepared


def descendants(pid: int) -> list[int]:
    """Every process under pid (torchrun starts its ranks in sessions of their own: killpg misses them)."""
    children = [int(c) for c in subprocess.run(["pgrep", "-P", str(pid)], capture_output=True,
                                               text=True).stdout.split()]
    return [grandchild for child in children for grandchild in [child, *descendants(child)]]


def dump_stacks(root_pid: int) -> str:
    """py-spy's dump of every process under root_pid (the ranks), if py-spy is installed."""
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(py_spy).exists():
        return "(py-spy not installed: no stacks)"
    dumps = []
    for pid in map(str, descendants(root_pid)):
        done = subprocess.run([py_spy, "dump", "--native", "--pid", pid], capture_output=True, text=True, timeout=60)
        dumps.append(f"--- pid {pid}\n{done.stdout}{done.stderr}")
    return "\n".join(dumps)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.stress_exit", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds a run may take before it counts as hung")
    parser.add_argument("--work", type=Path, help="a folder for the data and the runs (default: a temporary one)")
    args = parser.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="stress-exit-"))
    work.mkdir(parents=True, exist_ok=True)
    data = prepare_data(work)
    config = work / "config.json"
    config.write_text(json.dumps(CONFIG))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    exited, seconds = 0, []
    for run in range(args.runs):
        out = work / f"run{run}"
        shutil.rmtree(out, ignore_errors=True)
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                   "-m", "train", "fit", "--config", str(config), "--data", str(data), "--out", str(out)]
        started = time.perf_counter()
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                   text=True, start_new_session=True)
        try:
            _, stderr = process.communicate(timeout=args.timeout)
            took = time.perf_counter() - started
            seconds.append(took)
            exited += 1
            finished = (out / "summary.json").exists()
            print(f"run {run}: exited {process.returncode} in {took:.1f} s"
                  f"{'' if finished and process.returncode == 0 else ' (did not finish: ' + stderr[-300:] + ')'}",
                  flush=True)
        except subprocess.TimeoutExpired:
            finished = (out / "summary.json").exists()
            print(f"run {run}: HUNG after {args.timeout:.0f} s (summary.json {'written' if finished else 'absent'})",
                  flush=True)
            print(dump_stacks(process.pid), flush=True)
            for pid in [process.pid, *descendants(process.pid)]:
                os.kill(pid, signal.SIGKILL)
            process.communicate()
    mean = sum(seconds) / len(seconds) if seconds else float("nan")
    print(f"exited: {exited} of {args.runs} within {args.timeout:.0f} s (mean {mean:.1f} s a run); work in {work}")
    return 0 if exited == args.runs else 1


if __name__ == "__main__":
    sys.exit(main())

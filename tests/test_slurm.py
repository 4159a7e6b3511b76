"""The Slurm job scripts, submitted with sbatch to a real one-node Slurm on localhost.

CPU mode: the node's "GPUs" are /dev/null device files, torch finds no CUDA,
and the jobs train tiny-cnn on a small synthetic set with DALI on the CPU.
Skipped, with the reason, where Slurm cannot run (not root, not installed).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

from .conftest import REPO
from .slurm_cluster import LocalSlurm, unavailable_reason

pytestmark = pytest.mark.skipif(unavailable_reason() is not None, reason=str(unavailable_reason()))

SUBMIT = str(REPO / "slurm" / "submit")
TINY = {
    "model": {"name": "tiny-cnn"},
    "loader": {"backend": "dali", "batch_size": 16, "workers": 1},
    "optimizer": {"name": "adamw", "lr": 0.003},
    "training": {"epochs": 2, "progress": False},
    "augment": {"train": {"crop": "random_resized", "size": 64, "resize": 72},
                "eval": {"crop": "center", "size": 64, "resize": 72}},
}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    slurm = LocalSlurm(tmp_path_factory.mktemp("slurm"))
    try:
        slurm.start()
    except Exception:
        slurm.stop()
        raise
    yield slurm
    slurm.stop()


@pytest.fixture(scope="module")
def site(tmp_path_factory, synthetic):
    """The site settings a job sees, as environment variables (they override slurm/site.env)."""
    root = tmp_path_factory.mktemp("site")
    config = root / "tiny.yaml"
    config.write_text(json.dumps(TINY))
    return {
        "PLANKTONIO_ACCOUNT": "plankton-test",
        "PLANKTONIO_PARTITION": "gpu",
        "PLANKTONIO_QOS": "gpu",
        "PLANKTONIO_MODULES": "",
        "PLANKTONIO_VENV": sys.prefix,
        "PLANKTONIO_DATA": str(synthetic),
        "PLANKTONIO_RUNS": str(root / "runs"),
        "PLANKTONIO_CONFIG": str(config),
        # The node's GPUs are /dev/null: let GPU jobs run on the CPU here.
        "PLANKTONIO_REQUIRE_GPU": "0",
    }


def submit(cluster, site, *args, env=None) -> str:
    result = cluster.run(SUBMIT, *args, env={**site, **(env or {})})
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().split(";")[0]


def finished(cluster, job_id, timeout=300) -> dict:
    state = cluster.wait(job_id, timeout)
    assert state["JobState"] == "COMPLETED", f"{state}\n{cluster.log_tail()}"
    return state


def job_log(site, job_id) -> str:
    return (Path(site["PLANKTONIO_RUNS"]) / f"slurm-{job_id}.out").read_text()


def read_metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_train_on_one_gpu(cluster, site):
    job = submit(cluster, site, "slurm/train-1gpu.sbatch")
    state = finished(cluster, job)
    assert state["Account"] == "plankton-test" and state["Partition"] == "gpu"
    assert "gres:gpu:1" in state.get("TresPerNode", "") or "gpu:1" in state.get("TresPerNode", "")
    run = Path(site["PLANKTONIO_RUNS"]) / job
    for name in ("config.yaml", "metrics.jsonl", "best.pt", "last.pt", "summary.json"):
        assert (run / name).is_file(), name
    assert [m["epoch"] for m in read_metrics(run)] == [0, 1]
    log = job_log(site, job)
    assert f"planktonio: job {job}" in log
    # the doctor's report heads the log, and its JSON sits in the run folder
    assert "doctor verdict: ok - no GPU visible" in log and log.index("doctor verdict") < log.index("epoch 0:")
    doctor = json.loads((run / f"doctor-{job}.json").read_text())
    assert doctor["ok"] and doctor["cpus"]["slurm"]["SLURM_JOB_ID"] == job


def test_a_gpu_job_that_sees_no_gpu_stops_with_the_doctors_reason(cluster, site):
    """Slurm gave the job a GPU, torch sees none: with PLANKTONIO_REQUIRE_GPU=1 (site.env's default) it stops."""
    job = submit(cluster, site, "slurm/train-1gpu.sbatch", env={"PLANKTONIO_REQUIRE_GPU": "1"})
    state = cluster.wait(job)
    assert state["JobState"] == "FAILED" and state["ExitCode"] == "1:0", state
    log = job_log(site, job)
    assert "doctor verdict: FAILED - a GPU is required (--require-gpu) but none is visible" in log
    assert f"job {job} stopped" in log
    assert not (Path(site["PLANKTONIO_RUNS"]) / job / "metrics.jsonl").exists()


@pytest.mark.parametrize("script", ["slurm/train-node.sbatch", "slurm/train-nodes.sbatch"])
def test_data_parallel_training(cluster, site, script):
    """One process per (fake) GPU through srun; on this one-node cluster, --nodes=1 and 2 tasks."""
    job = submit(cluster, site, "--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1", "--gres=gpu:2", script)
    finished(cluster, job)
    run = Path(site["PLANKTONIO_RUNS"]) / job
    assert "2 process(es)" in job_log(site, job) and "doctor verdict: ok" in job_log(site, job)
    metrics = read_metrics(run)
    # 64 training images, 32 a rank in 2 steps of 16; 16 validation images, each seen once.
    assert all(m["train_images"] == 64 and m["val_images"] == 16 for m in metrics)
    assert json.loads((run / "summary.json").read_text())["world_size"] == 2


@pytest.mark.parametrize("signal_name, loader", [
    ("USR1", []),  # what Slurm does at --signal=USR1@300: SIGUSR1 to the job's step processes
    # scancel's SIGTERM to every process of the step, DataLoader workers included
    ("TERM", ["--set", "loader.backend=torchvision", "--set", "loader.workers=2"]),
])
def test_signal_before_the_limit_checkpoints_and_the_requeued_job_resumes(cluster, site, signal_name, loader):
    job = submit(cluster, site, "slurm/train-1gpu.sbatch", "--set", "training.epochs=12", *loader)
    run = Path(site["PLANKTONIO_RUNS"]) / job
    deadline = time.time() + 120
    while not (run / "metrics.jsonl").exists() and time.time() < deadline:
        time.sleep(0.2)
    assert cluster.run("scancel", f"--signal={signal_name}", job).returncode == 0
    state = finished(cluster, job)
    assert state["Restarts"] == "1"
    log = job_log(site, job)
    assert f"stopping on SIG{signal_name}" in log and "requeueing job" in log and "resuming" in log
    assert "killed by signal" not in log
    assert [m["epoch"] for m in read_metrics(run)] == list(range(12))  # each epoch once
    assert json.loads((run / "summary.json").read_text())["epochs_run"] == 12


def test_resubmission_resumes_when_requeueing_is_off(cluster, site):
    env = {"RUN": "by-hand", "PLANKTONIO_REQUEUE": "0"}
    job = submit(cluster, site, "slurm/train-1gpu.sbatch", "--set", "training.epochs=12", env=env)
    run = Path(site["PLANKTONIO_RUNS"]) / "by-hand"
    deadline = time.time() + 120
    while not (run / "metrics.jsonl").exists() and time.time() < deadline:
        time.sleep(0.2)
    cluster.run("scancel", "--signal=USR1", job)
    state = cluster.wait(job)
    assert state["JobState"] == "FAILED" and state["ExitCode"] == "75:0"
    assert (run / "last.pt").is_file() and "resubmit with RUN=by-hand" in job_log(site, job)
    again = submit(cluster, site, "slurm/train-1gpu.sbatch", "--set", "training.epochs=12", env=env)
    finished(cluster, again)
    assert "resuming" in job_log(site, again)
    assert [m["epoch"] for m in read_metrics(run)] == list(range(12))


def test_benchmark_sweep_then_dependent_report(cluster, site):
    grid = {"SWEEP_LOADERS": "dali-cpu torchvision", "SWEEP_PRECISIONS": "fp32", "SWEEP_BATCHES": "8 16",
            "SWEEP_ARGS": "--model tiny-cnn --image-size 64 --steps 2 --warmup 1 --repeats 1 --workers 1"}
    result = cluster.run(str(REPO / "slurm" / "sweep"), env={**site, **grid})
    assert result.returncode == 0, result.stderr
    array, report = result.stdout.split()
    finished(cluster, report, timeout=600)
    run = Path(site["PLANKTONIO_RUNS"]) / array
    cells = set()
    for task in range(4):
        state = cluster.job_state(f"{array}_{task}")
        assert state["JobState"] == "COMPLETED", state
        data = json.loads((run / "sweep" / f"task-{task}.json").read_text())
        row = data["end_to_end"][0]
        cells.add((row["loader"], row["precision"], data["config"]["batch_size"]))
        # the report job started only after this task ended
        assert cluster.job_state(report)["StartTime"] >= state["EndTime"]
    assert cells == {(loader, "fp32", batch) for loader in ("dali-cpu", "torchvision") for batch in (8, 16)}
    text = (run / "report" / "report.md").read_text()
    assert text.count("## Mixed precision against FP32") == 4


def test_trace_job(cluster, site):
    job = submit(cluster, site, "slurm/trace.sbatch", "--active", "2")
    finished(cluster, job)
    run = Path(site["PLANKTONIO_RUNS"]) / job
    assert (run / "trace" / "trace-rank0.json.gz").is_file()
    inspected = json.loads((run / "inspect.json").read_text())
    assert inspected["result"]["steps"] == 2 and "verdict" in inspected["result"]

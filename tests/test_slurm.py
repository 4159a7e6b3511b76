"""The Slurm job scripts, submitted with sbatch to a real two-node Slurm on localhost.

CPU mode: the nodes' "GPUs" are /dev/null device files, torch finds no CUDA,
and the jobs train tiny-cnn on a small synthetic set with DALI on the CPU.
Skipped, with the reason, where Slurm cannot run (not root, not installed).

The jobs that need test hooks (a rank that kills or stops itself, a slow
step, where each rank was placed) run tests.fit_with_hooks instead of train,
through PLANKTONIO_TRAIN_MODULE; the job scripts are otherwise the same.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest

from .conftest import REPO
from .helpers import learned, read_metrics, wait_for
from .slurm_cluster import LocalSlurm, unavailable_reason

# The slow tier (`make test-slow`): real jobs on a real Slurm, each a few to tens of seconds of fixed waits.
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(unavailable_reason() is not None, reason=str(unavailable_reason()))]

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


HOOKED = {"PLANKTONIO_TRAIN_MODULE": "tests.fit_with_hooks"}
# Two nodes, one rank on each, and a checkpoint at every epoch's end: the shape of the lost-rank tests.
TWO_NODES = ("--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=1", "--gres=gpu:1")
EPOCHS4 = ("--set", "training.epochs=4", "--set", "training.checkpoint_every_s=0")


def job_processes(job_id: str) -> list[int]:
    """Processes still running for a job (any step): those whose environment names it."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            environ = (proc / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue
        if f"SLURM_JOB_ID={job_id}".encode() in environ and proc.name.isdigit() and int(proc.name) != os.getpid():
            pids.append(int(proc.name))
    return pids


def ended(cluster, job_id, timeout=300) -> dict:
    """The job's final state, once it left the queue and its processes are gone (a killed or stopped
    rank included: Slurm ends them, the tests do not)."""
    state = cluster.wait(job_id, timeout)
    deadline = time.time() + 30
    while job_processes(job_id) and time.time() < deadline:
        time.sleep(0.5)
    assert not job_processes(job_id), f"job {job_id} left processes behind: {job_processes(job_id)}"
    return state


def finished(cluster, job_id, timeout=300) -> dict:
    state = ended(cluster, job_id, timeout)
    log = Path(state.get("StdOut", "/nonexistent"))
    tail = "\n".join(log.read_text().splitlines()[-30:]) if log.is_file() else ""
    assert state["JobState"] == "COMPLETED", f"{state}\n{tail}\n{cluster.log_tail()}"
    return state


def job_log(site, job_id) -> str:
    return (Path(site["PLANKTONIO_RUNS"]) / f"slurm-{job_id}.out").read_text()


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
    state = ended(cluster, job)
    assert state["JobState"] == "FAILED" and state["ExitCode"] == "1:0", state
    log = job_log(site, job)
    assert "doctor verdict: FAILED - a GPU is required (--require-gpu) but none is visible" in log
    assert f"job {job} stopped" in log
    assert not (Path(site["PLANKTONIO_RUNS"]) / job / "metrics.jsonl").exists()


def placement(cluster, folder: Path, world: int, per_node: int) -> None:
    """Where each rank ran: Slurm's block distribution (ranks 0 to per_node - 1 on node1, the next on
    node2), a local rank counted on each node, which takes that node's GPU of the same index; every rank
    meets the others at the first node's address, whichever node it runs on (node2's is 127.0.0.2)."""
    placed = [json.loads((folder / f"rank{rank}.json").read_text()) for rank in range(world)]
    first = cluster.run("scontrol", "show", "node", "node1").stdout.split("NodeAddr=")[1].split()[0]
    for rank, p in enumerate(placed):
        assert (p["node"], p["local_rank"], p["world_size"]) == (f"node{rank // per_node + 1}", rank % per_node, world)
        assert p["gpus"] == [str(i) for i in range(per_node)] and p["device_index"] == p["local_rank"]
        assert p["master_addr"] == first == "127.0.0.1"


@pytest.mark.parametrize("script", ["slurm/train-node.sbatch", "slurm/train-nodes.sbatch"])
def test_data_parallel_training_on_one_node(cluster, site, tmp_path, script):
    """One process per (fake) GPU through srun: --nodes=1 and 2 tasks (two nodes: the next test)."""
    job = submit(cluster, site, "--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1", "--gres=gpu:2", script,
                 env={**HOOKED, "RANKS": str(tmp_path)})
    finished(cluster, job)
    run = Path(site["PLANKTONIO_RUNS"]) / job
    assert "2 process(es)" in job_log(site, job) and "doctor verdict: ok" in job_log(site, job)
    metrics = read_metrics(run)
    # 64 training images, 32 a rank in 2 steps of 16; 16 validation images, each seen once.
    assert all(m["train_images"] == 64 and m["val_images"] == 16 for m in metrics)
    assert json.loads((run / "summary.json").read_text())["world_size"] == 2
    placement(cluster, tmp_path, world=2, per_node=2)


@pytest.fixture(scope="module")
def two_node_run(cluster, site, tmp_path_factory) -> dict:
    """train-nodes.sbatch on two nodes, one rank each, uninterrupted: what every interrupted one must end like."""
    ranks = tmp_path_factory.mktemp("ranks")
    job = submit(cluster, site, *TWO_NODES, "slurm/train-nodes.sbatch", *EPOCHS4, env={**HOOKED, "RANKS": str(ranks)})
    finished(cluster, job)
    return {"job": job, "ranks": ranks, "metrics": learned(Path(site["PLANKTONIO_RUNS"]) / job)}


def test_data_parallel_training_on_two_nodes(cluster, site, two_node_run):
    run = Path(site["PLANKTONIO_RUNS"]) / two_node_run["job"]
    assert "2 process(es)" in job_log(site, two_node_run["job"])
    assert all(m["train_images"] == 64 and m["val_images"] == 16 for m in read_metrics(run))
    assert [m["epoch"] for m in two_node_run["metrics"]] == [0, 1, 2, 3]
    assert json.loads((run / "summary.json").read_text())["world_size"] == 2
    placement(cluster, two_node_run["ranks"], world=2, per_node=1)


def test_sigusr1_on_two_nodes_checkpoints_requeues_and_resumes_exactly(cluster, site, two_node_run):
    """What Slurm does at --signal=USR1@300: SIGUSR1 to every rank of the step, on both nodes."""
    # Slow steps (1 s) so that the signal, sent once epoch 0 is logged, arrives mid-run.
    job = submit(cluster, site, *TWO_NODES, "slurm/train-nodes.sbatch", *EPOCHS4,
                 env={**HOOKED, "STEP_SECONDS": "1"})
    run = Path(site["PLANKTONIO_RUNS"]) / job
    wait_for(run / "metrics.jsonl")
    assert cluster.run("scancel", "--signal=USR1", job).returncode == 0
    state = finished(cluster, job)
    assert state["Restarts"] == "1"
    log = job_log(site, job)
    assert log.count("stopping on SIGUSR1") == 1 and "requeueing job" in log and "resuming" in log
    assert learned(run) == two_node_run["metrics"]  # each epoch once, and the same numbers


def restart_lines(log: str) -> list[str]:
    return [line for line in log.splitlines() if line.startswith("planktonio: restart ")]


def test_a_killed_rank_costs_a_restart_from_last_pt_not_the_job(cluster, site, tmp_path, two_node_run):
    """Rank 1 (on node2) is SIGKILLed once, mid-epoch 2 (what the OOM killer or a lost GPU does)."""
    job = submit(cluster, site, *TWO_NODES, "slurm/train-nodes.sbatch", *EPOCHS4,
                 env={**HOOKED, "FAULT_SIGNAL": "KILL", "FAULT_RANK": "1", "FAULT_AT": "2:1",
                      "FAULT_ONCE": str(tmp_path / "killed")})
    state = finished(cluster, job)
    assert state["Restarts"] == "0"  # restarted within the allocation, not requeued
    log = job_log(site, job)
    assert restart_lines(log) == [
        "planktonio: restart 1 of 2: rank 1 on node2 left during a training step (the gradients' all-reduce) at "
        "epoch 2, step 1 (srun: Killed); resuming from last.pt at epoch 2, step 0"]
    # The surviving rank says so in one line, and exits with the code the script restarts on.
    assert "rank 0 on" in log and "srun: error: node1: task 0: Exited with exit code 76" in log
    assert "Traceback" not in log
    assert learned(Path(site["PLANKTONIO_RUNS"]) / job) == two_node_run["metrics"]


def test_a_hung_rank_is_found_by_the_collective_timeout_and_restarted(cluster, site, tmp_path, two_node_run):
    """Rank 1 SIGSTOPs itself once, mid-epoch 2 (a wedged GPU): alive, silent. With a 20 s collective
    timeout, rank 0 gives up on it after 20 s, srun ends the stopped rank 30 s after rank 0 left
    (--wait), and the step starts again."""
    timeout_s, srun_wait, margin = 20, 30, 30
    job = submit(cluster, site, *TWO_NODES, "slurm/train-nodes.sbatch", *EPOCHS4,
                 "--set", f"training.collective_timeout_s={timeout_s}",
                 env={**HOOKED, "FAULT_SIGNAL": "STOP", "FAULT_RANK": "1", "FAULT_AT": "2:1",
                      "FAULT_ONCE": str(tmp_path / "stopped")})
    wait_for(tmp_path / "stopped")
    stopped_at = float((tmp_path / "stopped").read_text())
    log = Path(site["PLANKTONIO_RUNS"]) / f"slurm-{job}.out"
    while not restart_lines(log.read_text()) and time.time() < stopped_at + timeout_s + srun_wait + margin:
        time.sleep(0.5)
    assert restart_lines(log.read_text()) == [
        "planktonio: restart 1 of 2: rank 1 on node2 stopped answering during a training step (the gradients' "
        "all-reduce) at epoch 2, step 1 (srun: Killed); resuming from last.pt at epoch 2, step 0"]
    finished(cluster, job)
    assert "Traceback" not in log.read_text()
    assert learned(Path(site["PLANKTONIO_RUNS"]) / job) == two_node_run["metrics"]


def test_a_failure_that_repeats_is_restarted_once_then_stops_with_the_reason(cluster, site):
    """Rank 1 dies at epoch 2, step 1 in every attempt: the restart gets no further than the checkpoint it
    resumed from, so the job stops instead of spending its allocation on the same failure."""
    job = submit(cluster, site, *TWO_NODES, "slurm/train-nodes.sbatch", *EPOCHS4,
                 env={**HOOKED, "FAULT_SIGNAL": "KILL", "FAULT_RANK": "1", "FAULT_AT": "2:1"})
    state = ended(cluster, job)
    assert state["JobState"] == "FAILED" and state["ExitCode"] == "137:0", state  # 128 + SIGKILL, as srun said
    log = job_log(site, job)
    assert len(restart_lines(log)) == 1
    stops = [line for line in log.splitlines() if line.startswith("planktonio: not restarting")]
    assert stops == ["planktonio: not restarting: rank 1 on node2 left during a training step (the gradients' "
                     "all-reduce) at epoch 2, step 1 (srun: Killed), again before getting past epoch 2, step 0, "
                     "where restart 1 resumed: a failure that repeats"]
    assert "Traceback" not in log


@pytest.mark.parametrize("fault, reason", [
    # 4 steps an epoch on one rank, a checkpoint at each epoch's end: the 5th step of each attempt is one
    # epoch further on, so every restart progresses, and the limit (1 here) stops it.
    ({"FAULT_AT_STEP": "5", "PLANKTONIO_MAX_RESTARTS": "1"},
     "planktonio: not restarting: rank 0 on node1 failed (srun: Killed) after 1 restart(s) "
     "(PLANKTONIO_MAX_RESTARTS); last.pt is at epoch 2, step 0: resubmit with RUN={job} to continue"),
    ({"FAULT_AT": "0:1"},
     "planktonio: not restarting: rank 0 on node1 failed (srun: Killed) before the first checkpoint: "
     "no last.pt to resume from"),
], ids=["limit", "before-the-first-checkpoint"])
def test_a_single_gpu_job_restarts_within_its_limit_and_not_without_a_checkpoint(cluster, site, fault, reason):
    job = submit(cluster, site, "slurm/train-1gpu.sbatch", *EPOCHS4,
                 env={**HOOKED, "FAULT_SIGNAL": "KILL", **fault})
    state = ended(cluster, job)
    assert state["JobState"] == "FAILED" and state["ExitCode"] == "137:0", state
    log = job_log(site, job)
    assert len(restart_lines(log)) == (1 if "PLANKTONIO_MAX_RESTARTS" in fault else 0)
    assert [line for line in log.splitlines() if line.startswith("planktonio: not restarting")] == \
        [reason.format(job=job)]


@pytest.mark.parametrize("signal_name, loader", [
    # (SIGUSR1, what Slurm does at --signal=USR1@300, is sent to a two-node job above.)
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
    state = ended(cluster, job)
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


def test_predict_as_a_job_array_writes_what_one_process_writes(cluster, site, finished_run, plankton, tmp_path,
                                                               capsys):
    """slurm/predict.sbatch as a two-task array over a folder of four samples: each task predicts its units;
    the merged table (samples.csv) and every unit equal what one process writes."""
    from .helpers import run_train
    source = plankton.parent / "images"
    one = tmp_path / "one"
    assert run_train(["predict", "--run", finished_run, "--images", source, "--out", one], capsys)[0] == 0
    out = tmp_path / "array"
    array = submit(cluster, site, "--array=0-1", "slurm/predict.sbatch", "--run", str(finished_run), "--images",
                   str(source), "--out", str(out))
    for task in (0, 1):
        finished(cluster, f"{array}_{task}")
    assert (out / "samples.csv").read_text() == (one / "samples.csv").read_text()
    units = sorted(p.name for p in (one / "units").iterdir())
    assert sorted(p.name for p in (out / "units").iterdir()) == units
    for name in units:
        if name.endswith(".json"):
            assert json.loads((out / "units" / name).read_text()) == json.loads((one / "units" / name).read_text())

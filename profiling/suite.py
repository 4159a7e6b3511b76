"""`python -m profiling suite`: every measurement of this project, as one command within a time budget.

The GPU test host is lent now and then, for minutes; when it is, one
command measures everything, in this order:
1. `planktonio doctor` (what this machine can run);
2. the GPU tests, `pytest -m gpu` (where there is a GPU);
3. the loader benchmark, every backend this machine runs, whole epochs;
4. the AMP compute benchmark (cudnn.benchmark on, TF32 off: a true FP32
   baseline, as on the study's V100);
5. end-to-end training of the fast configuration, two whole epochs per
   loader and precision, channels_last throughout (only the precision varies);
6. a trace of the same training, read back by `inspect`;
7. the report with its goal checks, OUT/report/report.md.

Each stage is a process of its own, so GPU memory is each benchmark's own
(nothing left behind by an earlier one), and a stage that overruns its share
of the budget is stopped (SIGTERM: a training run writes last.pt and exits;
then SIGKILL) and reported as timed out while the rest goes on. Shares follow
the weights in `plan`; time a stage leaves unused goes to the stages after
it. The work is sized for the machine (tiny on a CPU: tiny-cnn at 64 px) and
scaled down when the budget is below the nominal one.

Writes OUT/suite.json (each stage: command, status, seconds, log),
OUT/training.json (the end-to-end runs), the benchmarks' JSON, OUT/logs/,
OUT/train/<loader>-<precision>/ (the runs) and OUT/report/.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from planktonio import PreparedDataset
from planktonio.errors import PlanktonioError
from planktonio.loaders import resolve_backend, resolve_device, runnable_backends
from train import config as config_module

from .environment import describe_environment

REPO = Path(__file__).resolve().parents[1]
FAST_CONFIG = Path("train/configs/fast.yaml")  # relative to the checkout, as in the README
REPORT_RESERVE_S = 20.0  # the report, written by this process at the end
MIN_STAGE_S = 5.0        # less than this: a stage is skipped, not started
# The least time a measurement needs: a process that imports torch (5-15 s),
# builds its pipelines and measures something. A budget that cannot give the
# loader benchmark this much is too small for anything.
MIN_MEASUREMENT_S = {"cpu": 10.0, "cuda": 30.0}
NOMINAL_BUDGET_S = {"cpu": 240.0, "cuda": 540.0}  # the budget the sizes below are meant for


@dataclass(frozen=True)
class Sizes:
    """How much work each stage does on one kind of machine (at the nominal budget)."""

    loader_batch: int
    loader_repeats: int
    loader_warmup: int
    amp_args: tuple[str, ...]
    amp_steps: int
    amp_repeats: int
    training: tuple[str, ...]  # overrides of fast.yaml
    trace: tuple[str, ...]


ON_GPU = Sizes(
    loader_batch=256, loader_repeats=3, loader_warmup=10,
    # 12 combinations (freezing x precision x layout) of AlexNet at batch 256: about 400 steps.
    amp_args=("--model", "alexnet", "--batch-size", "256", "--image-size", "224", "--warmup", "3"),
    amp_steps=10, amp_repeats=3,
    training=(),
    trace=("--wait", "2", "--warmup", "3", "--active", "5"))
# A CPU: the same programs on tiny-cnn at 64 px, so the whole suite takes a minute or two.
TINY = ("model.name=tiny-cnn", "model.weights=null", "model.freeze=none", "loader.batch_size=16",
        "loader.eval_batch_size=32", "optimizer.lr=0.01", "augment.train.size=64", "augment.eval.resize=72",
        "augment.eval.size=64")
ON_CPU = Sizes(
    loader_batch=32, loader_repeats=2, loader_warmup=2,
    amp_args=("--model", "tiny-cnn", "--batch-size", "16", "--image-size", "64", "--warmup", "1",
              "--precisions", "fp32,amp-bf16"),
    amp_steps=3, amp_repeats=3,
    training=TINY,
    trace=("--wait", "1", "--warmup", "1", "--active", "3"))


@dataclass
class Suite:
    data: Path
    out: Path
    minutes: float = 9.0
    backends: tuple[str, ...] = ("auto",)
    device: str = "auto"


@dataclass
class Stage:
    name: str
    command: list[str]
    weight: float                     # its share of the budget, relative to the others
    result: str | None = None         # the JSON it writes for the report (relative to OUT)
    needs: str | None = None          # a stage that must have succeeded first
    status: str = "not run"           # ok | failed (exit N) | timed out | skipped: why
    seconds: float = 0.0
    budget_s: float = 0.0
    log: str = ""


# ------------------------------------------------------------------ the plan


def _scaled(count: int, scale: float, least: int = 1) -> int:
    return max(least, round(count * scale))


def training_overrides(sizes: Sizes, config_file: Path) -> tuple[list[str], str | None]:
    """What every end-to-end run sets on top of fast.yaml, and a note when the weights are absent."""
    overrides = ["training.epochs=2", "training.progress=false", "training.channels_last=true",
                 "training.checkpoint_every_s=1000000", *sizes.training]  # (a checkpoint at the end only)
    note = None
    weights = config_module.load(REPO / config_file, overrides).model.weights
    if weights and not (Path(weights).is_file() or (REPO / weights).is_file()):
        overrides.append("model.weights=null")
        note = (f"{weights} is not on this machine: random initial weights (the same speed; the "
                f"accuracy means nothing)")
    return overrides, note


def _resolved(backend: str, device: torch.device) -> str:
    """A backend's registry name (an alias resolved), or the name as given where it is unknown."""
    try:
        return resolve_backend(backend, device)
    except PlanktonioError:
        return backend


def plan(suite: Suite, device: torch.device, scale: float) -> tuple[list[Stage], list[dict], dict]:
    """The stages in order, the end-to-end runs among them, and what those runs train."""
    py, out, data = sys.executable, suite.out, str(suite.data)
    sizes = ON_GPU if device.type == "cuda" else ON_CPU
    auto = suite.backends == ("auto",)
    named = [b for b in suite.backends if b != "memory"]
    # Aliases ("dali") name the backend this device would use.
    backends = runnable_backends(device) if auto else [_resolved(b, device) for b in named]
    unknown = sorted(set(backends) - set(runnable_backends(device)))
    if unknown or not backends:
        raise PlanktonioError(f"--backends {','.join(suite.backends)}: "
                              f"{', '.join(unknown) + ' unknown or not runnable here' if unknown else 'none given'}; "
                              f"this machine runs {', '.join(runnable_backends(device))} (or give auto)")
    # Weights: shares of the budget. Training, a whole epoch at a time for every loader and
    # precision, gets about half; each stage starts a process importing torch (5-15 s).
    stages = [Stage("doctor", [py, "-m", "planktonio", "doctor", "--json", str(out / "doctor.json")], 0.5)]
    if device.type == "cuda":
        stages.append(Stage("gpu-tests", [py, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
                                          "--junitxml", str(out / "gpu-tests.xml"), "tests"], 1.5))
    stages.append(Stage("loaders", [
        py, "-m", "profiling", "loaders", "--data", data, "--backends", ",".join(suite.backends),
        "--batch-size", str(sizes.loader_batch), "--epochs", "1", "--warmup", str(sizes.loader_warmup),
        "--repeats", str(_scaled(sizes.loader_repeats, scale)), "--json", str(out / "loaders.json")],
        1.5, result="loaders.json"))
    stages.append(Stage("amp", [
        py, "-m", "profiling", "amp", *sizes.amp_args, "--steps", str(_scaled(sizes.amp_steps, scale, 2)),
        "--repeats", str(_scaled(sizes.amp_repeats, scale)), "--tf32", "off", "--json", str(out / "amp.json")],
        1.2, result="amp.json"))
    overrides, note = training_overrides(sizes, FAST_CONFIG)
    runs = []
    for backend in backends:
        for precision in ("fp32", "amp"):
            name = f"{backend}-{precision}"
            run = out / "train" / name
            sets = [*overrides, f"loader.backend={backend}", f"training.precision={precision}"]
            stages.append(Stage(f"train {name}", [
                py, "-m", "train", "fit", "--config", str(FAST_CONFIG), "--data", data, "--out", str(run),
                *[arg for s in sets for arg in ("--set", s)]], 5.0 / (2 * len(backends))))
            runs.append({"stage": f"train {name}", "loader": backend, "precision": precision, "run": str(run)})
    training = {"file": str(FAST_CONFIG), "overrides": overrides, "note": note, "epochs": 2, "channels_last": True,
                "model": config_module.load(REPO / FAST_CONFIG, overrides).model.name}
    trace_sets = [*overrides, f"loader.backend={'dali' if auto else backends[0]}", "training.precision=amp"]
    stages.append(Stage("trace", [
        py, "-m", "profiling", "trace", "--config", str(FAST_CONFIG), "--data", data, "--out", str(out / "trace"),
        *sizes.trace, *[arg for s in trace_sets for arg in ("--set", s)]], 0.8))
    stages.append(Stage("inspect", [
        py, "-m", "profiling", "inspect", str(out / "trace" / "trace-rank0.json.gz"),
        "--json", str(out / "inspect.json")], 0.3, result="inspect.json", needs="trace"))
    return stages, runs, training


# ------------------------------------------------------------------ running it


def run_stage(stage: Stage, timeout: float, log: Path) -> None:
    """Run one stage's process (its own session, so its workers go with it) for at most `timeout` s."""
    grace = min(10.0, 0.2 * timeout)  # SIGTERM first: a training run checkpoints and stops
    stage.budget_s, stage.log = timeout, str(log)
    started = time.perf_counter()
    with open(log, "w") as f:
        process = subprocess.Popen(stage.command, cwd=REPO, stdout=f, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        try:
            code = process.wait(timeout=timeout - grace)
            stage.status = "ok" if code == 0 else f"failed (exit {code})"
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
            stage.status = f"timed out after {timeout - grace:.0f} s"
    stage.seconds = time.perf_counter() - started


def run(suite: Suite) -> Path:
    """Run the suite; returns the report's path."""
    started = time.perf_counter()
    budget = 60 * suite.minutes
    device = resolve_device(suite.device)
    PreparedDataset.load(suite.data)  # a bad --data is an error now, not in every stage
    # The stages run from the checkout: paths given relative to here must still point here.
    suite = dataclasses.replace(suite, data=Path(suite.data).resolve(), out=Path(suite.out).resolve())
    scale = min(1.0, budget / NOMINAL_BUDGET_S[device.type])
    stages, runs, training_config = plan(suite, device, scale)
    weight = sum(s.weight for s in stages) / next(s.weight for s in stages if s.name == "loaders")
    least = REPORT_RESERVE_S + MIN_MEASUREMENT_S[device.type] * weight
    if budget < least:
        raise PlanktonioError(
            f"--minutes {suite.minutes:g}: too small for any measurement on this machine ({device.type}): the "
            f"loader benchmark would get {(budget - REPORT_RESERVE_S) / weight:.0f} s of the "
            f"{MIN_MEASUREMENT_S[device.type]:.0f} it needs; give at least {least / 60:.1f}")
    out = suite.out
    (out / "logs").mkdir(parents=True, exist_ok=True)
    # What an earlier call left in OUT must not pass for this call's results.
    for r in runs:
        shutil.rmtree(r["run"], ignore_errors=True)
    shutil.rmtree(out / "trace", ignore_errors=True)
    for name in ("doctor.json", "gpu-tests.xml", "loaders.json", "amp.json", "training.json", "inspect.json"):
        (out / name).unlink(missing_ok=True)

    deadline = started + budget - REPORT_RESERVE_S
    by_name = {s.name: s for s in stages}
    for i, stage in enumerate(stages):
        left = deadline - time.perf_counter()
        share = left * stage.weight / sum(s.weight for s in stages[i:])
        if stage.needs and by_name[stage.needs].status != "ok":
            stage.status = f"skipped: {stage.needs} did not succeed"
        elif share < MIN_STAGE_S:
            stage.status = "skipped: no budget left"
        else:
            print(f"suite: {stage.name} (at most {share:.0f} s)", flush=True)
            run_stage(stage, share, out / "logs" / f"{stage.name.replace(' ', '-')}.log")
            print(f"suite: {stage.name}: {stage.status}, {stage.seconds:.0f} s", flush=True)

    environment = describe_environment()
    _write(out / "training.json", training_result(runs, by_name, environment, training_config))
    summary = {
        "kind": "suite", "environment": environment, "data": str(suite.data), "device": str(device),
        "budget_s": budget, "scale": scale, "stages": [asdict(s) for s in stages],
        "doctor_verdict": _doctor_verdict(by_name["doctor"]),
        "gpu_tests": _junit_summary(out / "gpu-tests.xml") if "gpu-tests" in by_name else None,
    }
    summary["seconds"] = time.perf_counter() - started  # (the report, written next, takes a few more)
    _write(out / "suite.json", summary)
    from .report import write_report
    results = [out / name for name in ("suite.json", "loaders.json", "amp.json", "training.json", "inspect.json")
               if (out / name).is_file()]  # (a stage that failed may have left no result)
    report = write_report(results, out / "report", f"planktonio suite: {environment['device']}")
    summary["seconds_with_report"] = time.perf_counter() - started
    _write(out / "suite.json", summary)
    return report


# ------------------------------------------------------------------ results


def training_result(runs: list[dict], stages: dict[str, Stage], environment: dict, config: dict) -> dict:
    """The end-to-end runs as one result: the second (last) epoch's speed, the first's for contrast."""
    rows = []
    for r in runs:
        run = Path(r["run"])
        metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()] \
            if (run / "metrics.jsonl").is_file() else []
        summary = json.loads((run / "summary.json").read_text()) if (run / "summary.json").is_file() else {}
        last = metrics[-1] if metrics else {}
        rows.append({
            "loader": summary.get("loader", r["loader"]), "precision": summary.get("precision", r["precision"]),
            "status": stages[r["stage"]].status, "run": str(run), "epochs": len(metrics),
            "images_per_s": last.get("images_per_s"),
            "first_epoch_images_per_s": metrics[0]["images_per_s"] if metrics else None,
            "data_wait_fraction": last.get("data_wait_fraction"),
            "gpu_busy_fraction": last.get("gpu_busy_fraction"),
            "val_acc": last.get("val_acc"),
            "peak_gpu_memory_mb": summary.get("peak_gpu_memory_mb"),
            "device_memory_mb": summary.get("device_memory_mb"),
        })
    return {"kind": "training", "environment": environment, "config": config, "runs": rows}


def _doctor_verdict(stage: Stage) -> str | None:
    log = Path(stage.log) if stage.log else None
    if log is None or not log.is_file():
        return None
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.startswith("doctor verdict:")]
    return lines[-1] if lines else None


def _junit_summary(path: Path) -> dict | None:
    """Counts from pytest's JUnit XML: tests, failures, errors, skipped."""
    if not path.is_file():
        return None
    try:
        suite = ElementTree.parse(path).getroot()
    except ElementTree.ParseError:
        return None
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    return {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}


def _write(path: Path, result: dict) -> None:
    path.write_text(json.dumps(result, indent=2) + "\n")

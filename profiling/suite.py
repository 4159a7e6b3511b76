"""`python -m profiling suite`: every measurement of this project, as one command within a time budget.

GPU time is often short (a reserved slot, an interactive job, a node
borrowed between jobs), so one command measures everything, in this order,
within `--minutes`: `planktonio doctor`; `profiling smoke` (every GPU path
tried once, so a broken piece names itself); the GPU tests (`pytest -m gpu`,
where there is a GPU); the loader benchmark over whole epochs; the AMP
compute benchmark (TF32 off: a true FP32 baseline, as on the study's V100);
end-to-end training of the fast configuration, every candidate loader with
AMP and the reference in FP32 (speed runs: no checkpoint but best.pt at the
end, no test pass); the study's own recipe for all of its 91 epochs with the
feature cache; `profiling predict`; a trace read back by `inspect`; and the
report with its goal checks, OUT/report/report.md.

Each stage is a process of its own, so GPU memory is each benchmark's own.
A stage gets a share of what is left of the budget in proportion to its
estimate (`Stage.estimate_s`); time a stage leaves unused goes to the stages
after it. A stage that overruns its share is stopped (SIGTERM, then SIGKILL)
and reported as timed out while the rest goes on; the benchmarks write each
row as they measure it, so a stopped stage keeps what it finished. The
report always runs.

Writes OUT/suite.json (each stage: command, status, seconds, log),
OUT/training.json (the end-to-end runs), the benchmarks' JSON, OUT/logs/,
OUT/train/<loader>-<precision>/ (the runs) and OUT/report/.
docs/measuring.md.
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
from planktonio.files import write_atomic
from planktonio.loaders import (
    BACKENDS,
    default_backend,
    in_comparison_order,
    resolve_backend,
    resolve_device,
    runnable_backends,
)
from train import config as config_module

from .environment import describe_environment
from .settings import Suite

REPO = Path(__file__).resolve().parents[1]
FAST_CONFIG = Path("train/configs/fast.yaml")  # relative to the checkout, as in the README
STUDY_CONFIG = Path("train/configs/study.yaml")
STUDY_EPOCHS = 91        # the study's run: 91 epochs in 6,218 s on one V100 (README, "Training")
STUDY_SECONDS = 6218
REPORT_RESERVE_S = 20.0  # the report, written by this process at the end
MIN_STAGE_S = 5.0        # less than this: a stage is skipped, not started
DOCTOR_S = 30.0          # the doctor's time, whatever the budget
# The budget each plan is sized for: at it, every stage gets at least its estimate.
NOMINAL_BUDGET_S = {"cpu": 250.0, "cuda": 480.0}
RESULTS = ("suite.json", "doctor.json", "smoke.json", "loaders.json", "amp.json", "training.json", "predict.json",
           "inspect.json")
PREDICT_IMAGES = "predict-images.txt"  # the training split's images, as a list (what `train predict` reads)


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
    predict_repeats: int
    trace: tuple[str, ...]
    smoke: tuple[str, ...]
    study: tuple[str, ...]     # overrides of study.yaml
    estimates: dict            # stage kind -> expected seconds at the nominal budget


# A GPU node (H100 or H200 class, 16 cores) on the 17-class NDSB set at 255 px (prepare --min-images 1000
# --per-class 500,100,100: 8,500 training images, 33 batches of 256 an epoch). The estimates add up to
# 375 s of the 480 (the report takes 20 more): each stage's process imports torch and DALI (about 10 s)
# before it measures. Training: two epochs of 8,500 images at the goal's 16,000 images/s are about a second
# of steps; the rest is the process's start. Study: 91 epochs of 354 steps of 24 on the kept activations,
# about 1 ms a step. Predict: the 8,500 images three times per round (loader, model, predict).
ON_GPU = Sizes(
    loader_batch=256, loader_repeats=2, loader_warmup=10,
    # 12 combinations at most (freezing x precision x layout) of AlexNet at batch 256: about 300 steps.
    amp_args=("--model", "alexnet", "--batch-size", "256", "--image-size", "224", "--warmup", "3"),
    amp_steps=8, amp_repeats=3,
    training=(), predict_repeats=2,
    trace=("--wait", "2", "--warmup", "3", "--active", "5"),
    smoke=("--batch-size", "64"),
    study=(f"training.epochs={STUDY_EPOCHS}", f"training.patience={STUDY_EPOCHS}"),
    estimates={"doctor": 10, "smoke": 25, "gpu-tests": 40, "loaders": 60, "amp": 45, "train": 20,
               "study": 45, "predict": 20, "trace": 20, "inspect": 10})
# A CPU: the same programs on tiny-cnn at 64 px, so the whole suite takes a minute or two.
TINY = ("model.name=tiny-cnn", "model.weights=null", "model.freeze=none", "loader.batch_size=16",
        "loader.eval_batch_size=32", "optimizer.lr=0.01", "augment.train.size=64", "augment.eval.resize=72",
        "augment.eval.size=64")
ON_CPU = Sizes(
    loader_batch=32, loader_repeats=2, loader_warmup=2,
    amp_args=("--model", "tiny-cnn", "--batch-size", "16", "--image-size", "64", "--warmup", "1",
              "--precisions", "fp32,amp-bf16"),
    amp_steps=3, amp_repeats=3,
    training=TINY, predict_repeats=2,
    trace=("--wait", "1", "--warmup", "1", "--active", "3"),
    smoke=("--batch-size", "16", "--model", "tiny-cnn", "--image-size", "64"),
    # the recipe in small: tiny-cnn at 64 px, its features frozen, 10 epochs
    study=("training.epochs=10", "training.patience=10", *TINY[:2], "model.freeze=all-but-head", *TINY[3:],
           "augment.train.resize=72"),
    estimates={"doctor": 8, "smoke": 25, "loaders": 30, "amp": 20, "train": 25, "study": 20, "predict": 15,
               "trace": 20, "inspect": 8})


@dataclass
class Stage:
    name: str
    command: list[str]
    estimate_s: float                 # expected seconds at the nominal budget: its share of the budget
    result: str | None = None         # the JSON it writes for the report (relative to OUT)
    needs: str | None = None          # a stage that must have succeeded first
    status: str = "not run"           # ok | failed (exit N) | timed out | skipped: why
    least_s: float = 0.0              # the time it is given however small the budget (the doctor's check)
    seconds: float = 0.0
    budget_s: float = 0.0
    log: str = ""


# ------------------------------------------------------------------ the plan


def _scaled(count: int, scale: float, least: int = 1) -> int:
    return max(least, round(count * scale))


def training_overrides(sizes: Sizes, config_file: Path, extra: tuple[str, ...] | None = None) \
        -> tuple[list[str], str | None]:
    """What every end-to-end run sets on top of its config, and a note when the weights are absent."""
    if extra is None:
        extra = ("training.epochs=2", "training.channels_last=true", *sizes.training)
    overrides = ["training.progress=false", "training.speed_run=true", *extra]
    note = None
    weights = config_module.load(REPO / config_file, overrides).model.weights
    if weights and not (Path(weights).is_file() or (REPO / weights).is_file()):
        overrides.append("model.weights=null")
        note = (f"{weights} is not on this machine: random initial weights (the same speed; the "
                f"accuracy means nothing)")
    return overrides, note


def training_runs(backends: list[str]) -> list[tuple[str, str]]:
    """(backend, precision) of the end-to-end runs: each candidate with AMP, the reference in FP32 (as the
    study ran it); without the reference among `backends`, their first baseline."""
    runs = [(name, "amp") for name in backends if BACKENDS[name].role == "candidate" and BACKENDS[name].trains]
    references = in_comparison_order(name for name in backends if BACKENDS[name].role in ("reference", "baseline"))
    return runs + [(references[0], "fp32")] if references else runs


def chosen_backends(suite: Suite, device: torch.device) -> list[str]:
    if suite.backends == ("auto",):
        return runnable_backends(device)
    backends = []
    for name in suite.backends:
        try:
            backends.append(resolve_backend(name, device))
        except PlanktonioError as error:
            raise PlanktonioError(f"--backends {','.join(suite.backends)}: {error} (or give auto)") from None
    return backends


def plan(suite: Suite, device: torch.device, scale: float) -> tuple[list[Stage], list[dict], dict]:
    """The stages in order, the end-to-end runs among them, and what those runs train."""
    py, out, data = sys.executable, Path(suite.out), str(suite.data)
    sizes = ON_GPU if device.type == "cuda" else ON_CPU
    estimate = sizes.estimates
    backends = chosen_backends(suite, device)
    # The doctor is a check every result depends on, not a measurement: it gets the time it needs (a
    # few seconds; DOCTOR_S for a slow machine) however small the budget, and the measurements share the rest.
    stages = [Stage("doctor", [py, "-m", "planktonio", "doctor", "--json", str(out / "doctor.json")],
                    estimate["doctor"], least_s=DOCTOR_S)]
    stages.append(Stage("smoke", [py, "-m", "profiling", "smoke", "--data", data, *sizes.smoke,
                                  "--json", str(out / "smoke.json")], estimate["smoke"], result="smoke.json"))
    if device.type == "cuda":
        stages.append(Stage("gpu-tests", [py, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
                                          "--junitxml", str(out / "gpu-tests.xml"), "tests"], estimate["gpu-tests"]))
    stages.append(Stage("loaders", [
        py, "-m", "profiling", "loaders", "--data", data, "--backends", ",".join(backends),
        "--batch-size", str(sizes.loader_batch), "--epochs", "1", "--warmup", str(sizes.loader_warmup),
        "--repeats", str(_scaled(sizes.loader_repeats, scale)), "--json", str(out / "loaders.json")],
        estimate["loaders"], result="loaders.json"))
    stages.append(Stage("amp", [
        py, "-m", "profiling", "amp", *sizes.amp_args, "--steps", str(_scaled(sizes.amp_steps, scale, 2)),
        "--repeats", str(_scaled(sizes.amp_repeats, scale)), "--tf32", "off", "--json", str(out / "amp.json")],
        estimate["amp"], result="amp.json"))
    overrides, note = training_overrides(sizes, FAST_CONFIG)
    runs = end_to_end_runs(backends, out)
    stages += [Stage(r["stage"], [py, "-m", "train", "fit", "--config", str(FAST_CONFIG), "--data", data,
                                  "--out", r["run"], *_sets(overrides, f"loader.backend={r['loader']}",
                                                            f"training.precision={r['precision']}")],
                     estimate["train"]) for r in runs]
    training = {"file": str(FAST_CONFIG), "overrides": overrides, "note": note, "epochs": 2, "channels_last": True,
                "model": config_module.load(REPO / FAST_CONFIG, overrides).model.name}
    traced = backends[0] if suite.backends != ("auto",) else resolve_backend(default_backend(), device)
    study_sets, study_note = training_overrides(sizes, STUDY_CONFIG, (*sizes.study, f"loader.backend={traced}"))
    study_run = out / "train" / "study-cached"
    stages.append(Stage("study recipe", [
        py, "-m", "train", "fit", "--config", str(STUDY_CONFIG), "--data", data, "--out", str(study_run),
        *_sets(study_sets)], estimate["study"]))
    training["study"] = {"stage": "study recipe", "run": str(study_run), "file": str(STUDY_CONFIG),
                         "overrides": study_sets, "note": study_note}
    predicted = next((r for r in runs if r["loader"] == traced and r["precision"] == "amp"
                      and BACKENDS[traced].streams), None)
    if predicted is not None:  # the default backend's AMP run: its best.pt, predicting with the same backend
        stages.append(Stage("predict", [
            py, "-m", "profiling", "predict", "--run", predicted["run"], "--images", str(out / PREDICT_IMAGES),
            "--backends", traced, "--repeats", str(_scaled(sizes.predict_repeats, scale)),
            "--json", str(out / "predict.json")], estimate["predict"], result="predict.json",
            needs=predicted["stage"]))
    stages.append(Stage("trace", [
        py, "-m", "profiling", "trace", "--config", str(FAST_CONFIG), "--data", data, "--out", str(out / "trace"),
        *sizes.trace, *_sets(overrides, f"loader.backend={traced}", "training.precision=amp")], estimate["trace"]))
    stages.append(Stage("inspect", [
        py, "-m", "profiling", "inspect", str(out / "trace" / "trace-rank0.json.gz"),
        "--json", str(out / "inspect.json")], estimate["inspect"], result="inspect.json", needs="trace"))
    return stages, runs, training


def end_to_end_runs(backends: list[str], out: Path) -> list[dict]:
    """The end-to-end training runs: their stage, loader, its role, precision and run folder."""
    return [{"stage": f"train {backend}-{precision}", "loader": backend, "role": BACKENDS[backend].role,
             "precision": precision, "run": str(out / "train" / f"{backend}-{precision}")}
            for backend, precision in training_runs(backends)]


def _sets(overrides: list[str], *more: str) -> list[str]:
    """`--set KEY=VALUE` arguments for each override."""
    return [arg for s in (*overrides, *more) for arg in ("--set", s)]


# ------------------------------------------------------------------ running it


def run_stage(stage: Stage, timeout: float, log: Path) -> None:
    """Run one stage's process (its own session, so its workers go with it) for at most `timeout` s."""
    grace = min(10.0, 0.2 * timeout)  # SIGTERM first: a benchmark's rows so far are on disk already
    stage.log = str(log)
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


def run_stages(stages: list[Stage], deadline: float, runner, clock=time.perf_counter, logs: Path | None = None,
               say=print) -> None:
    """Each stage in turn, with its share of what is left before `deadline` (a `clock` time).

    A stage's share: the time left times its estimate over the estimates of
    the stages still to run; time a stage leaves unused goes to the later ones.
    runner(stage, share, log) runs it and sets its status and seconds.
    """
    by_name = {s.name: s for s in stages}
    for i, stage in enumerate(stages):
        left = deadline - clock()
        share = max(left * stage.estimate_s / sum(s.estimate_s for s in stages[i:]), stage.least_s)
        stage.budget_s = share
        if stage.needs and by_name[stage.needs].status != "ok":
            stage.status = f"skipped: {stage.needs} did not succeed"
        elif share < MIN_STAGE_S:
            stage.status = "skipped: no budget left"
        else:
            say(f"suite: {stage.name} (at most {share:.0f} s)")
            runner(stage, share, (logs or Path(".")) / f"{stage.name.replace(' ', '-')}.log")
            say(f"suite: {stage.name}: {stage.status}, {stage.seconds:.0f} s")


def check_budget(stages: list[Stage], budget: float, device: torch.device, minutes: float) -> None:
    """Refuse a budget that cannot give the loader benchmark a fifth of its estimate."""
    loaders = next(s for s in stages if s.name == "loaders")
    share = (budget - REPORT_RESERVE_S) * loaders.estimate_s / sum(s.estimate_s for s in stages)
    if share < loaders.estimate_s / 5:
        least = REPORT_RESERVE_S + sum(s.estimate_s for s in stages) / 5
        raise PlanktonioError(
            f"--minutes {minutes:g}: too small for any measurement on this machine ({device.type}): the loader "
            f"benchmark would get {share:.0f} s of the {loaders.estimate_s / 5:.0f} it needs at least; give at "
            f"least {least / 60:.1f}")


def run(suite: Suite) -> Path:
    """Run the suite; returns the report's path."""
    started = time.perf_counter()
    budget = 60 * suite.minutes
    device = resolve_device(suite.device)
    PreparedDataset.load(suite.data)  # a bad --data is an error now, not in every stage
    # The stages run from the checkout: paths given relative to here must still point here.
    suite = dataclasses.replace(suite, data=str(Path(suite.data).resolve()), out=str(Path(suite.out).resolve()))
    scale = min(1.0, budget / NOMINAL_BUDGET_S[device.type])
    stages, runs, training_config = plan(suite, device, scale)
    check_budget(stages, budget, device, suite.minutes)
    out = Path(suite.out)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    # What an earlier call left in OUT must not pass for this call's results.
    for r in [*runs, training_config["study"]]:
        shutil.rmtree(r["run"], ignore_errors=True)
    shutil.rmtree(out / "trace", ignore_errors=True)
    for name in (*RESULTS, "gpu-tests.xml"):
        (out / name).unlink(missing_ok=True)
    dataset = PreparedDataset.load(suite.data)
    write_atomic(out / PREDICT_IMAGES, "".join(f"{dataset.root / path}\n" for path, _ in dataset.entries("train")))

    run_stages(stages, started + budget - REPORT_RESERVE_S, run_stage, logs=out / "logs",
               say=lambda line: print(line, flush=True))
    by_name = {s.name: s for s in stages}
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
    results = [out / name for name in RESULTS if (out / name).is_file() and name != "doctor.json"]
    report = write_report(results, out / "report", f"planktonio suite: {environment['device']}")
    summary["seconds_with_report"] = time.perf_counter() - started
    _write(out / "suite.json", summary)
    return report


# ------------------------------------------------------------------ results


def run_outputs(run: Path) -> tuple[list[dict], dict]:
    """A training run's metrics.jsonl lines and summary.json, as far as the run got to write them."""
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()] \
        if (run / "metrics.jsonl").is_file() else []
    summary = json.loads((run / "summary.json").read_text()) if (run / "summary.json").is_file() else {}
    return metrics, summary


def training_result(runs: list[dict], stages: dict[str, Stage], environment: dict, config: dict) -> dict:
    """The end-to-end runs as one result: the second (last) epoch's speed, the first's for contrast."""
    rows = []
    for r in runs:
        run = Path(r["run"])
        metrics, summary = run_outputs(run)
        last = metrics[-1] if metrics else {}
        rows.append({
            "loader": summary.get("loader", r["loader"]), "role": r["role"],
            "precision": summary.get("precision", r["precision"]),
            "status": stages[r["stage"]].status, "run": str(run), "epochs": len(metrics),
            "images_per_s": last.get("images_per_s"),
            "first_epoch_images_per_s": metrics[0]["images_per_s"] if metrics else None,
            "data_wait_fraction": last.get("data_wait_fraction"),
            "gpu_busy_fraction": last.get("gpu_busy_fraction"),
            "val_acc": last.get("val_acc"),
            "peak_gpu_memory_mb": summary.get("peak_gpu_memory_mb"),
            "device_memory_mb": summary.get("device_memory_mb"),
        })
    return {"kind": "training", "environment": environment, "config": config, "runs": rows,
            "study": study_result(config["study"], stages)}


def study_result(study: dict, stages: dict[str, Stage]) -> dict:
    """The study's recipe end to end: the feature cache's pass and every epoch, against the study's time."""
    run = Path(study["run"])
    metrics, summary = run_outputs(run)
    cache = summary.get("feature_cache") or {}
    epochs_s = sum(m["epoch_seconds"] for m in metrics)
    return {"status": stages[study["stage"]].status, "run": str(run), "epochs": len(metrics),
            "feature_cache": cache, "pass_seconds": cache.get("seconds"), "epochs_seconds": epochs_s,
            "total_seconds": epochs_s + (cache.get("seconds") or 0.0), "process_seconds": stages[study["stage"]].seconds,
            "mean_images_per_s": summary.get("mean_images_per_s"), "val_acc": metrics[-1]["val_acc"] if metrics else None,
            "note": study.get("note"), "study_seconds": STUDY_SECONDS, "study_epochs": STUDY_EPOCHS}


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
    write_atomic(path, json.dumps(result, indent=2) + "\n")

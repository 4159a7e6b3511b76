"""`python -m profiling accuracy`: does a loader, a precision or a pretraining change the accuracy?

Trains one configuration once per arm and seed (an arm is a set of config
overrides: a loader backend, a precision, other weights...), each run an
ordinary `python -m train fit` run in OUT/<arm>/seed<k>/ (resumable, with its
own metrics.jsonl and summary.json, whose test accuracy of best.pt is read
back). Seed k sets training.seed, which fixes the initial head, the order of
the data and the augmentation plans, so arm A and arm B with the same seed
differ only in what the arm changes: their difference is a paired one.

Per arm it reports the mean and spread of test accuracy, top-5 and loss, and
the mean paired difference to the reference arm with a 95% t-interval over
the seeds; the verdict says whether the interval lies within +-margin
(percentage points) of the reference, outside it, or is too wide to tell.

An interrupted sweep continues where it stopped: finished runs are kept,
an interrupted one resumes from its last.pt. Every arm's config is checked
before anything trains. docs/measuring.md.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from planktonio.errors import PlanktonioError
from planktonio.files import atomic_file, write_atomic
from planktonio.loaders import BACKENDS, in_comparison_order, resolve_device, runnable_backends
from train import config as config_module

from .stats import equivalence_verdict, mean_and_sd, paired_interval

FINISHED = ("max_epochs", "early_stopping")
METRICS = ("acc", "top5", "loss")


@dataclass(frozen=True)
class Arm:
    name: str
    overrides: tuple[str, ...]


def parse_arm(words: list[str]) -> Arm:
    """`NAME KEY=VALUE ...` from the command line."""
    name, overrides = words[0], tuple(words[1:])
    if "=" in name or "/" in name or not name:
        raise PlanktonioError(f"--arm {' '.join(words)}: start with the arm's name (no '=' or '/'), "
                              f"then its overrides, e.g. --arm dali loader.backend=dali-cpu")
    return Arm(name, overrides)


def default_arms(device: torch.device) -> list[Arm]:
    """The loader backends a run may use on this machine, in fp32 and AMP; the first arm, the reference of the
    comparison, is the registry's reference backend (the study's own pipeline) in fp32."""
    amp = "amp-fp16" if device.type == "cuda" else "amp-bf16"
    backends = in_comparison_order(name for name in runnable_backends(device) if BACKENDS[name].trains)
    return [Arm(f"{backend}-{precision}", (f"loader.backend={backend}", f"training.precision={precision}"))
            for precision in ("fp32", amp) for backend in backends]


@dataclass
class Sweep:
    config: Path | None
    data: Path
    out: Path
    arms: list[Arm]
    seeds: int = 3
    reference: str | None = None   # default: the first arm
    margin: float = 1.0            # percentage points of test accuracy
    overrides: tuple[str, ...] = ()  # applied to every arm first

    def __post_init__(self):
        names = [arm.name for arm in self.arms]
        if not self.arms or len(set(names)) != len(names):
            raise PlanktonioError(f"arms need distinct names, got {names}")
        if self.seeds < 1:
            raise PlanktonioError(f"--seeds must be >= 1, not {self.seeds}")
        self.reference = self.reference or names[0]
        if self.reference not in names:
            raise PlanktonioError(f"--reference {self.reference}: no such arm; arms: {', '.join(names)}")

    def overrides_of(self, arm: Arm, seed: int) -> list[str]:
        # One feature cache for the sweep: arms and seeds that share a frozen prefix (its weights, the
        # transforms, the data) compute its activations once (train/feature_cache.py fingerprints them).
        return [*self.overrides, *arm.overrides, f"training.seed={seed}", "training.progress=false",
                f"training.feature_cache_dir={self.out / 'feature-cache'}"]

    def run_dir(self, arm: Arm, seed: int) -> Path:
        return self.out / arm.name / f"seed{seed}"

    def check(self) -> None:
        """Build every arm's config now: a bad key fails before any training."""
        for arm in self.arms:
            try:
                config_module.load(self.config, self.overrides_of(arm, 0))
            except PlanktonioError as error:
                raise PlanktonioError(f"arm {arm.name}: {error}") from None


def finished_summary(run: Path) -> dict | None:
    path = run / "summary.json"
    if not path.is_file():
        return None
    summary = json.loads(path.read_text())
    return summary if summary.get("stop_reason") in FINISHED else None


def train_runs(sweep: Sweep, log=print) -> None:
    """Every (arm, seed) run that has not finished yet, in seed-major order (early results cover every arm)."""
    for seed in range(sweep.seeds):
        for arm in sweep.arms:
            run = sweep.run_dir(arm, seed)
            if finished_summary(run) is not None:
                continue
            run.mkdir(parents=True, exist_ok=True)
            command = [sys.executable, "-m", "train", "fit", "--data", str(sweep.data), "--out", str(run), "--resume"]
            if sweep.config is not None:
                command += ["--config", str(sweep.config)]
            for assignment in sweep.overrides_of(arm, seed):
                command += ["--set", assignment]
            log(f"training {arm.name}, seed {seed} -> {run}")
            with open(run / "fit.log", "a") as output:
                status = subprocess.run(command, stdout=output, stderr=subprocess.STDOUT,
                                        cwd=Path(__file__).resolve().parents[1]).returncode
            if status != 0:
                raise PlanktonioError(f"run {run} ended with exit code {status} (see {run / 'fit.log'}); "
                                      f"rerun the same command to continue the sweep")


def collect(sweep: Sweep) -> dict:
    """Per arm: each seed's test scores, their mean and spread, the paired difference to the reference."""
    scores = {}
    for arm in sweep.arms:
        per_seed = []
        for seed in range(sweep.seeds):
            summary = finished_summary(sweep.run_dir(arm, seed))
            if summary is None or summary.get("test_of_best") is None:
                raise PlanktonioError(f"{sweep.run_dir(arm, seed)}: no finished run with a test score "
                                      f"(does the data have a test split?)")
            per_seed.append({"seed": seed, **{m: summary["test_of_best"][m] for m in METRICS},
                             "best_epoch": summary["best_epoch"], "epochs_run": summary["epochs_run"]})
        scores[arm.name] = per_seed
    reference = scores[sweep.reference]
    arms = []
    for arm in sweep.arms:
        per_seed = scores[arm.name]
        row = {"arm": arm.name, "overrides": list(arm.overrides), "seeds": per_seed}
        for metric in METRICS:
            mean, sd = mean_and_sd([s[metric] for s in per_seed])
            row[metric] = {"mean": mean, "sd": sd}
        if arm.name != sweep.reference:
            # Percentage points of test accuracy, arm minus reference, seed by seed.
            differences = [100 * (a["acc"] - r["acc"]) for a, r in zip(per_seed, reference)]
            mean, low, high = paired_interval(differences)
            row["acc_difference_pp"] = {"mean": mean, "low95": low, "high95": high, "per_seed": differences,
                                        "verdict": equivalence_verdict(low, high, sweep.margin)}
        arms.append(row)
    return {"kind": "accuracy", "reference": sweep.reference, "margin_pp": sweep.margin, "seeds": sweep.seeds,
            "config": str(sweep.config), "data": str(sweep.data), "overrides": list(sweep.overrides), "arms": arms}


def format_table(result: dict) -> list[str]:
    lines = [f"| arm | test accuracy % (mean +- sd) | top-5 % | loss | vs {result['reference']} (pp, 95% interval) "
             f"| verdict (margin {result['margin_pp']:g} pp) |",
             "| --- | ---: | ---: | ---: | ---: | --- |"]

    def spread(stat, scale=100.0, digits=1):
        sd = "" if stat["sd"] is None else f" +- {scale * stat['sd']:.{digits}f}"
        return f"{scale * stat['mean']:.{digits}f}{sd}"

    for row in result["arms"]:
        difference = row.get("acc_difference_pp")
        if difference is None:
            versus, verdict = "reference", "-"
        else:
            interval = "" if difference["low95"] is None else \
                f" [{difference['low95']:+.2f}, {difference['high95']:+.2f}]"
            versus, verdict = f"{difference['mean']:+.2f}{interval}", difference["verdict"]
        lines.append(f"| {row['arm']} | {spread(row['acc'])} | {spread(row['top5'])} | "
                     f"{spread(row['loss'], 1.0, 3)} | {versus} | {verdict} |")
    return lines


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = result["arms"]
    fig, ax = plt.subplots(figsize=(max(4, 1.3 * len(arms) + 2), 3.5))
    for i, row in enumerate(arms):
        accuracies = [100 * s["acc"] for s in row["seeds"]]
        ax.bar(i, 100 * row["acc"]["mean"], color="#4c72b0", alpha=0.5)
        ax.scatter([i] * len(accuracies), accuracies, color="#222222", s=12, zorder=3)
    ax.set_xticks(range(len(arms)), [row["arm"] for row in arms], rotation=20, ha="right")
    low = min(100 * s["acc"] for row in arms for s in row["seeds"])
    ax.set_ylim(max(0, low - 10), 100)
    ax.set_ylabel("test accuracy % (bar: mean, dots: seeds)")
    ax.set_title(f"test accuracy per arm, {result['seeds']} seed(s)", fontsize=10)
    fig.tight_layout()
    with atomic_file(path, "wb") as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)


def write_report(result: dict, out: Path, environment: dict) -> Path:
    write_atomic(out / "accuracy.json", json.dumps({**result, "environment": environment}, indent=2) + "\n")
    plot(result, out / "accuracy.png")
    lines = [f"# Accuracy by arm ({result['seeds']} seeds)", "",
             f"Config {result['config']}, data {result['data']}, overrides {result['overrides'] or 'none'}. "
             f"Test accuracy of each run's best.pt (lowest validation loss); differences are paired by seed "
             f"(same initial head, data order and augmentation plans).", "",
             *format_table(result), "", "![test accuracy per arm](accuracy.png)", "",
             "Arms: " + "; ".join(f"{row['arm']}: {' '.join(row['overrides']) or '(config as is)'}"
                                  for row in result["arms"]), "",
             "Measured with: " + "; ".join(f"{k} {environment[k]}" for k in
                                           ("device", "torch", "torchvision", "dali", "cpu_count", "date", "command")
                                           if environment.get(k) is not None), ""]
    report = out / "report.md"
    write_atomic(report, "\n".join(lines))
    return report


def run(sweep: Sweep, environment: dict, log=print) -> Path:
    sweep.check()
    sweep.out.mkdir(parents=True, exist_ok=True)
    train_runs(sweep, log)
    return write_report(collect(sweep), sweep.out, environment)


def arms_for(words: list[list[str]] | None, device: str = "auto") -> list[Arm]:
    return [parse_arm(w) for w in words] if words else default_arms(resolve_device(device))

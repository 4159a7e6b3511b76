"""`python -m train evaluate` and `python -m train calibrate`: a run's checkpoint on a split of its data.

evaluate writes RUN/eval-<split>.json (loss, accuracy, top-5, per-class
precision, recall, F1; and where the run has a calibration for this
checkpoint, the expected calibration error before and after its temperature
and the accuracy and coverage at its thresholds), RUN/confusion-<split>.csv
and RUN/confusion-<split>.png. calibrate fits the temperature and the
thresholds on the validation split (train/calibration.py) and writes
RUN/calibration.json (calibration-last.json for last.pt).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import torch

from planktonio.errors import PlanktonioError
from planktonio.files import atomic_file, write_atomic
from planktonio.loaders import resolve_device

from . import calibration, checkpoint_file, config as config_module, distributed, run_record
from .executor import Executor
from .metrics import confusion_matrix, per_class_scores
from .run_folder import lock_run


def _run_config(run: Path, backend: str | None):
    if not (run / "config.yaml").is_file():
        raise PlanktonioError(f"{run}: no config.yaml; is it a folder written by `python -m train fit`?")
    config = config_module.load(run / "config.yaml")
    if backend:
        config.loader.backend = backend
    return config


def _logits_of(run: Path, split: str, data: Path | None, which: str, backend: str | None, other_data: bool,
               action: str, then=None):
    """Run a checkpoint over a split (the model only: no optimizer, no training loader), holding the run folder
    (its one writer while the results are computed and written, not while `fit` runs: a folder that cannot
    be written is said before the work); then(ctx, state, stats, logits, labels, classes) inside."""
    config = _run_config(run, backend)
    if data is None:
        data = Path(run_record.read(run)["data"])
    if not other_data:
        run_record.check_same_data(run, data, action)
    state = checkpoint_file.load(run / f"{which}.pt")
    t = config.training
    with distributed.Session(resolve_device(t.device), t.collective_timeout_s) as ctx, \
            lock_run(run, ctx, f"train {action}"), Executor(config, data, ctx) as executor:
        if list(executor.dataset.classes) != state["classes"]:
            raise PlanktonioError(f"{data} has other classes than the run was trained on")
        executor.model.load_state_dict(state["model"])
        with executor.eval_loader(split) as loader:
            stats, logits, labels = executor.evaluate(loader, collect=True)
        return then(ctx, state, stats, logits, labels, list(executor.dataset.classes))


def evaluate_run(run: Path, split: str, data: Path | None = None, which: str = "best",
                 backend: str | None = None, other_data: bool = False) -> dict:
    """Score a checkpoint on a split of the run's own data (or, with other_data, of another prepared set)."""
    run = Path(run)

    def written(ctx, state, stats, logits, labels, classes) -> dict:
        confusion = confusion_matrix(logits.argmax(dim=1), labels, len(classes))
        result = {
            "split": split,
            "checkpoint": f"{which}.pt",
            "epoch": state["epoch"] if which == "best" else state["epoch"] - 1,  # last.pt: epochs completed
            **{k.removeprefix("split_"): v for k, v in stats.summary("split").items()},
            "per_class": {name: scores for name, scores in zip(classes, per_class_scores(confusion))},
        }
        if calibration.path_of(run, run / f"{which}.pt").is_file():
            try:
                fitted = calibration.read(run, classes, run / f"{which}.pt")
                result["calibration"] = calibration.scores(logits, labels, fitted["temperature"],
                                                           fitted["threshold_list"])
            except PlanktonioError as error:  # fitted for another checkpoint: said, not used
                result["calibration"] = {"not_used": str(error)}
        if ctx.is_main:
            write_atomic(run / f"eval-{split}.json", json.dumps(result, indent=2) + "\n")
            write_confusion_csv(confusion, classes, run / f"confusion-{split}.csv")
            plot_confusion(confusion, classes, run / f"confusion-{split}.png", f"{run.name}: {split}")
        return result
    return _logits_of(run, split, data, which, backend, other_data, "evaluate", written)


def calibrate_run(run: Path, which: str = "best", target: float = 0.9, backend: str | None = None) -> dict:
    """Fit the run's temperature and thresholds on its validation split; write RUN/calibration.json (calibration-last.json for last.pt)."""
    run = Path(run)
    if not 0 < target <= 1:
        raise PlanktonioError(f"--target {target}: a precision in (0, 1]")

    def written(ctx, state, stats, logits, labels, classes) -> dict:
        fitted = calibration.calibrate(logits, labels, classes, target)
        if ctx.is_main:
            calibration.write(run, fitted, run / f"{which}.pt")
        return fitted
    return _logits_of(run, "valid", None, which, backend, False, "calibrate", written)


def write_confusion_csv(confusion: torch.Tensor, classes: list[str], path: Path) -> None:
    with atomic_file(path, "w") as f:
        writer = csv.writer(f)
        writer.writerow(["true \\ predicted", *classes])
        for name, row in zip(classes, confusion.tolist()):
            writer.writerow([name, *row])


def plot_confusion(confusion: torch.Tensor, classes: list[str], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rates = confusion.double() / confusion.sum(dim=1, keepdim=True).clamp(min=1)
    size = 3 + 0.45 * len(classes)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(rates.numpy(), cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(classes)), classes, rotation=90)
    ax.set_yticks(range(len(classes)), classes)
    for i, row in enumerate(confusion.tolist()):
        for j, count in enumerate(row):
            if count:
                ax.text(j, i, count, ha="center", va="center", fontsize=7,
                        color="white" if rates[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.tight_layout()
    with atomic_file(path, "wb") as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)

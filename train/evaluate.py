"""`python -m train evaluate`: score a run's best checkpoint on a split, per class too.

Writes RUN/eval-<split>.json (loss, accuracy, top-5, per-class precision,
recall, F1), RUN/confusion-<split>.csv and RUN/confusion-<split>.png.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import torch

from planktonio.errors import PlanktonioError
from planktonio.files import atomic_file, write_atomic
from planktonio.loaders import resolve_device

from . import checkpoint, config as config_module, distributed, run_record
from .executor import Executor
from .metrics import confusion_matrix, per_class_scores
from .run_folder import lock_run


def evaluate_run(run: Path, split: str, data: Path | None = None, which: str = "best",
                 backend: str | None = None, other_data: bool = False) -> dict:
    """Score a checkpoint on a split of the run's own data (or, with other_data, of another prepared set)."""
    run = Path(run)
    if not (run / "config.yaml").is_file():
        raise PlanktonioError(f"{run}: no config.yaml; is it a folder written by `python -m train fit`?")
    config = config_module.load(run / "config.yaml")
    if backend:
        config.loader.backend = backend
    if data is None:
        data = Path(run_record.read(run)["data"])
    if not other_data:
        run_record.check_same_data(run, data, "evaluate")
    state = checkpoint.load(run / f"{which}.pt")
    t = config.training
    # The run folder first (its one writer while the scores are computed and written, not while `fit` runs;
    # a folder that cannot be written is said before the work), then the model only: no optimizer, no
    # training loader.
    with distributed.Session(resolve_device(t.device), t.collective_timeout_s) as ctx, \
            lock_run(run, ctx, "train evaluate"), Executor(config, data, ctx) as executor:
        if list(executor.dataset.classes) != state["classes"]:
            raise PlanktonioError(f"{data} has other classes than the run was trained on")
        executor.model.load_state_dict(state["model"])
        with executor.eval_loader(split) as loader:
            stats, predictions, labels = executor.evaluate(loader, collect=True)
        classes = list(executor.dataset.classes)
        confusion = confusion_matrix(predictions, labels, len(classes))
        result = {
            "split": split,
            "checkpoint": f"{which}.pt",
            "epoch": state["epoch"] if which == "best" else state["epoch"] - 1,  # last.pt: epochs completed
            **{k.removeprefix("split_"): v for k, v in stats.summary("split").items()},
            "per_class": {name: scores for name, scores in zip(classes, per_class_scores(confusion))},
        }
        if ctx.is_main:
            write_atomic(run / f"eval-{split}.json", json.dumps(result, indent=2) + "\n")
            write_confusion_csv(confusion, classes, run / f"confusion-{split}.csv")
            plot_confusion(confusion, classes, run / f"confusion-{split}.png", f"{run.name}: {split}")
    return result


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

"""Where an epoch's record goes: metrics.jsonl, a learning-curves plot, TensorBoard.

Rank 0 writes, after every epoch:
- `metrics.jsonl`: one JSON line per epoch (the record the loop makes), the
  file every other tool reads, appended a line at a time; a resumed run first
  drops the lines of the epochs its last.pt does not cover (rewriting the
  file atomically), then writes them again;
- `learning-curves.png`: loss and accuracy, training and validation, per
  epoch, redrawn from all lines so far on a thread of its own, at most once
  every 30 s and once more at the end: drawing holds the GIL for a few tenths
  of a second, longer than a cached epoch of a small model takes;
- TensorBoard event files in `tensorboard/` when `training.tensorboard` is on
  (`tensorboard --logdir RUN/tensorboard`).

The run folder's files: docs/training.md.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

from planktonio.errors import PlanktonioError
from planktonio.files import atomic_file, disk_error, write_atomic

CURVES = "learning-curves.png"


class MetricsLog:
    """metrics.jsonl: one line per epoch."""

    def __init__(self, path: Path):
        self.path = path

    def records(self) -> list[dict]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def keep_before(self, epoch: int) -> None:
        """Keep the lines of epochs before `epoch`: a resumed run writes the rest again.

        A last line cut short by a crash belongs to an epoch that last.pt does
        not cover, so it goes too; a bad line before it is an error.
        """
        if not self.path.exists():
            return
        lines = [line for line in self.path.read_text().split("\n") if line.strip()]
        kept = []
        for number, line in enumerate(lines, start=1):
            try:
                line_epoch = json.loads(line)["epoch"]
            except (json.JSONDecodeError, KeyError, TypeError):
                if number == len(lines):
                    break
                raise PlanktonioError(f"{self.path}:{number}: not a metrics record ({line[:60]!r}); remove the "
                                      f"line and resume again") from None
            if line_epoch < epoch:
                kept.append(line)
        write_atomic(self.path, "".join(line + "\n" for line in kept))

    def append(self, record: dict) -> None:
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as error:
            raise disk_error(self.path, error) from None


def plot_curves(records: list[dict], path: Path, title: str) -> None:
    """Loss and accuracy per epoch, training and validation, side by side."""
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib.figure import Figure  # no pyplot: safe off the main thread
    from matplotlib.ticker import MaxNLocator

    epochs = [r["epoch"] for r in records]
    figure = Figure(figsize=(9, 3.5))
    loss, accuracy = figure.subplots(1, 2)
    for axes, metric, label in ((loss, "loss", "loss"), (accuracy, "acc", "top-1 accuracy")):
        axes.plot(epochs, [r[f"train_{metric}"] for r in records], marker="o", markersize=3, label="training")
        axes.plot(epochs, [r[f"val_{metric}"] for r in records], marker="o", markersize=3, label="validation")
        axes.set_xlabel("epoch")
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
        axes.set_ylabel(label)
        axes.grid(alpha=0.3)
    accuracy.set_ylim(0, 1)
    loss.legend(fontsize=8)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    with atomic_file(path, "wb") as f:
        figure.savefig(f, format="png", dpi=90)


class CurvesPlot:
    """Redraws learning-curves.png from the latest records, on a background thread, at most once every
    `every_s` seconds (the first time `every_s` after the run starts); close() draws the last records
    at once and waits for it, so the file ends complete. A run shorter than `every_s` draws only then.
    """

    every_s = 30.0

    def __init__(self, path: Path, title: str):
        self.path, self.title = path, title
        self._pending: list[dict] | None = None
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None  # set while a thread draws or waits to
        self._closing = threading.Event()              # ends the wait between drawings
        self._next_draw = time.monotonic() + self.every_s
        self.error: Exception | None = None

    def update(self, records: list[dict]) -> None:
        with self._lock:
            self._pending = list(records)
            if self._thread is None:
                self._thread = threading.Thread(target=self._draw_pending, name="learning-curves", daemon=True)
                self._thread.start()

    def _draw_pending(self) -> None:
        while True:
            self._closing.wait(max(0.0, self._next_draw - time.monotonic()))
            with self._lock:
                records, self._pending = self._pending, None
                if records is None:
                    self._thread = None  # under the lock: the next update() starts a new thread
                    return
            try:
                plot_curves(records, self.path, self.title)
            except Exception as error:  # a plot must never stop a run; the run reports it after close()
                self.error = error
            self._next_draw = time.monotonic() + self.every_s

    def close(self) -> None:
        self._closing.set()
        with self._lock:
            thread = self._thread
        if thread is not None:
            thread.join()


class TensorBoard:
    """Each record's numbers as TensorBoard scalars, step = epoch (a resumed run replaces later events)."""

    def __init__(self, folder: Path, first_epoch: int):
        from torch.utils.tensorboard import SummaryWriter
        # purge_step: events of epochs from first_epoch on, written before a resume, are dropped
        self.writer = SummaryWriter(log_dir=str(folder), purge_step=first_epoch or None)

    def add(self, record: dict) -> None:
        for key, value in record.items():
            if key != "epoch" and isinstance(value, (int, float)) and not isinstance(value, bool):
                group = key.split("_", 1)[0] if key.startswith(("train_", "val_")) else "run"
                self.writer.add_scalar(f"{group}/{key}", value, record["epoch"])
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class MetricsWriters:
    """Every writer of a run, fed the same record after each epoch (rank 0 only)."""

    def __init__(self, out: Path, title: str, first_epoch: int, tensorboard: bool):
        self.log = MetricsLog(out / "metrics.jsonl")
        self.log.keep_before(first_epoch)
        self.curves = CurvesPlot(out / CURVES, title)
        self.tensorboard = TensorBoard(out / "tensorboard", first_epoch) if tensorboard else None

    def write(self, record: dict) -> None:
        self.log.append(record)  # first: a resume drops the lines of epochs that last.pt does not cover
        self.curves.update(self.log.records())
        if self.tensorboard is not None:
            self.tensorboard.add(record)

    def close(self) -> None:
        self.curves.close()
        if self.tensorboard is not None:
            self.tensorboard.close()

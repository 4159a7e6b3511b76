"""Where an epoch's record goes (train/writers.py): metrics.jsonl, the learning-curves plot, TensorBoard."""

from __future__ import annotations

from train import writers as writers_module
from train.writers import MetricsLog, MetricsWriters


def record(epoch: int, loss: float) -> dict:
    return {"epoch": epoch, "train_loss": loss, "train_acc": 0.5, "val_loss": loss + 0.1, "val_acc": 0.4,
            "val_top5": 0.9, "images_per_s": 100.0, "data_wait_fraction": 0.1, "epoch_seconds": 1.0}


def test_the_metrics_writers_write_every_record_a_plot_and_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    writers = MetricsWriters(tmp_path, "run", first_epoch=0, tensorboard=True)
    for epoch in range(3):
        writers.write(record(epoch, 2.0 - epoch))
    writers.close()
    assert [r["epoch"] for r in MetricsLog(tmp_path / "metrics.jsonl").records()] == [0, 1, 2]
    assert (tmp_path / "learning-curves.png").read_bytes()[:4] == b"\x89PNG" and writers.curves.error is None
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    losses = [(e.step, e.value) for e in events.Scalars("train/train_loss")]
    assert losses == [(0, 2.0), (1, 1.0), (2, 0.0)]
    # A resume at epoch 1 drops what came after, in the log and in TensorBoard alike.
    resumed = MetricsWriters(tmp_path, "run", first_epoch=1, tensorboard=True)
    resumed.write(record(1, 5.0))
    resumed.close()
    assert [(r["epoch"], r["train_loss"]) for r in MetricsLog(tmp_path / "metrics.jsonl").records()] == \
        [(0, 2.0), (1, 5.0)]
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/train_loss")] == [(0, 2.0), (1, 5.0)]


def test_the_learning_curves_are_redrawn_at_most_once_per_interval_and_at_close(tmp_path, monkeypatch):
    # Redrawn after every fast epoch, the plot's thread held the GIL long enough to make a cached run 6.5x
    # slower: within an interval only the latest records are kept, and close() draws them.
    drawn = []
    monkeypatch.setattr(writers_module, "plot_curves", lambda records, path, title: drawn.append(len(records)))
    monkeypatch.setattr(writers_module.CurvesPlot, "every_s", 3600.0)
    writers = MetricsWriters(tmp_path, "run", first_epoch=0, tensorboard=False)
    for epoch in range(50):
        writers.write(record(epoch, 1.0))
    assert drawn == []  # nothing within the first interval
    writers.close()
    assert drawn == [50]


def test_a_run_draws_its_learning_curves(finished_run):
    assert (finished_run / "learning-curves.png").read_bytes()[:4] == b"\x89PNG"
    assert not (finished_run / "tensorboard").exists()  # only when training.tensorboard is on

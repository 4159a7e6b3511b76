"""The writer thread: waits for each batch's results and writes each unit once all its images are accounted for."""

from __future__ import annotations

import json
import queue
import threading
from pathlib import Path

import numpy as np
import torch

from planktonio.files import atomic_file, write_atomic
from planktonio.image_checks import problem_at
from planktonio.unlabelled import Catalog, Unit

from .formats import table_of, write_csv, write_parquet
from .options import UNITS, PredictOptions
from .settings import owner_record

QUEUE_BATCHES = 8  # results waiting for the writer: the loader and the model never wait on the files


class Writer:
    """Waits for each batch's results (on its own thread), and writes each unit once all of its images are
    accounted for: predicted, or rejected with the reason."""

    def __init__(self, catalog: Catalog, todo: list[Unit], rejected: dict, out: Path, provenance: dict,
                 calibrated: dict | None, o: PredictOptions, device: torch.device | None = None):
        self.catalog, self.todo, self.rejected, self.out = catalog, todo, rejected, out
        self.provenance, self.o = provenance, o
        self.thresholds = None if calibrated is None else calibrated["threshold_list"]
        self.classes = provenance["classes"]
        self.rows: dict[int, tuple] = {}  # catalog position -> (probabilities, embedding)
        self.next_unit = 0
        self.last_position = -1
        self.units_written = 0
        self.error: BaseException | None = None
        self.device = device  # the thread's current device: the events it waits on are this device's
        self._queue: queue.Queue = queue.Queue(maxsize=QUEUE_BATCHES)
        self._thread = threading.Thread(target=self._work, name="predict-writer", daemon=True)
        self._thread.start()

    def put(self, ready, host: list[torch.Tensor]) -> None:
        if self.error is not None:
            raise self.error
        self._queue.put((ready, host))

    def _work(self) -> None:
        if self.device is not None and self.device.type == "cuda":
            try:  # a new thread starts on cuda:0, whatever device the main thread chose
                torch.cuda.set_device(self.device)
            except BaseException as error:  # noqa: BLE001 (kept, and raised in the main thread)
                self.error = error
                return
        while True:
            item = self._queue.get()
            if item is None:
                return
            try:
                ready, host = item
                if ready is not None:
                    ready.synchronize()  # this thread waits for the device, not the loop
                probabilities, positions = host[0].numpy(), host[1].numpy()
                embeddings = host[2].numpy() if len(host) > 2 else None
                for i, position in enumerate(positions.tolist()):
                    self.rows[position] = (probabilities[i], None if embeddings is None else embeddings[i])
                self.last_position = max(self.last_position, int(positions[-1]))
                self._write_complete(self.last_position)
            except BaseException as error:  # noqa: BLE001 (kept, and raised in the main thread)
                self.error = error
                return

    def _write_complete(self, through: int) -> None:
        """Write every unit whose last image is at or before `through` (the loader reads in order)."""
        while self.next_unit < len(self.todo) and self.todo[self.next_unit].stop - 1 <= through:
            self._write(self.todo[self.next_unit])
            self.next_unit += 1

    def finish(self, complete: bool) -> None:
        """After the last batch: wait for the queue; with the run complete, the remaining units too (their
        last images may have been rejected)."""
        self._queue.put(None)
        self._thread.join()
        if self.error is not None:
            raise self.error
        if complete:
            self._write_complete(self.catalog.units[-1].stop if self.catalog.units else 0)

    def close(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()

    def _write(self, unit: Unit) -> None:
        catalog, classes = self.catalog, self.classes
        positions = range(unit.start, unit.stop)
        predicted = [p for p in positions if p in self.rows]
        for p in positions:  # skipped by the loader: broken in decoding; the reason from a full decode
            if p not in self.rows and p not in self.rejected:
                self.rejected[p] = _why_undecodable(catalog, p)
        probabilities = np.stack([self.rows[p][0] for p in predicted]) if predicted else \
            np.zeros((0, len(classes)), dtype=np.float32)
        table = table_of(catalog, predicted, probabilities, classes, self.thresholds, self.o.top_k, self.o.float16)
        units = self.out / UNITS
        provenance = {**self.provenance, "unit": unit.name}
        if self.o.format == "parquet":
            write_parquet(units / f"{unit.name}.parquet", table, provenance)
        else:
            write_csv(units / f"{unit.name}.csv", table, provenance)
        if self.o.embeddings:
            with atomic_file(units / f"{unit.name}.embeddings.npy", "wb") as f:
                np.save(f, np.stack([self.rows[p][1] for p in predicted]) if predicted else
                        np.zeros((0, 0), dtype=np.float16))
        counts, thresholded = _counts(table, catalog, predicted, classes)
        write_atomic(units / f"{unit.name}.json", json.dumps({
            "unit": unit.name, "digest": catalog.digest(unit), **owner_record(self.provenance),
            "images": unit.stop - unit.start, "predicted": len(predicted), "counts": counts,
            "counts_thresholded": thresholded,
            "rejected": [{"path": catalog.paths[p], "sample": catalog.samples[p], "reason": self.rejected[p][0],
                          "detail": self.rejected[p][1]} for p in positions if p in self.rejected]}) + "\n")
        for p in predicted:
            del self.rows[p]
        self.units_written += 1


def _why_undecodable(catalog: Catalog, position: int) -> tuple[str, str]:
    path = catalog.paths[position] if catalog.shards is not None else catalog.root / catalog.paths[position]
    return problem_at(path, catalog.shards, position) or ("unreadable", "the loader could not decode it")


def _counts(table: dict, catalog: Catalog, predicted: list[int], classes: list[str]) -> tuple[dict, dict]:
    counts, thresholded = {}, {}
    for sample, top1, label in zip(table["sample"], table["top1"], table["label"]):
        counts.setdefault(sample, {}).setdefault(top1, 0)
        counts[sample][top1] += 1
        thresholded.setdefault(sample, {}).setdefault(label, 0)
        thresholded[sample][label] += 1
    return counts, thresholded

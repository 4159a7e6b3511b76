"""`python -m train predict`: classify new images with a trained run, at the speed of its loader.

    python -m train predict --run RUN --images SRC --out OUT [--checkpoint best|last] [--calibrated]
        [--backend B] [--batch-size N] [--device D] [--precision P] [--format parquet|csv] [--top-k 3]
        [--float16] [--embeddings] [--shard I/N] [--overwrite]

SRC is a folder of images (each folder holding images is a sample), a file
listing image paths, or tar shards (planktonio/unlabelled.py). The model is
the run's best.pt (or last.pt) with the run's *evaluation* transform, never
its training augmentation; the loader backend, batch size, device and
precision are the run's unless given.

What it writes, in OUT:
- units/<unit>.parquet (or .csv): per image its path, sample, the top-k
  classes with their probabilities (top1, top1_prob, top2, ...), `label` (the
  top-1 class, or "unclassified" below its class's threshold with
  --calibrated) and the whole probability vector (p_<class>; float16 with
  --float16); with --embeddings, <unit>.embeddings.npy: the head's input
  (float16), row for row. Every file carries its provenance: the run, the
  checkpoint's sha256, the classes, the transform, the temperature and
  thresholds, the backend, precision and device, the library versions, the
  command and the date (Parquet metadata; a CSV's first line, `# {...}`).
- units/<unit>.json, written last: the unit is done (its images, counts per
  sample, the images rejected and why). A rerun skips done units (for the
  same images and settings; --overwrite redoes them), so a stop loses at most
  the unit under way, and no image is ever written twice.
- once every unit of SRC is done (by this task or the others of a job array,
  --shard I/N): samples.csv (per sample, the count of each class, top-1 and
  with thresholds: the abundance table), rejected.csv and provenance.json.

A file no loader can read (empty, text, 16-bit, not an image: found from its
header, before any decoding) or that breaks in decoding (truncated: the
torchvision and PIL loaders skip it, DALI stops on it and the batch is run
again without it) is listed in the unit's rejects and rejected.csv with its
reason; every other image is predicted exactly once.

The loader runs ahead of the model as in training, and nothing waits for the
GPU per batch: results are copied to pinned host memory without blocking,
and a writer thread (a bounded queue) waits for them and writes the files.
"""

from __future__ import annotations

import contextlib
import csv
import datetime
import hashlib
import json
import platform
import queue
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from planktonio import PreparedDataset
from planktonio.errors import PlanktonioError
from planktonio.files import atomic_file, check_folder_writable, write_atomic
from planktonio.loaders import (
    BACKENDS,
    LoaderSpec,
    backend_of,
    default_backend,
    resolve_backend,
    resolve_device,
    usable_count,
)
from planktonio.loaders.dali_loader import BrokenFile
from planktonio.unlabelled import Catalog, Unit, discover, read_headers

from . import calibration, checkpoint_file, config as config_module, distributed
from .executor import Executor
from .model import head_name
from .signals import EXIT_INTERRUPTED, EXIT_OK, StopFlag
from .step import autocast

if TYPE_CHECKING:  # (imported where it is used: only reading predictions back needs it)
    import pandas

UNITS = "units"
FORMATS = ("parquet", "csv")
QUEUE_BATCHES = 8  # results waiting for the writer: the loader and the model never wait on the files


@dataclass
class PredictOptions:
    run: Path
    images: Path
    out: Path
    checkpoint: str = "best"
    calibrated: bool = False
    backend: str | None = None
    batch_size: int | None = None
    device: str | None = None
    precision: str | None = None
    workers: int | None = None
    format: str = "parquet"
    top_k: int = 3
    float16: bool = False
    embeddings: bool = False
    shard: tuple[int, int] = (0, 1)
    overwrite: bool = False
    command: list[str] = field(default_factory=lambda: list(sys.argv))


def parse_shard(text: str) -> tuple[int, int]:
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise PlanktonioError(f"--shard {text}: expected I/N, e.g. 0/4") from None
    if not (count >= 1 and 0 <= index < count):
        raise PlanktonioError(f"--shard {text}: I must be in [0, N)")
    return index, count


# ---------------------------------------------------------------- the program


def predict(options: PredictOptions) -> int:
    o = options
    predictor = Predictor(o)
    catalog = predictor.catalog
    mine = [u for number, u in enumerate(catalog.units) if number % o.shard[1] == o.shard[0]]
    todo = [u for u in mine if o.overwrite or not _done(o.out, u, catalog, predictor.provenance)]
    print(f"predict: {len(catalog)} images in {len(catalog.units)} units under {o.images}; this task's "
          f"{len(mine)} units, {len(todo)} to do", flush=True)
    code = EXIT_OK
    if todo:
        with predictor:
            code = predictor.classify(todo)
    if code == EXIT_OK and all((Path(o.out) / UNITS / f"{u.name}.json").is_file() for u in catalog.units):
        merge(catalog, Path(o.out), predictor.classes, predictor.provenance)
        print(f"predict: all {len(catalog.units)} units done: {Path(o.out) / 'samples.csv'}, "
              f"{Path(o.out) / 'rejected.csv'}")
    return code


def _config(run: Path, o: PredictOptions):
    if not (run / "config.yaml").is_file():
        raise PlanktonioError(f"--run {run}: no config.yaml; is it a folder written by `python -m train fit`?")
    overrides = [f"{key}={value}" for key, value in (("loader.backend", o.backend),
                                                      ("loader.eval_batch_size", o.batch_size),
                                                      ("training.device", o.device),
                                                      ("training.precision", o.precision),
                                                      ("loader.workers", o.workers)) if value is not None]
    config = config_module.load(run / "config.yaml", overrides)
    config.training.compile = False  # one pass: compiling would cost more than it saves
    chosen = backend_of(config.loader.backend)
    if not (chosen.trains and chosen.streams):
        if o.backend is not None:
            raise PlanktonioError(f"--backend {o.backend}: {chosen.summary}; predict reads each image once: "
                                  f"choose one of {', '.join(streaming_backends())}")
        print(f"predict: the run trained with the {chosen.name} backend, which keeps a split's images for later "
              f"epochs; predicting with {default_backend()} (its decoder, image by image)", flush=True)
        config.loader.backend = default_backend()
    return config


def streaming_backends(device: torch.device | None = None) -> list[str]:
    """The backends predict may use (on `device`): those that read each image once, batch by batch."""
    return [name for name, b in BACKENDS.items() if b.trains and b.streams and (device is None or b.runs_on(device))]


def _provenance(run: Path, weights: Path, classes: list[str], config, calibrated: dict | None,
                o: PredictOptions) -> dict:
    import nvidia.dali
    import pyarrow
    import torchvision
    return {
        "run": str(run.resolve()), "checkpoint": weights.name, "checkpoint_sha256": calibration.file_sha256(weights),
        "classes": classes, "transform": config.augment["eval"],
        "calibration": None if calibrated is None else {
            "temperature": calibrated["temperature"], "target_precision": calibrated.get("target_precision"),
            "thresholds": dict(zip(classes, calibrated["threshold_list"]))},
        "backend": config.loader.backend, "precision": config.training.precision, "device": config.training.device,
        "batch_size": config.loader.eval_batch_size or config.loader.batch_size, "top_k": o.top_k,
        "float16": o.float16, "format": o.format, "embeddings": o.embeddings,
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "torchvision": torchvision.__version__, "dali": nvidia.dali.__version__,
                     "numpy": np.__version__, "pyarrow": pyarrow.__version__},
        "command": " ".join(o.command), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="seconds"),
    }


def _settings_key(provenance: dict) -> str:
    """What makes two runs' outputs the same: a unit done under another key is not this run's to keep."""
    same = {k: provenance[k] for k in ("checkpoint_sha256", "classes", "transform", "calibration", "top_k",
                                       "float16", "format", "embeddings")}
    return hashlib.sha256(json.dumps(same, sort_keys=True).encode()).hexdigest()


def _done(out: Path, unit: Unit, catalog: Catalog, provenance: dict) -> bool:
    """Whether the unit was written already, for the same images and settings; another checkpoint's or
    settings' result in the same OUT is a one-line error (mixing them would make one table of two runs)."""
    record = Path(out) / UNITS / f"{unit.name}.json"
    if not record.is_file():
        return False
    try:
        done = json.loads(record.read_text())
    except ValueError:
        return False  # cut short: done again
    if done.get("settings") != _settings_key(provenance):
        raise PlanktonioError(f"{out}: its unit {unit.name} was predicted with other settings or another "
                              f"checkpoint; choose another --out, or --overwrite to redo every unit")
    return done.get("digest") == catalog.digest(unit)


# ---------------------------------------------------------------- the loop


@dataclass
class Timing:
    """Where a classify call's time went (printed, and read by `profiling predict`)."""

    images: int = 0
    header_seconds: float = 0.0   # the header scan that finds unreadable files before any decoding
    seconds: float = 0.0          # the whole call: headers, every batch, the last unit written


class Predictor:
    """A run's model and evaluation transform over a catalog of images.

    Built, it has checked the options and read the run, its checkpoint and
    the catalog (cheap); `with predictor:` puts the model on its device (and
    joins the one-process group the Executor expects); `classify(units)`
    predicts and writes them. `profiling predict` times its parts (`loader`,
    `forward`) on the same objects.
    """

    def __init__(self, options: PredictOptions):
        o = self.options = options
        self.run, self.out = Path(o.run), Path(o.out)
        self.config = _config(self.run, o)
        if o.format not in FORMATS:
            raise PlanktonioError(f"--format {o.format}: one of {', '.join(FORMATS)}")
        if o.top_k < 1:
            raise PlanktonioError(f"--top-k {o.top_k}: at least 1")
        weights = self.run / f"{o.checkpoint}.pt"
        self.state = checkpoint_file.load(weights)
        self.classes = list(self.state["classes"])
        self.calibrated = calibration.read(self.run, self.classes, weights) if o.calibrated else None
        check_folder_writable(self.out / UNITS, "--out")
        self.catalog = discover(o.images)
        self.provenance = _provenance(self.run, weights, self.classes, self.config, self.calibrated, o)
        self.executor: Executor | None = None
        self.timing = Timing()

    def __enter__(self) -> Predictor:
        t = self.config.training
        self._stack = contextlib.ExitStack()
        with self._stack as stack:
            self.stop_flag = stack.enter_context(StopFlag())
            ctx = stack.enter_context(distributed.Session(resolve_device(t.device), t.collective_timeout_s))
            dataset = PreparedDataset(self.out, self.catalog.root, tuple(self.classes))
            self.executor = stack.enter_context(Executor(self.config, dataset, ctx))
            self.executor.model.load_state_dict(self.state["model"])
            self.executor.model.eval()
            self._stack = stack.pop_all()
        return self

    def __exit__(self, *exc) -> None:
        self.executor = None
        self._stack.__exit__(*exc)

    def use_backend(self, name: str) -> str:
        """Load with another backend from now on (`profiling predict` takes turns); its resolved name."""
        self.config.loader.backend = name
        self.provenance["backend"] = name
        return resolve_backend(name, self.executor.device)

    def headers(self, positions: np.ndarray) -> tuple[dict, dict]:
        """Each image's (width, height) from its header, and the files no loader can read, with the reason."""
        widths, heights, rejected = read_headers(self.catalog, positions, usable_count(self.options.workers,
                                                                                        "header workers"))
        return {int(p): (int(w), int(h)) for p, w, h in zip(positions, widths, heights)}, rejected

    def loader(self, positions: list[int], sizes: dict):
        """A loader over these images: the evaluation transform, every image once, in order; each image's
        label is its catalog position, so the batches say which images they hold."""
        executor, catalog = self.executor, self.catalog
        backend = BACKENDS[resolve_backend(executor.config.loader.backend, executor.device)]
        c = executor.config
        workers = usable_count(c.loader.workers, "loader workers")
        spec = LoaderSpec(
            dataset=executor.dataset, split="predict", batch_size=c.loader.eval_batch_size or c.loader.batch_size,
            transform=c.transform("eval"), output=executor.output, device=executor.device, train=False,
            shard_index=0, shard_count=1, workers=workers,
            threads=max(1, workers) if c.loader.threads is None else usable_count(c.loader.threads, "DALI threads"),
            seed=c.training.seed, entries=[(catalog.paths[p], p) for p in positions],
            widths=np.asarray([sizes[p][0] for p in positions]), heights=np.asarray([sizes[p][1] for p in positions]),
            shards=None if catalog.shards is None else _Subset(catalog.shards, positions))
        return backend.build(spec, backend.parse_options(c.loader.options))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Class probabilities of a batch (with the calibrated temperature, where asked for)."""
        temperature = 1.0 if self.calibrated is None else self.calibrated["temperature"]
        with autocast(self.executor.device, self.executor.amp_dtype):
            logits = self.executor.net(images)
        return F.softmax(logits.float() / temperature, dim=1)

    def classify(self, todo: list[Unit]) -> int:
        """Predict and write these units; EXIT_INTERRUPTED where a signal stopped it (the units written are
        kept, the rest are done by the same command again)."""
        started = time.perf_counter()
        positions = np.concatenate([np.arange(u.start, u.stop) for u in todo])
        sizes, rejected = self.headers(positions)
        self.timing.header_seconds = time.perf_counter() - started
        writer = Writer(self.catalog, todo, rejected, self.out, self.provenance, self.calibrated, self.options)
        try:
            remaining = [int(p) for p in positions if int(p) not in rejected]
            while remaining and not self.stop_flag.raised:
                done = {"batches": 0}
                loader = self.loader(remaining, sizes)
                try:
                    self._run_batches(loader, writer, done)
                    remaining = []
                except BrokenFile as bad:  # DALI stopped on it: again from the batch it was in, without it
                    position = remaining[bad.position]
                    rejected[position] = (bad.reason, bad.detail)
                    # the batches handed over hold every image once, in order: go on after them
                    read = done["batches"] * loader.spec.batch_size
                    remaining = [p for p in remaining[read:] if p != position]
                    print(f"predict: {bad.path}: {bad.reason} ({bad.detail}): rejected; going on without it",
                          flush=True)
            writer.finish(complete=not self.stop_flag.raised)
        finally:
            writer.close()
        self.timing.images = len(positions)
        self.timing.seconds = time.perf_counter() - started
        if self.stop_flag.raised:
            print(f"predict: stopping on {self.stop_flag.signal_name}: {writer.units_written} unit(s) written; "
                  f"the same command goes on from there", flush=True)
            return EXIT_INTERRUPTED
        print(f"predict: {len(positions)} images in {self.timing.seconds:.1f} s "
              f"({len(positions) / self.timing.seconds:.0f} images/s; the header scan "
              f"{self.timing.header_seconds:.1f} s)", flush=True)
        return EXIT_OK

    @torch.no_grad()
    def _run_batches(self, loader, writer: Writer, done: dict) -> None:
        """Every batch of the loader through the model; the results to the writer, without waiting for the
        device. done["batches"]: how many were handed over (where a loader that stopped on a broken file
        left off)."""
        executor = self.executor
        captured = {}
        hook = None
        if self.options.embeddings:  # the head's input: the penultimate activations
            head = executor.model.get_submodule(head_name(executor.model))
            hook = head.register_forward_hook(lambda module, inputs, output: captured.update(x=inputs[0]))
        pin = executor.device.type == "cuda"
        try:
            for images, positions in loader:
                parts = [self.forward(images), positions]
                if self.options.embeddings:
                    parts.append(captured["x"].flatten(1).half())
                host = [_to_host(p, pin) for p in parts]
                ready = None
                if pin:  # the copies are queued: the writer waits for this event, the loop goes on
                    ready = torch.cuda.Event()
                    ready.record(torch.cuda.current_stream(executor.device))
                writer.put(ready, host)
                done["batches"] += 1
                if self.stop_flag.raised:
                    break
        finally:
            if hook is not None:
                hook.remove()
            loader.close()


class _Subset:
    """A catalog's tar shards seen through a loader's positions (its entries' labels are catalog positions)."""

    def __init__(self, shards, positions: list[int]):
        self.shards, self.positions = shards, positions

    def read(self, position: int):
        return self.shards.read(self.positions[position])

    def describe(self, position: int) -> str:
        return self.shards.describe(self.positions[position])


def _to_host(tensor: torch.Tensor, pin: bool) -> torch.Tensor:
    """On the host: from a GPU into pinned memory without waiting (the caching host allocator keeps it from
    reuse until the copy is done); a CPU tensor as it is."""
    if not pin:
        return tensor.cpu()
    out = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    out.copy_(tensor, non_blocking=True)
    return out


# ---------------------------------------------------------------- the files


class Writer:
    """Waits for each batch's results (on its own thread), and writes each unit once all of its images are
    accounted for: predicted, or rejected with the reason."""

    def __init__(self, catalog: Catalog, todo: list[Unit], rejected: dict, out: Path, provenance: dict,
                 calibrated: dict | None, o: PredictOptions):
        self.catalog, self.todo, self.rejected, self.out = catalog, todo, rejected, out
        self.provenance, self.o = provenance, o
        self.thresholds = None if calibrated is None else calibrated["threshold_list"]
        self.classes = provenance["classes"]
        self.rows: dict[int, tuple] = {}  # catalog position -> (probabilities, embedding)
        self.next_unit = 0
        self.last_position = -1
        self.units_written = 0
        self.error: BaseException | None = None
        self._queue: queue.Queue = queue.Queue(maxsize=QUEUE_BATCHES)
        self._thread = threading.Thread(target=self._work, name="predict-writer", daemon=True)
        self._thread.start()

    def put(self, ready, host: list[torch.Tensor]) -> None:
        if self.error is not None:
            raise self.error
        self._queue.put((ready, host))

    def _work(self) -> None:
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
            except BaseException as error:  # kept, and raised in the main thread
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
        table = _table(catalog, predicted, probabilities, classes, self.thresholds, self.o.top_k, self.o.float16)
        units = self.out / UNITS
        provenance = {**self.provenance, "unit": unit.name}
        if self.o.format == "parquet":
            _write_parquet(units / f"{unit.name}.parquet", table, provenance)
        else:
            _write_csv(units / f"{unit.name}.csv", table, provenance)
        if self.o.embeddings:
            with atomic_file(units / f"{unit.name}.embeddings.npy", "wb") as f:
                np.save(f, np.stack([self.rows[p][1] for p in predicted]) if predicted else
                        np.zeros((0, 0), dtype=np.float16))
        counts, thresholded = _counts(table, catalog, predicted, classes)
        write_atomic(units / f"{unit.name}.json", json.dumps({
            "unit": unit.name, "digest": catalog.digest(unit), "settings": _settings_key(self.provenance),
            "images": unit.stop - unit.start, "predicted": len(predicted), "counts": counts,
            "counts_thresholded": thresholded,
            "rejected": [{"path": catalog.paths[p], "sample": catalog.samples[p], "reason": self.rejected[p][0],
                          "detail": self.rejected[p][1]} for p in positions if p in self.rejected]}) + "\n")
        for p in predicted:
            del self.rows[p]
        self.units_written += 1


def _why_undecodable(catalog: Catalog, position: int) -> tuple[str, str]:
    from planktonio.dataset import _decode_check, inspect_image
    if catalog.shards is None:
        problem = inspect_image(catalog.root / catalog.paths[position]).problem
    else:
        problem = _decode_check(catalog.paths[position], catalog.shards.read(position).tobytes()).problem
    return problem or ("unreadable", "the loader could not decode it")


def _table(catalog: Catalog, predicted: list[int], probabilities: np.ndarray, classes: list[str],
           thresholds: list[float] | None, top_k: int, float16: bool) -> dict:
    """The columns of a unit's predictions: path, sample, top-k, label, p_<class>."""
    k = min(top_k, len(classes))
    order = np.argsort(-probabilities, axis=1, kind="stable")[:, :k] if len(predicted) else \
        np.zeros((0, k), dtype=np.int64)
    columns = {"path": [catalog.paths[p] for p in predicted], "sample": [catalog.samples[p] for p in predicted]}
    for rank in range(k):
        columns[f"top{rank + 1}"] = [classes[c] for c in order[:, rank]]
        columns[f"top{rank + 1}_prob"] = probabilities[np.arange(len(predicted)), order[:, rank]].astype(np.float32)
    top1 = order[:, 0] if k else np.zeros(0, dtype=np.int64)
    if thresholds is None:
        columns["label"] = [classes[c] for c in top1]
    else:
        limits = np.asarray(thresholds)[top1]
        confident = probabilities[np.arange(len(predicted)), top1] >= limits
        columns["label"] = [classes[c] if ok else calibration.UNCLASSIFIED for c, ok in zip(top1, confident)]
    dtype = np.float16 if float16 else np.float32
    for c, name in enumerate(classes):
        columns[f"p_{name}"] = probabilities[:, c].astype(dtype)
    return columns


def _counts(table: dict, catalog: Catalog, predicted: list[int], classes: list[str]) -> tuple[dict, dict]:
    counts, thresholded = {}, {}
    for sample, top1, label in zip(table["sample"], table["top1"], table["label"]):
        counts.setdefault(sample, {}).setdefault(top1, 0)
        counts[sample][top1] += 1
        thresholded.setdefault(sample, {}).setdefault(label, 0)
        thresholded[sample][label] += 1
    return counts, thresholded


def _write_parquet(path: Path, table: dict, provenance: dict) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq
    arrays = {name: pa.array(values) for name, values in table.items()}
    schema = pa.schema([pa.field(name, array.type) for name, array in arrays.items()],
                       metadata={"planktonio": json.dumps(provenance)})
    with atomic_file(path, "wb") as f:
        pq.write_table(pa.Table.from_pydict(arrays, schema=schema), f)


def _write_csv(path: Path, table: dict, provenance: dict) -> None:
    with atomic_file(path, "w") as f:
        f.write(f"# {json.dumps(provenance)}\n")
        writer = csv.writer(f)
        writer.writerow(list(table))
        for row in zip(*table.values()):
            writer.writerow([repr(float(v)) if isinstance(v, (np.floating, float)) else v for v in row])


# ---------------------------------------------------------------- all the units together


def merge(catalog: Catalog, out: Path, classes: list[str], provenance: dict) -> None:
    """samples.csv (counts per class per sample, top-1 and thresholded), rejected.csv and provenance.json from
    every unit's record."""
    counts, thresholded, rejected, images = {}, {}, [], {}
    for unit in catalog.units:
        done = json.loads((out / UNITS / f"{unit.name}.json").read_text())
        for table, into in ((done["counts"], counts), (done["counts_thresholded"], thresholded)):
            for sample, per_class in table.items():
                for name, n in per_class.items():
                    into.setdefault(sample, {}).setdefault(name, 0)
                    into[sample][name] += n
        rejected += done["rejected"]
    for sample in catalog.samples:
        images[sample] = images.get(sample, 0) + 1
    labels = [*classes, calibration.UNCLASSIFIED]
    with atomic_file(out / "samples.csv", "w") as f:
        writer = csv.writer(f)
        writer.writerow(["sample", "images", "rejected", *classes, *(f"label_{name}" for name in labels)])
        rejected_per_sample = {}
        for r in rejected:
            rejected_per_sample[r["sample"]] = rejected_per_sample.get(r["sample"], 0) + 1
        for sample in sorted(images):
            writer.writerow([sample, images[sample], rejected_per_sample.get(sample, 0),
                             *(counts.get(sample, {}).get(name, 0) for name in classes),
                             *(thresholded.get(sample, {}).get(name, 0) for name in labels)])
    with atomic_file(out / "rejected.csv", "w") as f:
        writer = csv.DictWriter(f, fieldnames=["path", "sample", "reason", "detail"])
        writer.writeheader()
        writer.writerows(rejected)
    write_atomic(out / "provenance.json", json.dumps(provenance, indent=2) + "\n")


def read_predictions(out: Path) -> pandas.DataFrame:
    """Every unit's predictions of OUT as one table, in catalog order (for people and tests)."""
    import pandas as pd
    frames = []
    for path in sorted((Path(out) / UNITS).glob("*.parquet")) or sorted((Path(out) / UNITS).glob("*.csv")):
        frames.append(pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path, comment="#"))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def provenance_of(path: Path) -> dict:
    """The provenance a unit's file carries."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq
        return json.loads(pq.read_schema(path).metadata[b"planktonio"])
    with open(path) as f:
        return json.loads(f.readline().removeprefix("# "))



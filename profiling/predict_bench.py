"""`python -m profiling predict`: how close `train predict` comes to its loader alone and its model alone.

Classifying new images runs the model forward only, so the loader sets the
pace even more than in training. In one process, on the same images, with
the run's model, precision and evaluation transform, each backend takes
turns (`--repeats` rounds, so that a noisy machine slows all of them alike):
- loader alone: every batch of the images through the backend, each one
  waited for on the device (a batch counts once it is really there);
- forward alone: the model (softmax included) on one of those batches, as
  many times as the images make batches: what the loader could at most be
  asked for;
- predict: `train predict`'s own classify of the same images into a scratch
  folder: the header scan that finds unreadable files, the batches, the
  writer thread and the Parquet files included.
Per backend: images/s of each (median over the rounds) and predict's share
of each, which the report checks against the goals (render/predict.py): on a
GPU, predict reaches 85% of the loader alone; on a CPU, where the model and
the loader take turns on the same cores, 85% of what the two allow together
(1 / (1/loader + 1/forward): where one is much slower, as AlexNet's forward
is on a CPU, that is the slower of the two).
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from planktonio.errors import PlanktonioError
from planktonio.loaders import BACKENDS, resolve_backend
from train.predict import PredictOptions, Predictor, streaming_backends

from .measure import ResultFile, synchronize
from .settings import PredictBenchmark
from .stats import summary


def chosen_backends(bench: PredictBenchmark, device: torch.device) -> list[str]:
    if bench.backends == ("auto",):
        return streaming_backends(device)
    names = [resolve_backend(name, device) for name in bench.backends]
    for name in names:
        if name not in streaming_backends(device):
            raise PlanktonioError(f"--backends {name}: predict does not use it ({BACKENDS[name].summary}); "
                                  f"choose from {', '.join(streaming_backends(device))}")
    return names


def loader_alone(predictor: Predictor, positions: list[int], sizes: dict) -> tuple[float, torch.Tensor]:
    """Images/s of the loader over these images (each batch waited for), and its first batch."""
    device = predictor.executor.device
    loader = predictor.loader(positions, sizes)
    first = None
    try:
        synchronize(device)
        started = time.perf_counter()
        for images, _ in loader:
            synchronize(device)
            if first is None:
                first = images.clone()
        seconds = time.perf_counter() - started
    finally:
        loader.close()
    return len(positions) / seconds, first


@torch.no_grad()
def forward_alone(predictor: Predictor, batch: torch.Tensor, images: int) -> float:
    """Images/s of the model on `batch`, repeated for as many batches as `images` make (one sync at the end,
    as predict's loop has none)."""
    device = predictor.executor.device
    batches = -(-images // batch.shape[0])
    predictor.forward(batch)  # cuDNN's choice of algorithms for this shape, outside the clock
    synchronize(device)
    started = time.perf_counter()
    for _ in range(batches):
        predictor.forward(batch)
    synchronize(device)
    return batches * batch.shape[0] / (time.perf_counter() - started)


def predict_whole(predictor: Predictor) -> tuple[float, float]:
    """Images/s of predict's classify over every unit, and the seconds of its header scan."""
    code = predictor.classify(predictor.catalog.units)
    if code != 0:
        raise PlanktonioError(f"predict stopped (exit {code}) during the benchmark")
    return predictor.timing.images / predictor.timing.seconds, predictor.timing.header_seconds


def run(bench: PredictBenchmark, json_path=None, environment: dict | None = None) -> dict:
    scratch = Path(tempfile.mkdtemp(prefix="planktonio-predict-bench-"))
    options = PredictOptions(run=Path(bench.run), images=Path(bench.images), out=scratch, checkpoint=bench.checkpoint,
                             backend=None, batch_size=bench.batch_size, device=bench.device,
                             precision=bench.precision, workers=bench.workers, overwrite=True,
                             command=["python", "-m", "profiling", "predict"])
    try:
        predictor = Predictor(options)
        with predictor:
            return _measure(bench, predictor, json_path, environment)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _measure(bench: PredictBenchmark, predictor: Predictor, json_path, environment: dict | None) -> dict:
    executor = predictor.executor
    names = chosen_backends(bench, executor.device)
    catalog = predictor.catalog
    sizes, rejected = predictor.headers(np.arange(len(catalog)))
    positions = [p for p in range(len(catalog)) if p not in rejected]
    if not positions:
        raise PlanktonioError(f"--images {bench.images}: no image any loader can read")
    config = {**vars(bench), "backends": names, "device": str(executor.device), "image_count": len(positions),
              "rejected": len(rejected), "units": len(catalog.units), "model": executor.config.model.name,
              "precision": executor.config.training.precision, "amp_dtype": str(executor.amp_dtype),
              "batch_size": executor.config.loader.eval_batch_size or executor.config.loader.batch_size,
              "workers": executor.config.loader.workers, "transform": predictor.provenance["transform"],
              "checkpoint_sha256": predictor.provenance["checkpoint_sha256"]}
    result = ResultFile(json_path, "predict", environment=environment or {}, config=config, results=[])
    runs = {name: {"loader": [], "forward": [], "predict": [], "headers": []} for name in names}
    for name in names:  # a first turn each, untimed: pipelines built, caches warm, files in the page cache
        predictor.use_backend(name)
        loader_alone(predictor, positions, sizes)
    for repeat in range(bench.repeats):
        for name in names:
            predictor.use_backend(name)
            r = runs[name]
            rate, batch = loader_alone(predictor, positions, sizes)
            r["loader"].append(rate)
            r["forward"].append(forward_alone(predictor, batch, len(positions)))
            rate, headers = predict_whole(predictor)
            r["predict"].append(rate)
            r["headers"].append(headers)
        result.set(results=[_row(name, runs[name]) for name in names], repeats_done=repeat + 1)
    return result.finish()


def _row(name: str, r: dict) -> dict:
    loader, forward, predicted = (summary(r[k])["median"] for k in ("loader", "forward", "predict"))
    # Where the loader and the model run on the same cores (a CPU), each image costs both: at best the two
    # times add up. On a GPU the two overlap, and the slower of them is the bound.
    shared = 1 / (1 / loader + 1 / forward)
    return {"backend": name, "role": BACKENDS[name].role,
            "loader_images_per_s": summary(r["loader"]), "forward_images_per_s": summary(r["forward"]),
            "predict_images_per_s": summary(r["predict"]), "header_scan_s": summary(r["headers"]),
            "shared_cores_bound_images_per_s": shared,
            "predict_vs_loader": predicted / loader, "predict_vs_forward": predicted / forward,
            "predict_vs_slower": predicted / min(loader, forward), "predict_vs_shared_bound": predicted / shared}

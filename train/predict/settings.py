"""The run a prediction uses (its config, backend) and what its outputs carry (provenance, settings key)."""

from __future__ import annotations

import datetime
import hashlib
import json
import platform
from pathlib import Path

import numpy as np
import torch

from planktonio.errors import PlanktonioError
from planktonio.loaders import BACKENDS, backend_of, default_backend

from .. import calibration, config as config_module
from .options import PredictOptions


def run_config(run: Path, o: PredictOptions):
    if not (run / "config.yaml").is_file():
        raise PlanktonioError(f"--run {run}: no config.yaml; is it a folder written by `python -m train fit`?")
    overrides = [f"{key}={value}" for key, value in (("loader.backend", o.backend),
                                                      ("loader.eval_batch_size", o.batch_size),
                                                      ("training.device", o.device),
                                                      ("training.precision", o.precision),
                                                      ("loader.workers", o.workers)) if value is not None]
    config = config_module.load(run / "config.yaml", overrides)
    config.training.compile = False  # one pass: compiling would cost more than it saves
    # The checkpoint holds every weight: the backbone's file the run started from is not needed (nor present
    # on another machine)
    config.model.weights = None
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


def provenance(run: Path, weights: Path, classes: list[str], config, calibrated: dict | None,
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


def settings_key(provenance: dict) -> str:
    """What makes two runs' outputs the same: a unit done under another key is not this run's to keep."""
    same = {k: provenance[k] for k in ("checkpoint_sha256", "classes", "transform", "calibration", "top_k",
                                       "float16", "format", "embeddings")}
    return hashlib.sha256(json.dumps(same, sort_keys=True).encode()).hexdigest()


def owner_record(provenance: dict) -> dict:
    """What OUT/predictions.json and each unit's record say of the predictions' owner (folder.py)."""
    return {"settings": settings_key(provenance),
            **{k: provenance[k] for k in ("run", "checkpoint", "checkpoint_sha256", "classes")}}

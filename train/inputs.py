"""What a run's steps read and run: images through the whole model, or kept activations through its rest.

`build_inputs` makes the one decision (train/feature_cache.py): where a
frozen prefix on a fixed transform can be computed once per image, the steps
read its kept activations and run the rest of the model; otherwise they read
decoded, augmented images and run the whole model. The training loop sees the
same `Inputs` either way.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from torch import nn

from planktonio.loaders import resolve_backend

from .executor import Executor
from .feature_cache import FeatureCache


@dataclass
class Inputs:
    # What the steps run on these batches: the model, or its rest after the feature cache's cut. Not the
    # DDP wrapper: the Trainer asks the Executor for that, which alone holds it (distributed.Session).
    module: nn.Module
    train: object                        # the training batches (a Loader, or the kept activations')
    valid: object                        # the validation batches
    eval_batches: Callable[[str], object]  # a split's evaluation batches, made when asked (the test split)
    loader_name: str                     # the backend that decodes the images (the feature cache's pass too)
    feature_cache: dict                  # how the feature cache was used, for the log and summary.json

    def __enter__(self) -> "Inputs":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Worker processes and pipelines end now, not at exit."""
        self.train.close()
        self.valid.close()


def build_inputs(executor: Executor, out: Path, log: Callable[[str], None]) -> Inputs:
    """The run's inputs: cached activations where the feature cache applies, images otherwise."""
    loader = executor.config.loader
    batch, eval_batch = loader.batch_size, loader.eval_batch_size or loader.batch_size
    name = resolve_backend(loader.backend, executor.device)
    features = FeatureCache(executor, out, log=log)
    if features.decide():
        features.prepare()
        return Inputs(module=features.cut.rest, train=features.batches("train", batch, True),
                      valid=features.batches("valid", eval_batch, False),
                      eval_batches=lambda split: features.batches(split, eval_batch, False), loader_name=name,
                      feature_cache=features.report)
    if executor.config.training.feature_cache == "auto":
        log(f"feature cache off: {features.reason}")
    train = executor.loader_for("train", batch, True)
    try:
        valid = executor.eval_loader("valid")
    except BaseException:
        train.close()
        raise
    return Inputs(module=executor.net, train=train, valid=valid,
                  eval_batches=executor.eval_loader, loader_name=name, feature_cache=features.report)

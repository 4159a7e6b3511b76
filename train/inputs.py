"""What a run's steps read and run: images through the whole model, or kept activations through its rest.

`build_inputs` first checks everything the run will read, the way every
loader checks it (planktonio.loaders.loader_spec: each split's files
unchanged since prepare or its shards intact, a full training batch, sizes
that fit the machine), so that a run refuses the same inputs whether it reads
images or a feature cache's kept activations. Then it makes the one decision
(train/feature_cache.py): where a frozen prefix on a fixed transform can be
computed once per image, the steps read its kept activations and run the
rest of the model; otherwise they read decoded, augmented images and run the
whole model. The training loop sees the same `Inputs` either way.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from torch import nn

from planktonio import memory
from planktonio.errors import PlanktonioError
from planktonio.loaders import LoaderSpec, resolve_backend

from . import distributed
from .executor import Executor
from .feature_cache import FeatureCache
from .signals import StopFlag


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


def checked_specs(executor: Executor) -> dict[str, LoaderSpec]:
    """Every split the run reads, checked as its loader would check it, before any work: train (in full
    batches), valid, and test where the data set has one (the best weights are tested on it at the end).

    The check that costs a stat per loose file is made by the first rank alone (with many stats in flight),
    and its verdict goes to every rank: one stat per file per run, not per rank (a million files on
    Lustre, times the ranks of a job, is the metadata storm that slows a whole machine). Every other
    check each rank makes for itself, alike."""
    batch, eval_batch = executor.config.loader.batch_size, executor.eval_batch_size()
    mine = executor.ctx.is_main
    specs, problem = {}, None
    try:
        specs = {"train": executor.loader_spec("train", batch, True, check_files=mine),
                 "valid": executor.loader_spec("valid", eval_batch, False, check_files=mine)}
        if executor.has_test_split():
            specs["test"] = executor.loader_spec("test", eval_batch, False, check_files=mine)
    except PlanktonioError as error:
        problem = error
    except OSError as error:  # (a folder that cannot be read): one line, and the other ranks told, not left waiting
        problem = PlanktonioError(f"{error.filename or 'the data'}: cannot be read ({error.strerror or error})")
    verdict = distributed.first_rank_says(None if problem is None else str(problem), "its check of the input files")
    if problem is not None:
        raise problem
    if verdict is not None:
        raise PlanktonioError(verdict)
    return specs


def build_inputs(executor: Executor, out: Path, log: Callable[[str], None], stop_flag: StopFlag) -> Inputs:
    """The run's inputs: cached activations where the feature cache applies, images otherwise."""
    specs = checked_specs(executor)
    log(f"host memory for caches: {memory.Budget.of(memory.HOST).said}")
    batch, eval_batch = executor.config.loader.batch_size, executor.eval_batch_size()
    name = resolve_backend(executor.config.loader.backend, executor.device)
    features = FeatureCache(executor, out, log=log, stop_flag=stop_flag)
    if features.decide(specs):
        if features.prepare(specs):  # (False: the pass could not read an image; it said so)
            return Inputs(module=features.cut.rest, train=features.batches("train", batch, True),
                          valid=features.batches("valid", eval_batch, False),
                          eval_batches=lambda split: features.batches(split, eval_batch, False), loader_name=name,
                          feature_cache=features.report)
    elif executor.config.training.feature_cache == "auto":
        log(f"feature cache off: {features.reason}")
    train = executor.loader_for("train", batch, True, specs["train"])
    try:
        valid = executor.eval_loader("valid", specs["valid"])
    except BaseException:
        train.close()
        raise
    return Inputs(module=executor.model, train=train, valid=valid,
                  eval_batches=lambda split: executor.eval_loader(split, specs.get(split)), loader_name=name,
                  feature_cache=features.report)

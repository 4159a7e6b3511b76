"""Training configuration: YAML files, `--set key=value` overrides, validated before any work.

A config is a tree of sections (model, loader, optimizer, training, augment).
Every key is declared below with its type and default: an unknown key, a value
of the wrong type or a choice outside the allowed ones is an error that names
the key, raised before a data set is opened or a model is built.
"""

from __future__ import annotations

import copy
import math
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from planktonio.errors import PlanktonioError
from planktonio.loaders import backend_choices
from planktonio.transforms import EVAL_TRANSFORM, Transform

PRECISIONS = ("fp32", "amp-fp16", "amp-bf16", "amp")
FREEZE = ("none", "features", "all-but-head")
BACKENDS = backend_choices()  # from planktonio's one registry of loader backends
OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("constant", "cosine")


@dataclass
class ModelConfig:
    name: str = "alexnet"           # any torchvision classification model, or tiny-cnn
    weights: str | None = None      # a local state-dict file; None: random initialisation
    freeze: str = "none"            # none | features | all-but-head


@dataclass
class LoaderConfig:
    backend: str = "torchvision"    # dali (GPU if there is one) | dali-gpu | dali-cpu | torchvision
    batch_size: int = 24
    eval_batch_size: int | None = None  # default: batch_size
    workers: int | None = None      # DataLoader processes; default: the CPUs this process may use
    dali_threads: int | None = None  # DALI CPU threads; default: workers (dali-gpu needs only a few)


@dataclass
class OptimizerConfig:
    name: str = "sgd"
    lr: float = 0.001
    momentum: float = 0.9
    weight_decay: float = 0.0
    schedule: str = "constant"      # constant | cosine (over training.epochs)


@dataclass
class TrainingConfig:
    epochs: int = 100
    patience: int = 20              # early stopping: epochs without a better validation loss
    precision: str = "fp32"         # fp32 | amp-fp16 | amp-bf16 | amp (fp16 on GPU, bf16 on CPU)
    channels_last: bool = False
    compile: bool = False           # torch.compile the model
    seed: int = 0
    device: str = "auto"            # auto | cpu | cuda
    progress: bool = True           # a progress bar on rank 0
    # Every check_every steps (and at each epoch's end) the loop waits for the
    # GPU once to see whether the loss became NaN/inf and whether a signal
    # asks it to stop; in between it never waits. The cost: a NaN is noticed
    # up to check_every - 1 steps late (those steps are thrown away: the run
    # exits 3 and last.pt stays the last good checkpoint), and a signal is
    # obeyed up to check_every steps late. 1: a check after every step.
    check_every: int = 50
    # last.pt (and best.pt, kept in memory until then) is written at the first
    # epoch end at least this many seconds after the previous checkpoint, and
    # always on a signal, at early stopping and at the end. A crash loses at
    # most this long plus one epoch. 0: after every epoch.
    checkpoint_every_s: float = 300.0


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    loader: LoaderConfig = field(default_factory=LoaderConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    # The planktonio Transform of each split, as mappings (see planktonio/transforms.py).
    augment: dict[str, dict[str, Any]] = field(default_factory=lambda: {
        "train": EVAL_TRANSFORM.to_dict(), "eval": EVAL_TRANSFORM.to_dict()})

    def transform(self, which: str) -> Transform:
        return Transform.from_dict(self.augment[which])

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


SECTIONS = {"model": ModelConfig, "loader": LoaderConfig, "optimizer": OptimizerConfig,
            "training": TrainingConfig}


def _check_value(key: str, value: Any, annotation: str) -> Any:
    """Check a value against a field's declared type (annotations are strings here)."""
    optional = "None" in annotation
    if value is None:
        if optional:
            return None
        raise PlanktonioError(f"config key {key}: a value is required")
    if "bool" in annotation:
        if not isinstance(value, bool):
            raise PlanktonioError(f"config key {key}: expected true or false, got {value!r}")
    elif "int" in annotation:
        if isinstance(value, bool) or not isinstance(value, int):
            raise PlanktonioError(f"config key {key}: expected an integer, got {value!r}")
    elif "float" in annotation:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise PlanktonioError(f"config key {key}: expected a finite number, got {value!r}")
        value = float(value)
    elif "str" in annotation and not isinstance(value, str):
        raise PlanktonioError(f"config key {key}: expected a string, got {value!r}")
    return value


def _build_section(name: str, cls, values: Any):
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise PlanktonioError(f"config section {name}: expected a mapping, got {values!r}")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(repr(f"{name}.{k}") for k in set(values) - set(known))  # repr: any key prints on one line
    if unknown:
        raise PlanktonioError(f"unknown config key(s) {', '.join(unknown)}; {name} has: {', '.join(known)}")
    section = cls()
    for key, value in values.items():
        setattr(section, key, _check_value(f"{name}.{key}", value, str(known[key].type)))
    return section


def from_dict(values: dict[str, Any]) -> Config:
    values = copy.deepcopy(values or {})
    if not isinstance(values, dict):
        raise PlanktonioError(f"a config is a mapping of sections, not {values!r}")
    unknown = sorted(repr(k) for k in set(values) - set(SECTIONS) - {"augment"})
    if unknown:
        raise PlanktonioError(f"unknown config section(s) {', '.join(unknown)}; "
                              f"known: {', '.join([*SECTIONS, 'augment'])}")
    config = Config(**{name: _build_section(name, cls, values.get(name)) for name, cls in SECTIONS.items()})
    augment = values.get("augment") or {}
    if not isinstance(augment, dict) or set(augment) - {"train", "eval"}:
        raise PlanktonioError("config section augment: expected keys train and eval")
    config.augment.update(augment)
    validate(config)
    return config


def validate(config: Config) -> None:
    """Choices and ranges; also builds both transforms so that their errors surface now."""
    checks = [
        (config.model.freeze in FREEZE, f"model.freeze must be one of {', '.join(FREEZE)}"),
        (config.loader.backend in BACKENDS, f"loader.backend must be one of {', '.join(BACKENDS)}"),
        (config.loader.batch_size >= 1, "loader.batch_size must be >= 1"),
        (config.loader.eval_batch_size is None or config.loader.eval_batch_size >= 1,
         "loader.eval_batch_size must be >= 1"),
        (config.loader.workers is None or config.loader.workers >= 0, "loader.workers must be >= 0"),
        (config.loader.dali_threads is None or config.loader.dali_threads >= 1, "loader.dali_threads must be >= 1"),
        (config.optimizer.name in OPTIMIZERS, f"optimizer.name must be one of {', '.join(OPTIMIZERS)}"),
        (config.optimizer.schedule in SCHEDULES, f"optimizer.schedule must be one of {', '.join(SCHEDULES)}"),
        (config.optimizer.lr >= 0, "optimizer.lr must be >= 0"),
        (0 <= config.optimizer.momentum < 1, "optimizer.momentum must be in [0, 1)"),
        (config.optimizer.weight_decay >= 0, "optimizer.weight_decay must be >= 0"),
        (0 <= config.training.seed < 2**32, "training.seed must be in [0, 2**32)"),
        (config.training.epochs >= 1, "training.epochs must be >= 1"),
        (config.training.patience >= 1, "training.patience must be >= 1"),
        (config.training.check_every >= 1, "training.check_every must be >= 1"),
        (config.training.checkpoint_every_s >= 0, "training.checkpoint_every_s must be >= 0"),
        (config.training.precision in PRECISIONS, f"training.precision must be one of {', '.join(PRECISIONS)}"),
        (re.fullmatch(r"auto|cpu|cuda(:[0-9]+)?", config.training.device) is not None,
         "training.device must be auto, cpu, cuda or cuda:N"),
    ]
    problems = [message for ok, message in checks if not ok]
    if problems:
        raise PlanktonioError("bad config: " + "; ".join(problems))
    for which in ("train", "eval"):
        try:
            config.transform(which)
        except PlanktonioError as error:
            raise PlanktonioError(f"config augment.{which}: {error}") from None


def apply_override(values: dict[str, Any], assignment: str) -> None:
    """Apply one `section.key=value` (value parsed as YAML: 5, 0.1, true, null, [1, 2])."""
    key, sep, text = assignment.partition("=")
    if not sep or not key:
        raise PlanktonioError(f"--set expects section.key=value, got {assignment!r}")
    parts = key.split(".")
    target = values
    for part in parts[:-1]:
        target = target.setdefault(part, {})
        if not isinstance(target, dict):
            raise PlanktonioError(f"--set {key}: {part} is not a section")
    try:
        target[parts[-1]] = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise PlanktonioError(f"--set {key}: cannot parse {text!r} ({error})") from None


def load(path: str | Path | None, overrides: list[str] = ()) -> Config:
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise PlanktonioError(f"config file {path}: not found")
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as error:
            raise PlanktonioError(f"config file {path}: not valid YAML ({error})") from None
        if not isinstance(values, dict):
            raise PlanktonioError(f"config file {path}: expected a mapping at the top level")
    for assignment in overrides:
        apply_override(values, assignment)
    try:
        return from_dict(values)
    except PlanktonioError as error:
        raise PlanktonioError(f"{path or 'config'}: {error}") from None


def dump(config: Config) -> str:
    return yaml.safe_dump(config.to_dict(), sort_keys=False)

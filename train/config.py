"""Training configuration: YAML files and `--set key=value` overrides, declared once, checked before any work.

A config is a tree of sections (model, loader, optimizer, training, profile,
augment). Each section is a dataclass below: its fields declare the type,
default, help and choices of every key (planktonio/declared.py builds and
checks them), and its `problems()` the checks across a value's range. An
unknown key, a value of the wrong type or out of range is an error raised
before a data set is opened or a model built, and it says where the value
came from: the config file and line, or the `--set` that gave it.

Numbers and booleans are read as YAML 1.2 reads them: `1e-3` and `3E-4` are
numbers (YAML 1.1, PyYAML's default, reads them as strings), and only
true/false are booleans (YAML 1.1 also reads on, off, yes and no as booleans,
so `feature_cache: off` would not be the string it looks like). A key given
twice in one mapping is an error naming it and both lines, not the last one
silently. docs/training.md.
"""

from __future__ import annotations

import copy
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from planktonio.declared import Bytes, Problem, SettingsError, build, setting
from planktonio.errors import PlanktonioError
from planktonio.loaders import backend_choices, backend_of, check_loader_sizes, default_backend
from planktonio.transforms import DEFAULT_TRANSFORMS, Transform

PRECISIONS = ("fp32", "amp-fp16", "amp-bf16", "amp")
FREEZE = ("none", "features", "all-but-head")
OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("constant", "cosine")


@dataclass
class ModelConfig:
    name: str = setting("alexnet", help="any torchvision classification model, or tiny-cnn")
    weights: str | None = setting(None, help="a local state-dict file (never downloaded); null: random weights")
    freeze: str = setting("none", choices=FREEZE, help="none | features | all-but-head")
    # train: the study's recipe (frozen layers still run in training mode: the dropout before AlexNet's
    # frozen fc6 and fc7 stays on); eval: they run in eval mode, no dropout there: a linear probe of the
    # features, another recipe with another result.
    frozen_mode: str = setting("train", choices=("train", "eval"), help="train | eval (a linear probe)")


@dataclass
class LoaderConfig:
    # The default: the registry's first alias (DALI, on the GPU where there is one).
    backend: str = setting(default_backend(), choices=backend_choices(training=True),
                           help="a loader backend of planktonio's registry, or an alias")
    batch_size: int = setting(24)
    eval_batch_size: int | None = setting(None, help="default: batch_size")
    workers: int | None = setting(None, help="DataLoader processes; default: the CPUs this process may use")
    threads: int | None = setting(None, help="DALI CPU threads; default: workers (dali-gpu needs only a few)")
    options: dict = setting(default_factory=dict, help="the backend's own options (e.g. the cache's budget_bytes)")

    def problems(self) -> list[tuple[str, str]]:
        found = [(text.split()[0], text) for text in check_loader_sizes(self.batch_size, self.workers, self.threads)]
        if self.eval_batch_size is not None and self.eval_batch_size < 1:
            found.append(("eval_batch_size", "eval_batch_size must be >= 1"))
        try:
            backend_of(self.backend).parse_options(self.options)
        except SettingsError as error:
            found += [("options", f"options: {p.message}") for p in error.problems]
        return found


@dataclass
class OptimizerConfig:
    name: str = setting("sgd", choices=OPTIMIZERS)
    lr: float = setting(0.001)
    momentum: float = setting(0.9)
    weight_decay: float = setting(0.0)
    schedule: str = setting("constant", choices=SCHEDULES, help="constant | cosine (over training.epochs)")

    def problems(self) -> list[tuple[str, str]]:
        checks = [(self.lr >= 0, "lr", "lr must be >= 0"),
                  (0 <= self.momentum < 1, "momentum", "momentum must be in [0, 1)"),
                  (self.weight_decay >= 0, "weight_decay", "weight_decay must be >= 0")]
        return [(key, message) for ok, key, message in checks if not ok]


@dataclass
class TrainingConfig:
    # resumable=True: a resumed run may change it (it continues a run: more epochs, more patience, or changes
    # how it reports or keeps activations), never what the run computes.
    epochs: int = setting(100, resumable=True)
    patience: int = setting(20, help="early stopping: epochs without a better validation loss", resumable=True)
    precision: str = setting("fp32", choices=PRECISIONS, help="amp: fp16 on a GPU, bf16 on a CPU")
    channels_last: bool = setting(False)
    compile: bool = setting(False, help="torch.compile the model")
    seed: int = setting(0)
    device: str = setting("auto", help="auto | cpu | cuda | cuda:N")
    progress: bool = setting(True, help="a progress bar on rank 0, on a terminal", resumable=True)
    # Every check_every steps (and at each epoch's end) the loop waits for the
    # GPU once to see whether the loss became NaN/inf and whether a signal
    # asks it to stop; in between it never waits. The cost: a NaN is noticed
    # up to check_every - 1 steps late (those steps are thrown away: the run
    # exits 3 and last.pt stays the last good checkpoint), and a signal is
    # obeyed up to check_every steps late. 1: a check after every step.
    check_every: int = setting(50, resumable=True)
    # last.pt (and best.pt, kept in memory until then) is written at the first
    # epoch end at least this many seconds after the previous checkpoint, and
    # always on a signal, at early stopping and at the end. A crash loses at
    # most this long plus one epoch. 0: after every epoch.
    checkpoint_every_s: float = setting(300.0, resumable=True)
    tensorboard: bool = setting(False, help="also write TensorBoard event files to the run folder", resumable=True)
    speed_run: bool = setting(False, help="a run measured for its speed (profiling suite): no checkpoint is "
                                          "written while it runs (best.pt at its end) and the best weights are "
                                          "not tested")
    # The feature cache (train/feature_cache.py): auto computes once what every epoch would compute
    # identically (a frozen prefix on a deterministic or periodic transform) where it fits its budget.
    feature_cache: str = setting("auto", choices=("auto", "on", "off"), help="auto | on | off", resumable=True)
    feature_cache_budget_bytes: Bytes | None = setting(None, help="most the kept activations may take on the "
                                                                  "training device (e.g. 4GiB), within the "
                                                                  "process's cache budget (planktonio/memory.py)", resumable=True)
    feature_cache_dir: str | None = setting(None, help="where the activations are kept on disk (default: "
                                                       "RUN/feature-cache; a sweep shares one)", resumable=True)
    # How long a rank waits in a collective for the others before the job is
    # declared hung (a rank stopped, a wedged GPU): the process group's timeout.
    collective_timeout_s: float = setting(600.0, resumable=True)
    # At the end, fit a temperature and per-class thresholds on the validation split (train/calibration.py),
    # as `python -m train calibrate` does: RUN/calibration.json, for `train predict --calibrated`.
    calibrate: bool = setting(False, help="fit a temperature and per-class thresholds at the end", resumable=True)
    calibration_target: float = setting(0.9, help="the validation precision each class's threshold must reach", resumable=True)

    def problems(self) -> list[tuple[str, str]]:
        checks = [(0 <= self.seed < 2**32, "seed", "seed must be in [0, 2**32)"),
                  (self.epochs >= 1, "epochs", "epochs must be >= 1"),
                  (self.patience >= 1, "patience", "patience must be >= 1"),
                  (self.check_every >= 1, "check_every", "check_every must be >= 1"),
                  (self.checkpoint_every_s >= 0, "checkpoint_every_s", "checkpoint_every_s must be >= 0"),
                  (self.collective_timeout_s > 0, "collective_timeout_s", "collective_timeout_s must be > 0"),
                  (0 < self.calibration_target <= 1, "calibration_target", "calibration_target must be in (0, 1]"),
                  (re.fullmatch(r"auto|cpu|cuda(:[0-9]+)?", self.device) is not None, "device",
                   "device must be auto, cpu, cuda or cuda:N")]
        return [(key, message) for ok, key, message in checks if not ok]


@dataclass
class ProfileConfig:
    """torch.profiler around a run's first steps (`python -m profiling trace` switches it on)."""

    enabled: bool = setting(False)
    wait: int = setting(1, help="steps before the profiler starts")
    warmup: int = setting(2, help="steps recorded and thrown away (the profiler's own start-up)")
    active: int = setting(5, help="steps recorded into the trace")
    memory: bool = setting(False, help="also record shapes and memory, and write a memory timeline")
    stop_after: bool = setting(True, help="end the run once the trace is written (no validation, no checkpoint)")

    def problems(self) -> list[tuple[str, str]]:
        if self.wait < 0 or self.warmup < 0 or self.active < 1:
            return [("active", "wait and warmup must be >= 0, active >= 1")]
        return []

    @property
    def steps(self) -> int:
        return self.wait + self.warmup + self.active


SECTIONS = {"model": ModelConfig, "loader": LoaderConfig, "optimizer": OptimizerConfig,
            "training": TrainingConfig, "profile": ProfileConfig}
# Keys renamed since runs were first written: an older run folder's config.yaml still loads
# (with the value converted where the unit changed).
RENAMED = {("loader", "dali_threads"): ("threads", lambda value: value),
           ("training", "feature_cache_budget_mb"): ("feature_cache_budget_bytes",
                                                     lambda mib: mib if not isinstance(mib, (int, float)) or
                                                     isinstance(mib, bool) else int(mib * 2**20))}


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    loader: LoaderConfig = field(default_factory=LoaderConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    profile: ProfileConfig = field(default_factory=ProfileConfig)
    # The planktonio Transform of each split, as mappings (see planktonio/transforms.py).
    augment: dict[str, dict[str, Any]] = field(default_factory=lambda: {
        which: t.to_dict() for which, t in DEFAULT_TRANSFORMS.items()})

    def transform(self, which: str) -> Transform:
        return Transform.from_dict(self.augment[which])

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def resumable_keys() -> set[str]:
    """The dotted keys a resumed run may change: the settings declared resumable."""
    return {f"{section}.{f.name}" for section, cls in SECTIONS.items() for f in fields(cls)
            if f.metadata.get("resumable")}


def from_dict(values: dict[str, Any]) -> Config:
    """A Config from nested mappings; raises SettingsError naming every bad key."""
    values = copy.deepcopy(values or {})
    if not isinstance(values, dict):
        raise SettingsError([Problem("", f"a config is a mapping of sections, not {values!r}")])
    for (section, old), (new, convert) in RENAMED.items():
        if isinstance(values.get(section), dict) and old in values[section]:
            values[section].setdefault(new, convert(values[section].pop(old)))
    known = [*SECTIONS, "augment"]
    problems = [Problem(str(k), f"unknown config section {str(k)!r}; known: {', '.join(known)}")
                for k in values if k not in known]
    sections = {}
    for name, cls in SECTIONS.items():
        try:
            sections[name] = build(cls, values.get(name), name)
        except SettingsError as error:
            problems += error.problems
    augment = values.get("augment") or {}
    if not isinstance(augment, dict) or set(augment) - {"train", "eval"}:
        problems.append(Problem("augment", "config section augment: expected keys train and eval"))
        augment = {}
    config = Config(**sections) if not problems else None
    if config is not None:
        config.augment.update(augment)
        for which in ("train", "eval"):
            try:
                config.transform(which)
            except PlanktonioError as error:
                problems.append(Problem(f"augment.{which}", f"augment.{which}: {error}"))
    if problems:
        raise SettingsError(problems)
    return config


# ------------------------------------------------------------------ YAML, and where each value came from


class _YamlLoader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2's floats and duplicate keys refused."""

    def construct_mapping(self, node, deep=False):
        first_line: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            try:
                if key in first_line:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key!r} at line {line} (first given at line "
                                    f"{first_line[key]}); keep one", key_node.start_mark)
                first_line[key] = line
            except TypeError:  # an unhashable key (a list): the base class says so
                pass
        return super().construct_mapping(node, deep=deep)


def _yaml12_bool(loader, node):
    """true/false are booleans; yes, no, on, off stay the strings they are (YAML 1.2)."""
    value = loader.construct_scalar(node)
    return value.lower() == "true" if value.lower() in ("true", "false") else value


_YamlLoader.add_constructor("tag:yaml.org,2002:bool", _yaml12_bool)
# YAML 1.2 floats without a dot: 1e-3, 3E-4, -2e+5 (YAML 1.1 needs 1.0e-3).
_YamlLoader.add_implicit_resolver("tag:yaml.org,2002:float",
                                  re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
                                  list("-+0123456789"))
_YamlLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _YamlLoader.construct_mapping)


def parse_yaml(text: str):
    """A YAML document as Python values (YAML 1.2 floats, duplicate keys refused)."""
    return yaml.load(text, Loader=_YamlLoader)  # a SafeLoader subclass: it builds no Python objects


def _key_lines(node: yaml.Node, prefix: str = "") -> dict[str, int]:
    """Dotted key -> the line it is given on, for every key of a composed YAML document."""
    lines = {}
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = f"{prefix}{key_node.value}"
            lines[key] = key_node.start_mark.line + 1
            lines.update(_key_lines(value_node, key + "."))
    return lines


def read_file(path: Path) -> tuple[dict, dict[str, int]]:
    """A config file's values and the line of each dotted key."""
    if not path.is_file():
        raise PlanktonioError(f"config file {path}: not found")
    try:
        text = path.read_text()
        node = yaml.compose(text, Loader=_YamlLoader)
        values = parse_yaml(text) or {}
    except (OSError, UnicodeDecodeError) as error:
        raise PlanktonioError(f"config file {path}: cannot be read ({error})") from None
    except yaml.YAMLError as error:
        reason = " ".join(str(error).split())  # PyYAML's message spans lines
        raise PlanktonioError(f"config file {path}: not valid YAML ({reason})") from None
    if not isinstance(values, dict):
        raise PlanktonioError(f"config file {path}: expected a mapping of sections at the top level")
    return values, _key_lines(node) if node is not None else {}


def apply_override(values: dict[str, Any], assignment: str) -> str:
    """Apply one `section.key=value` (value parsed as YAML: 5, 1e-3, true, null, [1, 2]); returns the key."""
    key, sep, text = assignment.partition("=")
    if not sep or not key:
        raise PlanktonioError(f"--set expects section.key=value, got {assignment!r}")
    parts = key.split(".")
    target = values
    for part in parts[:-1]:
        target = target.setdefault(part, {})
        if not isinstance(target, dict):
            raise PlanktonioError(f"--set {assignment}: {part} is not a section")
    try:
        target[parts[-1]] = parse_yaml(text) if text.strip() else None
    except yaml.YAMLError as error:
        raise PlanktonioError(f"--set {assignment}: cannot parse {text!r} ({' '.join(str(error).split())})") from None
    return key


def _where(problem: Problem, path: Path | None, lines: dict[str, int], overrides: dict[str, str]) -> str:
    """The problem's message, prefixed with where its value came from: a --set, or the file's line."""
    for key, assignment in overrides.items():
        if problem.key == key or problem.key.startswith(key + ".") or key.startswith(problem.key + "."):
            return f"--set {assignment}: {problem.message}"
    if path is None:
        return problem.message
    line = next((lines[k] for k in (problem.key, problem.key.rpartition(".")[0]) if k in lines), None)
    return f"{path}{f':{line}' if line else ''}: {problem.message}"


def load(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """The config in a YAML file (or the defaults), with `--set` overrides applied after it."""
    values, lines = ({}, {}) if path is None else read_file(Path(path))
    given = {apply_override(values, assignment): assignment for assignment in overrides}
    try:
        return from_dict(values)
    except SettingsError as error:
        where = [_where(p, None if path is None else Path(path), lines, given) for p in error.problems]
        raise PlanktonioError("bad config: " + "; ".join(where)) from None


def dump(config: Config) -> str:
    return yaml.safe_dump(config.to_dict(), sort_keys=False)


def field_names(section: str) -> list[str]:
    return [f.name for f in fields(SECTIONS[section])]

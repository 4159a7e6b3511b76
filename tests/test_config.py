"""The training config (train/config.py): read as written, every bad value a one-line error naming where it
came from, and any input either a valid Config or such an error (property tests)."""

from __future__ import annotations

from dataclasses import fields

import pytest
from hypothesis import given, settings, strategies as st

from planktonio import PlanktonioError
from planktonio.transforms import Transform
from train import config as config_module

from .helpers import REPO

STUDY = REPO / "train" / "configs" / "study.yaml"


def test_shipped_configs_are_valid():
    for name in ("study", "fast", "demo"):
        config_module.load(REPO / "train" / "configs" / f"{name}.yaml")


@pytest.mark.parametrize("override, message", [
    ("training.epoch=3", "--set training.epoch=3: unknown key .training.epoch."),
    ("trainin.epochs=3", "unknown config section"),
    ("training.precision=fp8", "training.precision must be one of"),
    ("loader.batch_size=many", "loader.batch_size: expected an integer"),
    ("model.freeze=most", "model.freeze must be one of"),
    ("augment.train.crop=random", "augment.train.*crop must be one of"),
    ("augment.train.flip=0.5", "unknown transform key"),
    ("optimizer.momentum=-1", "optimizer.momentum must be in"),
    ("training.seed=100000000000000000000", "training.seed must be in"),
    ("training.device=cuda:abc", "training.device must be"),
    ("optimizer.lr=.nan", "expected a finite number"),
    ("augment.train.scale=0.5", "scale must be a list of 2 numbers"),
    ("augment.train.hflip=yes", "hflip is a probability"),
    ("augment.train=5", "a transform is a mapping"),
])
def test_bad_values_are_one_line_errors_naming_the_set(override, message):
    with pytest.raises(PlanktonioError, match=message) as error:
        config_module.load(STUDY, [override])
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("values, message", [
    ({"scale": 0.5}, "scale must be a list of 2 numbers"),
    ({"hflip": "yes"}, "hflip is a probability"),
    ({"size": True}, "size must be a positive integer"),
    ({"std": [0, 1, 1]}, "std positive"),
])
def test_bad_transform_values_are_clear_errors(values, message):
    with pytest.raises(PlanktonioError, match=message):
        Transform.from_dict(values)
    with pytest.raises(PlanktonioError, match="a transform is a mapping"):
        Transform.from_dict(5)


def test_numbers_in_scientific_notation_are_numbers(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optimizer:\n  lr: 1e-3\n  weight_decay: 3E-4\ntraining:\n  checkpoint_every_s: 1e2\n")
    config = config_module.load(path, ["optimizer.momentum=5e-1"])
    assert (config.optimizer.lr, config.optimizer.weight_decay) == (0.001, 0.0003)
    assert config.training.checkpoint_every_s == 100.0 and config.optimizer.momentum == 0.5


def test_on_and_off_are_the_words_they_look_like(tmp_path):
    """YAML 1.1 would read `off` as false (and refuse it for a choice of words); YAML 1.2 reads a string."""
    path = tmp_path / "c.yaml"
    path.write_text("training:\n  feature_cache: off\n  progress: false\n")
    config = config_module.load(path, ["training.tensorboard=true"])
    assert config.training.feature_cache == "off" and config.training.progress is False
    assert config_module.load(None, ["training.feature_cache=on"]).training.feature_cache == "on"
    with pytest.raises(PlanktonioError, match=r"--set training.progress=yes: training.progress: expected true or "
                                              r"false, got 'yes'"):
        config_module.load(None, ["training.progress=yes"])


def test_a_bad_set_value_names_the_set_and_a_bad_file_value_its_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optimizer:\n  lr: -1\n")
    with pytest.raises(PlanktonioError, match=rf"{path}:2: optimizer.lr must be >= 0"):
        config_module.load(path)
    with pytest.raises(PlanktonioError, match=r"--set training.epochs=zero: training.epochs: expected an integer"):
        config_module.load(None, ["training.epochs=zero"])


def test_a_duplicated_key_is_an_error_naming_it_and_its_lines(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optimizer:\n  lr: 0.1\n  momentum: 0.9\n  lr: 0.01\n")
    with pytest.raises(PlanktonioError, match=r"duplicate key 'lr' at line 4 \(first given at line 2\)"):
        config_module.load(path)


def _spell(value: float, style: int) -> str:
    """A finite float as people write it: 0.001, 1.000000e-03, 1.000000E-03, 1.000e5 (no exponent sign), 1e-03."""
    return [repr(value), f"{value:e}", f"{value:E}", f"{value:.3e}".replace("e+", "e"), f"{value:g}"][style]


@settings(max_examples=200, deadline=None)
@given(value=st.floats(min_value=1e-12, max_value=1e6, allow_nan=False), style=st.integers(0, 4),
       via_set=st.booleans())
def test_any_spelling_of_a_number_reads_as_that_number(tmp_path_factory, value, style, via_set):
    text = _spell(value, style)
    if via_set:
        config = config_module.load(None, [f"optimizer.lr={text}"])
    else:
        path = tmp_path_factory.mktemp("spelling") / "c.yaml"
        path.write_text(f"optimizer:\n  lr: {text}\n")
        config = config_module.load(path)
    assert config.optimizer.lr == float(text)


VALUES = st.one_of(st.none(), st.booleans(), st.integers(min_value=-2**70, max_value=2**70),
                   st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
                   st.lists(st.floats(allow_nan=True), max_size=4), st.dictionaries(st.text(max_size=5), st.integers(),
                                                                                  max_size=2))


@settings(max_examples=400, deadline=None)
@given(data=st.data())
def test_config_validation_gives_a_config_or_a_one_line_error(data):
    """Property: any value for any key (and any junk key) gives a valid Config or a PlanktonioError."""
    section = data.draw(st.sampled_from([*config_module.SECTIONS, "augment", "junk"]))
    if section == "augment":
        key = data.draw(st.sampled_from(["train", "eval"]))
        sub = data.draw(st.sampled_from(["crop", "size", "resize", "scale", "ratio", "hflip", "mean", "std", "x"]))
        values = {"augment": {key: {sub: data.draw(VALUES)}}}
    elif section == "junk":
        values = {data.draw(st.text(max_size=8)): data.draw(VALUES)}
    else:
        key = data.draw(st.sampled_from([f.name for f in fields(config_module.SECTIONS[section])] + ["x"]))
        values = {section: {key: data.draw(VALUES)}}
    try:
        config = config_module.from_dict(values)
    except PlanktonioError as error:
        assert str(error).strip() and "\n" not in str(error)
        return
    assert isinstance(config, config_module.Config)
    config.transform("train"), config.transform("eval")  # a config that loads has transforms that build

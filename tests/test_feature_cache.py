"""The feature cache: the same run as without it, from a frozen prefix computed once per image.

Cached and uncached runs of one config end with the same weights and the same metrics lines (timing
fields aside). On this CPU in fp32 they are bitwise equal: the prefix's kernels (oneDNN convolutions,
pooling) give each image the same values whatever batch it is computed in, so no tolerance is needed;
the tests say so by comparing exactly. AlexNet runs at 64 px (its adaptive pooling makes small inputs
work) to stay quick.
"""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch

from planktonio import PlanktonioError
from train import config as config_module
from train import loop
from train.feature_cache import find_cut
from train.loop import fit
from train.model import build_model

from .helpers import torchrun

TIMING = ("images_per_s", "data_wait_fraction", "epoch_seconds")
CENTRE = {"crop": "center", "size": 64, "resize": 72}


def settings(model="alexnet", freeze="all-but-head", train=CENTRE, **training):
    return {"model": {"name": model, "freeze": freeze},
            "loader": {"backend": "torchvision", "batch_size": 8, "workers": 0},
            "optimizer": {"name": "sgd", "lr": 0.01}, "training": {"epochs": 2, "progress": False, "seed": 1,
                                                                   **training},
            "augment": {"train": train, "eval": CENTRE}}


def metrics(run):
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING}
            for line in (run / "metrics.jsonl").read_text().splitlines()]


def weights(run):
    return torch.load(run / "last.pt", weights_only=True)["model"]


def assert_same_run(a, b):
    assert metrics(a) == metrics(b)
    wa, wb = weights(a), weights(b)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def summary(run):
    return json.loads((run / "summary.json").read_text())


@pytest.mark.parametrize("model, freeze, values", [("alexnet", "all-but-head", 9216), ("alexnet", "features", 9216),
                                                   ("tiny-cnn", "all-but-head", 64)])
def test_a_cached_run_is_the_uncached_run(synthetic, tmp_path, model, freeze, values):
    cached, plain = settings(model, freeze), settings(model, freeze, feature_cache="off")
    assert fit(config_module.from_dict(cached), synthetic, tmp_path / "cached") == 0
    assert fit(config_module.from_dict(plain), synthetic, tmp_path / "plain") == 0
    assert_same_run(tmp_path / "cached", tmp_path / "plain")
    used = summary(tmp_path / "cached")["feature_cache"]
    assert used["used"] and used["values_per_image"] == values and used["bytes"] > 0 and used["seconds"] > 0
    assert summary(tmp_path / "cached")["test_of_best"] == summary(tmp_path / "plain")["test_of_best"]
    assert not summary(tmp_path / "plain")["feature_cache"]["used"]


def test_periodic_random_crops_keep_one_view_per_period(synthetic, tmp_path):
    """Random-resized crops and flips whose plans repeat every 2 epochs: 2 views of each training image kept;
    3 epochs use views 0, 1, 0, as the uncached run's plans do."""
    random = {"crop": "random_resized", "size": 64, "resize": 72, "scale": [0.4, 1.0], "hflip": 0.5, "period": 2}
    for name, mode in (("cached", "auto"), ("plain", "off")):
        assert fit(config_module.from_dict(settings("tiny-cnn", train=random, epochs=3, feature_cache=mode)),
                   synthetic, tmp_path / name) == 0
    assert_same_run(tmp_path / "cached", tmp_path / "plain")
    assert summary(tmp_path / "cached")["feature_cache"]["views"] == 2


def test_a_cached_run_stopped_mid_epoch_resumes_to_the_same_end(synthetic, tmp_path, monkeypatch):
    config = config_module.from_dict(settings(epochs=3, check_every=2))
    assert fit(config_module.from_dict(settings(epochs=3, check_every=2, feature_cache="off")), synthetic,
               tmp_path / "plain") == 0
    taken = {"steps": 0}
    step = loop.train_step

    def stopping_step(*args, **kwargs):
        result = step(*args, **kwargs)
        taken["steps"] += 1
        if taken["steps"] == 11:  # epoch 1's third step: the flag is seen at its fourth
            os.kill(os.getpid(), signal.SIGTERM)
        return result
    with monkeypatch.context() as patch:
        patch.setattr(loop, "train_step", stopping_step)
        assert fit(config, synthetic, tmp_path / "cached") == 75
    assert torch.load(tmp_path / "cached" / "last.pt", weights_only=True)["batches_done"] == 4
    assert fit(config, synthetic, tmp_path / "cached", resume=True) == 0
    assert summary(tmp_path / "cached")["feature_cache"]["source"].startswith("read from")  # not computed again
    assert_same_run(tmp_path / "cached", tmp_path / "plain")


def test_two_gloo_ranks_cached_and_uncached_end_alike(synthetic, tmp_path):
    """Each rank computes its share of the one pass; the shares are gathered; the runs end alike."""
    runs = {}
    for name, mode in (("cached", "auto"), ("plain", "off")):
        config = tmp_path / f"{name}.yaml"
        config.write_text(json.dumps(settings(feature_cache=mode)))
        done = torchrun("-m", "train", "fit", "--config", config, "--data", synthetic, "--out", tmp_path / name)
        assert done.returncode == 0, done.stdout + done.stderr
        runs[name] = done.stdout
    assert "feature cache: computed" in runs["cached"] and "feature cache" not in runs["plain"]
    assert_same_run(tmp_path / "cached", tmp_path / "plain")


# ------------------------------------------------------------------ the file and its fingerprint


def cache_files(run):
    return sorted((run / "feature-cache").glob("features-*.pt"))


def test_a_changed_input_recomputes_and_a_damaged_file_is_never_read(synthetic, tmp_path):
    shared = str(tmp_path / "shared-cache")
    base = settings("tiny-cnn", feature_cache_dir=shared)
    runs = 0

    def run(values, expect):
        nonlocal runs
        runs += 1
        out = tmp_path / f"run{runs}"
        assert fit(config_module.from_dict(values), synthetic, out) == 0
        assert summary(out)["feature_cache"]["source"].startswith(expect), (values, summary(out)["feature_cache"])
        return out

    run(base, "computed")
    run({**base, "optimizer": {"name": "sgd", "lr": 0.5}}, "read from")  # a sweep's other learning rate
    other_eval = dict(base, augment={"train": CENTRE, "eval": {**CENTRE, "resize": 80}})
    run(other_eval, "computed")                                           # another transform
    run(dict(base, training={**base["training"], "precision": "amp-bf16"}), "computed")  # another dtype
    other_weights = tmp_path / "other.pth"
    torch.manual_seed(7)
    torch.save(build_model("tiny-cnn", 4).state_dict(), other_weights)
    run(dict(base, model={**base["model"], "weights": str(other_weights)}), "computed")  # another prefix
    files = sorted((tmp_path / "shared-cache").glob("features-*.pt"))
    assert len(files) == 4
    first = files[0]
    data = first.read_bytes()
    for damaged in (data[: len(data) // 2], data[:-100] + bytes(100)):  # cut short; changed bytes
        for path in files:
            path.write_bytes(damaged)
        out = run(base, "computed")
        assert summary(out)["feature_cache"]["used"]


def test_another_manifest_is_another_cache(synthetic, tmp_path):
    import shutil
    copy = tmp_path / "data"
    shutil.copytree(synthetic, copy)
    (copy / "valid.txt").write_text("\n".join((copy / "valid.txt").read_text().splitlines()[:-1]) + "\n")
    info = json.loads((copy / "image_info.json").read_text())
    info["valid"] = {k: v[:-1] for k, v in info["valid"].items()}
    (copy / "image_info.json").write_text(json.dumps(info))
    shared = str(tmp_path / "cache")
    for data, name in ((synthetic, "a"), (copy, "b")):
        assert fit(config_module.from_dict(settings("tiny-cnn", feature_cache_dir=shared)), data, tmp_path / name) == 0
        assert summary(tmp_path / name)["feature_cache"]["source"] == "computed"


# ------------------------------------------------------------------ when it applies


@pytest.mark.parametrize("change, reason", [
    ({"augment": {"train": {"crop": "random_resized", "size": 64, "resize": 72}}}, "does not repeat"),
    ({"model": {"name": "tiny-cnn", "freeze": "none"}}, "nothing before it to compute once"),
    ({"training": {"feature_cache_budget_bytes": 1000}}, "over .* cache budget"),
])
def test_auto_stays_off_with_its_reason_and_on_refuses(synthetic, tmp_path, capsys, change, reason):
    values = settings("tiny-cnn")
    for section, update in change.items():
        values[section] = {**values[section], **update}
    assert fit(config_module.from_dict(values), synthetic, tmp_path / "auto") == 0
    assert "feature cache off:" in capsys.readouterr().out and not summary(tmp_path / "auto")["feature_cache"]["used"]
    values["training"]["feature_cache"] = "on"
    with pytest.raises(PlanktonioError, match=f"training.feature_cache on: it cannot apply here: .*{reason}"):
        fit(config_module.from_dict(values), synthetic, tmp_path / "on")


def test_where_each_model_is_cut():
    alexnet = find_cut(build_model("alexnet", 4, freeze_mode="all-but-head"))
    assert alexnet.names[-2:] == ["avgpool", "flatten"] and "classifier.0 (Dropout" in alexnet.at
    probe = find_cut(build_model("alexnet", 4, freeze_mode="all-but-head"), frozen_eval=True)
    assert probe.names[-1] == "classifier.5" and "classifier.6 (Linear, which trains)" in probe.at  # the head
    resnet = find_cut(build_model("resnet18", 4, freeze_mode="all-but-head"))
    assert resnet.names[-1] == "flatten" and "fc (Linear" in resnet.at
    assert "its first module, features.0, trains" in find_cut(build_model("tiny-cnn", 4))
    assert "not a sequence of modules" in find_cut(build_model("squeezenet1_1", 4, freeze_mode="all-but-head"))


def test_a_linear_probe_is_another_recipe_cut_at_the_head(synthetic, tmp_path):
    """frozen_mode eval: AlexNet's frozen fc6/fc7 run without dropout, so each epoch is the head alone on
    4,096 kept values per image; cached and uncached it is one run, and it differs from the study's recipe."""
    probe = settings()
    probe["model"]["frozen_mode"] = "eval"
    assert fit(config_module.from_dict(probe), synthetic, tmp_path / "probe") == 0
    off = json.loads(json.dumps(probe))
    off["training"]["feature_cache"] = "off"
    assert fit(config_module.from_dict(off), synthetic, tmp_path / "probe-plain") == 0
    assert_same_run(tmp_path / "probe", tmp_path / "probe-plain")
    assert summary(tmp_path / "probe")["feature_cache"]["values_per_image"] == 4096
    assert fit(config_module.from_dict(settings()), synthetic, tmp_path / "study") == 0
    assert metrics(tmp_path / "probe") != metrics(tmp_path / "study")

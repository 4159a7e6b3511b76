"""The training program: learning, freezing, precision, checkpoints, resume, signals, DDP, errors.

AlexNet from random initialisation barely moves in a few CPU epochs, and no
pretrained weights can be downloaded here, so learning is shown with
tiny-cnn through the same code path (config, loaders, loop, checkpoints),
and AlexNet is tested for structure, freezing, precision and checkpoints.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import torchvision

from planktonio import PlanktonioError, prepare
from planktonio.dataset import SplitPlan
from train import config as config_module
from train import loop
from train.loop import Trainer, fit
from train.model import build_model
from train.signals import EXIT_INTERRUPTED, EXIT_NON_FINITE

from .conftest import REPO

SMALL = {  # tiny-cnn at 64 px: a CPU epoch of 160 images takes about a second
    "model": {"name": "tiny-cnn"},
    "loader": {"backend": "torchvision", "batch_size": 16, "workers": 0},
    "optimizer": {"name": "adamw", "lr": 0.003},
    "training": {"epochs": 3, "patience": 10, "progress": False, "seed": 1},
    "augment": {"train": {"crop": "random_resized", "size": 64, "resize": 72, "scale": [0.4, 1.0], "hflip": 0.5},
                "eval": {"crop": "center", "size": 64, "resize": 72}},
}


def small_config(**sections):
    values = json.loads(json.dumps(SMALL))
    for section, updates in sections.items():
        values[section].update(updates)
    return config_module.from_dict(values)


@pytest.fixture(scope="module")
def plankton(tmp_path_factory):
    """4 synthetic classes x 60 images (40/10/10), the data the runs learn from."""
    from planktonio.synth import synthesize
    root = tmp_path_factory.mktemp("plankton")
    synthesize(root / "images", classes="copepod,chaetognath,diatom_chain,radiolarian", per_class=60, size=128)
    prepare(root / "images", root / "prepared", plan=SplitPlan(per_class=(40, 10, 10)), workers=1)
    return root / "prepared"


def read_metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def run_cli(*args, env=None, **kwargs):
    return subprocess.run([sys.executable, "-m", "train", *args], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, **kwargs)


# ------------------------------------------------------------------ learning


@pytest.mark.parametrize("backend", ["torchvision", "dali-cpu"])
def test_a_short_run_learns(plankton, tmp_path, backend):
    """Bound: validation accuracy >= 0.6 after 8 epochs, chance being 0.25 (4 classes)."""
    config = small_config(loader={"backend": backend, "workers": 2 if backend == "dali-cpu" else 0},
                          training={"epochs": 8, "precision": "amp"}, optimizer={"schedule": "cosine"})
    assert fit(config, plankton, tmp_path / "run") == 0
    metrics = read_metrics(tmp_path / "run")
    assert [m["epoch"] for m in metrics] == list(range(8))
    assert max(m["val_acc"] for m in metrics) >= 0.6
    assert metrics[-1]["train_loss"] < metrics[0]["train_loss"]
    assert all(m["val_images"] == 40 and m["train_images"] == 160 for m in metrics)
    assert all(0 <= m["data_wait_fraction"] <= 1 and m["images_per_s"] > 0 for m in metrics)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["stop_reason"] == "max_epochs" and summary["epochs_run"] == 8
    assert summary["best_val_loss"] == min(m["val_loss"] for m in metrics)
    assert summary["test_of_best"]["images"] == 40
    assert summary["precision"] == "amp-bf16"


def test_early_stopping_keeps_the_best_checkpoint(plankton, tmp_path):
    # lr 0 and frozen features (BatchNorm statistics too): the validation loss never
    # improves after the first epoch, so patience 2 stops after epoch 2.
    config = small_config(model={"freeze": "features"}, optimizer={"lr": 0.0}, training={"epochs": 10, "patience": 2})
    assert fit(config, plankton, tmp_path / "run") == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["stop_reason"] == "early_stopping" and summary["epochs_run"] == 3
    assert torch.load(tmp_path / "run" / "best.pt")["epoch"] == summary["best_epoch"] == 0


# ------------------------------------------------------------------ AlexNet


def test_alexnet_head_and_freezing_modes():
    model = build_model("alexnet", 17, freeze_mode="all-but-head")
    assert model.classifier[6].out_features == 17 and model.classifier[6].in_features == 4096
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["classifier.6.weight", "classifier.6.bias"]
    features = build_model("alexnet", 17, freeze_mode="features")
    trainable = {n for n, p in features.named_parameters() if p.requires_grad}
    assert trainable == {f"classifier.{i}.{w}" for i in (1, 4, 6) for w in ("weight", "bias")}
    assert all(p.requires_grad for p in build_model("alexnet", 17).parameters())


@pytest.mark.parametrize("name, head", [("vgg11", "classifier.6"), ("resnet18", "fc"), ("squeezenet1_1", "classifier.1")])
def test_other_torchvision_models_get_a_new_head(name, head):
    model = build_model(name, 5, freeze_mode="all-but-head")
    trainable = {n.rsplit(".", 1)[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {head}
    assert model(torch.randn(1, 3, 96, 96) if name != "vgg11" else torch.randn(1, 3, 64, 64)).shape == (1, 5)


def test_alexnet_transfer_step_keeps_frozen_weights_and_trains_the_head(plankton, tmp_path):
    """The study's recipe on AlexNet (small images for speed): frozen weights bit-identical, head changed."""
    weights = tmp_path / "alexnet-owt-test.pth"
    torch.save(torchvision.models.alexnet().state_dict(), weights)  # stands in for the ImageNet file
    config = small_config(model={"name": "alexnet", "weights": str(weights), "freeze": "all-but-head"},
                          optimizer={"name": "sgd", "lr": 0.01}, training={"epochs": 1, "precision": "amp-bf16"})
    assert fit(config, plankton, tmp_path / "run") == 0
    trained = torch.load(tmp_path / "run" / "last.pt", weights_only=False)["model"]
    original = torch.load(weights)
    for key, value in original.items():
        if not key.startswith("classifier.6."):
            assert torch.equal(trained[key], value), key
    assert trained["classifier.6.weight"].shape == (4, 4096)
    torch.manual_seed(1)  # seeded like the run (training.seed): the same initial head
    initial_head = build_model("alexnet", 4, str(weights)).classifier[6].weight
    assert not torch.equal(trained["classifier.6.weight"], initial_head)


def test_precision_modes_run_in_their_dtype(plankton, tmp_path):
    images = torch.randn(2, 3, 64, 64)
    for precision, dtype in (("fp32", torch.float32), ("amp-bf16", torch.bfloat16), ("amp", torch.bfloat16)):
        trainer = Trainer(small_config(model={"name": "alexnet"}, training={"precision": precision}),
                          plankton, tmp_path)
        assert trainer._forward(images).dtype == dtype
        assert trainer.scaler.is_enabled() is False  # loss scaling only for fp16


def test_frozen_features_stay_bit_identical(plankton, tmp_path):
    config = small_config(model={"freeze": "features"}, training={"epochs": 2})
    torch.manual_seed(1)
    initial = build_model("tiny-cnn", 4, freeze_mode="features").state_dict()
    assert fit(config, plankton, tmp_path / "run") == 0
    trained = torch.load(tmp_path / "run" / "best.pt")["model"]
    for key, value in initial.items():
        if key.startswith("features."):  # BatchNorm running statistics included
            assert torch.equal(trained[key], value), key
        else:
            assert not torch.equal(trained[key], value), key


def test_best_checkpoint_serves_as_weights_of_a_new_run(plankton, tmp_path):
    assert fit(small_config(training={"epochs": 1}), plankton, tmp_path / "pre") == 0
    model = build_model("tiny-cnn", 7, str(tmp_path / "pre" / "best.pt"), "all-but-head")
    best = torch.load(tmp_path / "pre" / "best.pt")["model"]
    assert torch.equal(model.features[0].weight, best["features.0.weight"])
    assert model.classifier[1].out_features == 7


# ------------------------------------------------------------------ resume and signals


def _raise_sigterm_at(monkeypatch, step: int):
    """Send this process a real SIGTERM when the run has taken `step` training steps."""
    taken = {"n": 0}
    original = loop.EpochStats.add

    def add(self, *args):
        original(self, *args)
        if self.compute_seconds > 0:  # training steps only, not validation
            taken["n"] += 1
            if taken["n"] == step:
                os.kill(os.getpid(), signal.SIGTERM)
    monkeypatch.setattr(loop.EpochStats, "add", add)


@pytest.mark.parametrize("backend, augment, step", [
    ("torchvision", "random", 13),    # per-image seeded augmentation: exact from any step
    ("dali-cpu", "centre-crop", 13),  # DALI: exact from any step with the study's deterministic transform
    ("dali-cpu", "random", 9),        # the flag seen in the epoch's last step: stops at the boundary
])
def test_interrupted_and_resumed_run_ends_like_an_uninterrupted_one(plankton, tmp_path, monkeypatch, backend,
                                                                    augment, step):
    overrides = {"loader": {"backend": backend, "workers": 2 if backend == "dali-cpu" else 0}}
    if augment == "centre-crop":
        overrides["augment"] = {"train": SMALL["augment"]["eval"]}
    config = small_config(**overrides)
    assert fit(config, plankton, tmp_path / "whole") == 0

    with monkeypatch.context() as patch:
        _raise_sigterm_at(patch, step=step)  # 10 steps per epoch
        assert fit(config, plankton, tmp_path / "split") == EXIT_INTERRUPTED
    state = torch.load(tmp_path / "split" / "last.pt", weights_only=False)
    if step == 13:  # mid-way through epoch 1: stopped after the step in flight
        assert state["epoch"] == 1 and 3 <= state["batches_done"] <= 4
        assert len(read_metrics(tmp_path / "split")) == 1
    else:  # during epoch 0's last step: epoch 0 completes (validated, logged), then the run stops
        assert (state["epoch"], state["batches_done"]) == (1, 0)
        assert [m["epoch"] for m in read_metrics(tmp_path / "split")] == [0]
    with pytest.raises(PlanktonioError, match="already holds a run"):
        fit(config, plankton, tmp_path / "split")
    assert fit(config, plankton, tmp_path / "split", resume=True) == 0

    whole = torch.load(tmp_path / "whole" / "last.pt", weights_only=False)["model"]
    split = torch.load(tmp_path / "split" / "last.pt", weights_only=False)["model"]
    assert all(torch.equal(whole[k], split[k]) for k in whole)  # bitwise, on the CPU with fixed seeds
    strip = lambda ms: [{k: v for k, v in m.items() if k not in ("images_per_s", "data_wait_fraction", "epoch_seconds")}
                        for m in ms]
    assert strip(read_metrics(tmp_path / "whole")) == strip(read_metrics(tmp_path / "split"))


def test_sigterm_leaves_a_loadable_checkpoint_and_exit_75(plankton, tmp_path):
    run = tmp_path / "run"
    config = tmp_path / "small.yaml"
    config.write_text(json.dumps({**SMALL, "training": {**SMALL["training"], "epochs": 30}}))
    process = subprocess.Popen([sys.executable, "-m", "train", "fit", "--config", str(config), "--data",
                                str(plankton), "--out", str(run)], cwd=REPO, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while not (run / "metrics.jsonl").exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.1)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == EXIT_INTERRUPTED, output
    assert "stopping on SIGTERM" in output and "--resume" in output
    state = torch.load(run / "last.pt", weights_only=False)
    assert state["finished"] is None and 1 <= state["epoch"] < 30
    build_model("tiny-cnn", 4).load_state_dict(state["model"])


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(plankton, tmp_path, monkeypatch):
    calls = {"n": 0}
    from train import step
    original = step.F.cross_entropy

    def poisoned(logits, labels):
        calls["n"] += 1
        loss = original(logits, labels)
        return loss * float("nan") if calls["n"] == 10 + 3 + 4 else loss  # epoch 1, step 4 (after 3 valid batches)
    monkeypatch.setattr(step.F, "cross_entropy", poisoned)
    assert fit(small_config(), plankton, tmp_path / "run") == EXIT_NON_FINITE
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=False)
    assert (state["epoch"], state["batches_done"]) == (1, 0)  # the end of epoch 0: the last good state
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["stop_reason"] == "non_finite_loss"


# ------------------------------------------------------------------ distributed


def test_two_process_gloo_run_with_dali_shards(plankton, tmp_path):
    config = tmp_path / "ddp.yaml"
    config.write_text(json.dumps({**SMALL, "loader": {"backend": "dali-cpu", "batch_size": 16, "workers": 1},
                                  "training": {**SMALL["training"], "epochs": 2}}))
    run = tmp_path / "run"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    result = subprocess.run([*torchrun, "-m", "train", "fit", "--config", str(config), "--data", str(plankton),
                             "--out", str(run)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 process(es)" in result.stdout
    metrics = read_metrics(run)
    # 160 training images: each rank takes 80, 5 steps of 16; 40 validation images, each seen once.
    assert all(m["train_images"] == 160 and m["val_images"] == 40 for m in metrics)
    # The same accuracy logic as one process: evaluate the final weights alone, on the validation split.
    single = run_cli("evaluate", "--run", str(run), "--split", "valid", "--checkpoint", "last")
    assert single.returncode == 0, single.stderr
    evaluation = json.loads((run / "eval-valid.json").read_text())
    assert evaluation["images"] == 40
    assert evaluation["acc"] == pytest.approx(metrics[-1]["val_acc"], abs=1e-9)
    assert evaluation["loss"] == pytest.approx(metrics[-1]["val_loss"], rel=1e-3)


# ------------------------------------------------------------------ evaluation


def test_evaluate_writes_per_class_scores_and_confusion(plankton, tmp_path):
    assert fit(small_config(training={"epochs": 2}), plankton, tmp_path / "run") == 0
    result = run_cli("evaluate", "--run", str(tmp_path / "run"), "--split", "test")
    assert result.returncode == 0, result.stderr
    evaluation = json.loads((tmp_path / "run" / "eval-test.json").read_text())
    assert evaluation["images"] == 40 and set(evaluation["per_class"]) == {
        "chaetognath", "copepod", "diatom_chain", "radiolarian"}
    rows = (tmp_path / "run" / "confusion-test.csv").read_text().splitlines()
    counts = [list(map(int, row.split(",")[1:])) for row in rows[1:]]
    assert sum(map(sum, counts)) == 40 and all(sum(row) == 10 for row in counts)
    assert sum(counts[i][i] for i in range(4)) / 40 == pytest.approx(evaluation["acc"])
    assert (tmp_path / "run" / "confusion-test.png").read_bytes()[:4] == b"\x89PNG"


# ------------------------------------------------------------------ errors


@pytest.mark.parametrize("override, message", [
    ("training.epoch=3", "unknown config key.*training.epoch"),
    ("trainin.epochs=3", "unknown config section"),
    ("training.precision=fp8", "training.precision must be one of"),
    ("loader.batch_size=many", "loader.batch_size: expected an integer"),
    ("model.freeze=most", "model.freeze must be one of"),
    ("augment.train.crop=random", "augment.train.*crop must be one of"),
    ("augment.train.flip=0.5", "unknown transform key"),
])
def test_bad_configs_are_clear_errors(tmp_path, override, message):
    with pytest.raises(PlanktonioError, match=message):
        config_module.load(REPO / "train" / "configs" / "study.yaml", [override])


def test_shipped_configs_are_valid():
    for name in ("study", "fast", "demo"):
        config_module.load(REPO / "train" / "configs" / f"{name}.yaml")


def test_missing_and_mismatched_weights_are_clear_errors(tmp_path, plankton):
    with pytest.raises(PlanktonioError, match="weights file .*nowhere.pth: not found"):
        build_model("alexnet", 4, str(tmp_path / "nowhere.pth"))
    resnet = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), resnet)
    with pytest.raises(PlanktonioError, match="does not fit model alexnet: .*missing .*unexpected"):
        build_model("alexnet", 4, str(resnet))
    garbage = tmp_path / "garbage.pth"
    garbage.write_text("not a checkpoint")
    with pytest.raises(PlanktonioError, match="cannot be read"):
        build_model("alexnet", 4, str(garbage))
    result = run_cli("fit", "--config", "train/configs/study.yaml", "--data", str(plankton),
                     "--out", str(tmp_path / "run"))
    assert result.returncode == 2 and "alexnet-owt-7be5be79.pth: not found" in result.stderr
    assert "Traceback" not in result.stderr


# ------------------------------------------------------------------ real images


def test_short_run_on_real_plankton(tmp_path, ndsb):
    prepare(ndsb, tmp_path / "prepared", min_images=500, plan=SplitPlan(per_class=(40, 10, 10)))
    config = small_config(loader={"backend": "dali-cpu", "workers": 2}, training={"epochs": 2})
    assert fit(config, tmp_path / "prepared", tmp_path / "run") == 0
    metrics = read_metrics(tmp_path / "run")
    assert len(metrics) == 2 and all(m["val_images"] == 70 for m in metrics)  # 7 classes >= 500 images
    assert all(torch.isfinite(torch.tensor(m["train_loss"])) for m in metrics)


def test_top1_and_top5_counts_on_known_logits():
    from train.metrics import confusion_matrix, per_class_scores, top1_top5_correct
    logits = torch.tensor([[9.0, 1, 2, 3, 4, 5, 6], [0.0, 9, 1, 2, 3, 4, 5], [6.0, 5, 4, 3, 2, 1, 0]])
    labels = torch.tensor([0, 6, 6])  # right; in the top 5 only; outside the top 5
    assert top1_top5_correct(logits, labels) == (1, 2)
    confusion = confusion_matrix(torch.tensor([0, 1, 1, 1]), torch.tensor([0, 1, 1, 0]), 2)
    assert confusion.tolist() == [[1, 1], [0, 2]]
    scores = per_class_scores(confusion)
    assert scores[0] == {"precision": 1.0, "recall": 0.5, "f1": pytest.approx(2 / 3), "support": 2}
    assert scores[1]["precision"] == pytest.approx(2 / 3) and scores[1]["recall"] == 1.0

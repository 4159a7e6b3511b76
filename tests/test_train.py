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
from train.executor import Executor
from train.loop import fit
from train.model import build_model
from train.signals import EXIT_INTERRUPTED, EXIT_NON_FINITE
from train.step import make_scaler

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


# ------------------------------------------------------------------ the step loop: no host sync per step

# The calls that read a tensor's value on the host: on a GPU each waits for it.
HOST_READS = [(torch.Tensor, name) for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__float__",
                                                "__int__", "__index__")] + [
    (torch.cuda, "synchronize"), (torch.cuda.Event, "synchronize"), (torch.cuda.Event, "elapsed_time")]


def count_host_reads_per_epoch(monkeypatch) -> list[int]:
    """How many HOST_READS each training epoch (Trainer.train_epoch) makes, not counting the loader's own
    work (inside TimedBatches.__next__: the torchvision loader reads its seeds with .item())."""
    counting, per_epoch = [False], []
    for owner, name in HOST_READS:
        def counted(*args, _original=getattr(owner, name), **kwargs):
            if counting[0]:
                per_epoch[-1] += 1
            return _original(*args, **kwargs)
        monkeypatch.setattr(owner, name, counted)

    def switched(method, on: bool):
        def wrapper(*args, **kwargs):
            counting[0] = on
            try:
                return method(*args, **kwargs)
            finally:
                counting[0] = not on
        return wrapper
    train_epoch = loop.Trainer.train_epoch
    monkeypatch.setattr(loop.Trainer, "train_epoch", lambda self, epoch: (
        per_epoch.append(0), switched(train_epoch, True)(self, epoch))[1])
    monkeypatch.setattr(loop.TimedBatches, "__next__", switched(loop.TimedBatches.__next__, False))
    return per_epoch


def test_the_step_loop_reads_the_device_only_at_its_checks(plankton, tmp_path, monkeypatch):
    """On a CPU nothing waits, so the reads are counted instead (see HOST_READS): an epoch of 10 steps
    reads once per check (every check_every steps and at its end) plus once for its sums, and gives the
    same metrics and weights whatever check_every is. SGD: AdamW's CPU kernels read their step count
    (.item()) every step, which its fused GPU kernel does not."""
    runs = {}
    for check_every, reads in ((1, 10 + 1), (4, 3 + 1), (50, 1 + 1)):
        with monkeypatch.context() as patch:
            per_epoch = count_host_reads_per_epoch(patch)
            config = small_config(optimizer={"name": "sgd", "lr": 0.01},
                                  training={"epochs": 2, "check_every": check_every})
            assert fit(config, plankton, tmp_path / str(check_every)) == 0
        assert per_epoch == [reads, reads], check_every
        runs[check_every] = tmp_path / str(check_every)
    timing = ("images_per_s", "data_wait_fraction", "epoch_seconds")
    strip = lambda run: [{k: v for k, v in m.items() if k not in timing} for m in read_metrics(run)]
    weights = {n: torch.load(run / "last.pt", weights_only=False)["model"] for n, run in runs.items()}
    for n in (4, 50):
        assert strip(runs[n]) == strip(runs[1])
        assert all(torch.equal(weights[n][k], weights[1][k]) for k in weights[1])


@pytest.mark.gpu
def test_steps_never_synchronise_on_a_gpu(plankton):
    """torch.cuda.set_sync_debug_mode("error") raises on any synchronising call: fp16 AMP with loss
    scaling, the fused optimizer, device-side sums and the timed batches, step after step."""
    from train.metrics import RunningSums
    from train.step import make_optimizer, train_step
    from train.timing import TimedBatches
    executor = Executor(small_config(training={"precision": "amp-fp16", "device": "cuda", "channels_last": True}),
                        plankton)
    device = executor.device
    optimizer = make_optimizer("sgd", executor.model, device, lr=0.01)
    scaler = make_scaler(executor.precision, device)
    images = torch.randn(16, 3, 64, 64, device=device).half().contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 4, (16,), device=device)
    sums = RunningSums(device)

    def steps(n):
        timed = TimedBatches([(images, labels)] * n, device)
        for x, y in timed:
            loss, logits = train_step(executor.net, optimizer, scaler, x, y, device, executor.amp_dtype)
            sums.add(loss, logits, y)
        return timed
    steps(2)  # lazy initialisation on the first steps (the scaler's scale, the fused optimizer's checks)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        timed = steps(5)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert timed.step_seconds() > 0 and sums.read().images == 7 * 16


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
        executor = Executor(small_config(model={"name": "alexnet"}, training={"precision": precision}), plankton)
        assert executor.forward(images).dtype == dtype
        assert make_scaler(executor.precision, executor.device).is_enabled() is False  # loss scaling only for fp16


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


def count_training_steps(monkeypatch, after=None) -> dict:
    """Count the run's training steps; after(n) is called after step number n (from 1)."""
    taken = {"steps": 0}
    original = loop.train_step

    def train_step(*args, **kwargs):
        result = original(*args, **kwargs)
        taken["steps"] += 1
        if after is not None:
            after(taken["steps"])
        return result
    monkeypatch.setattr(loop, "train_step", train_step)
    return taken


def _raise_sigterm_at(monkeypatch, step: int):
    """Send this process a real SIGTERM right after its training step number `step`."""
    count_training_steps(monkeypatch, lambda n: n == step and os.kill(os.getpid(), signal.SIGTERM))


@pytest.mark.parametrize("backend, augment, step", [
    ("torchvision", "random", 13),    # every backend applies the shared plans: exact from any step
    ("dali-cpu", "random", 13),       # ... DALI too, random crops and flips included
    ("dali-cpu", "centre-crop", 13),
    ("dali-cpu", "random", 9),        # the flag seen at the epoch's last check: stops at the boundary
])
def test_interrupted_and_resumed_run_ends_like_an_uninterrupted_one(plankton, tmp_path, monkeypatch, backend,
                                                                    augment, step):
    overrides = {"loader": {"backend": backend, "workers": 2 if backend == "dali-cpu" else 0},
                 "training": {"check_every": 2}}
    if augment == "centre-crop":
        overrides["augment"] = {"train": SMALL["augment"]["eval"]}
    config = small_config(**overrides)
    assert fit(config, plankton, tmp_path / "whole") == 0

    with monkeypatch.context() as patch:
        _raise_sigterm_at(patch, step=step)  # 10 steps per epoch, a check every 2
        assert fit(config, plankton, tmp_path / "split") == EXIT_INTERRUPTED
    state = torch.load(tmp_path / "split" / "last.pt", weights_only=False)
    if step == 13:  # epoch 1's third step: seen at the next check, after its fourth
        assert (state["epoch"], state["batches_done"]) == (1, 4)
        assert len(read_metrics(tmp_path / "split")) == 1
        # The resumed epoch's images/s counts the time before the stop too, with its images.
        partial = state["ranks"][0]["partial"]
        assert partial["images"] == 4 * 16 and partial["seconds"] > 0
    else:  # seen at epoch 0's last check (its 10th step): epoch 0 completes (validated, logged), then the run stops
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


@pytest.mark.parametrize("check_every, poisoned_step, stopped_after", [(1, 13, 13), (4, 13, 14), (4, 16, 18)])
def test_non_finite_loss_stops_within_n_steps_and_keeps_the_last_good_checkpoint(
        plankton, tmp_path, monkeypatch, check_every, poisoned_step, stopped_after):
    """The NaN of training step k is seen at the first check from k on: with check_every 4, epoch 1
    (steps 11-20) is checked after steps 14, 18 and 20 (its end)."""
    from train import step
    original = step.F.cross_entropy

    def poison_from(n):  # from step `poisoned_step` on, every loss (and so every update) is NaN
        if n == poisoned_step - 1:
            monkeypatch.setattr(step.F, "cross_entropy", lambda *a, **k: original(*a, **k) * float("nan"))
    taken = count_training_steps(monkeypatch, poison_from)
    config = small_config(training={"check_every": check_every, "checkpoint_every_s": 0})
    assert fit(config, plankton, tmp_path / "run") == EXIT_NON_FINITE
    assert poisoned_step <= taken["steps"] <= poisoned_step + check_every - 1
    assert taken["steps"] == stopped_after
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=False)
    assert (state["epoch"], state["batches_done"]) == (1, 0)  # the end of epoch 0: the last good state
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["stop_reason"] == "non_finite_loss"


def test_checkpoints_follow_the_time_budget(plankton, tmp_path, monkeypatch):
    """A clock that moves 10 s a training step (100 s an epoch), a budget of 250 s: last.pt after
    epochs 2 and 5 (300 s after the previous checkpoint) and at the end; best.pt, kept in memory,
    written just before a last.pt whenever it changed."""
    now = {"s": 0.0}
    monkeypatch.setattr(loop.checkpoint, "clock", lambda: now["s"])
    count_training_steps(monkeypatch, lambda n: now.update(s=10.0 * n))
    saved, save_atomic = [], loop.checkpoint.save_atomic

    def recording(state, path):
        saved.append((path.name, state["epoch"]))  # last.pt: epochs done; best.pt: the best epoch
        save_atomic(state, path)
    monkeypatch.setattr(loop.checkpoint, "save_atomic", recording)
    assert fit(small_config(training={"epochs": 7, "checkpoint_every_s": 250}), plankton, tmp_path / "run") == 0
    assert [epoch for name, epoch in saved if name == "last.pt"] == [3, 6, 7]
    assert all(saved[i + 1][0] == "last.pt" for i, (name, _) in enumerate(saved) if name == "best.pt")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert [epoch for name, epoch in saved if name == "best.pt"][-1] == summary["best_epoch"]
    assert torch.load(tmp_path / "run" / "best.pt")["epoch"] == summary["best_epoch"]


def test_resume_with_more_epochs_continues_a_finished_run(plankton, tmp_path):
    run = tmp_path / "run"
    assert fit(small_config(training={"epochs": 2}), plankton, run) == 0
    assert fit(small_config(training={"epochs": 2}), plankton, run, resume=True) == 0  # nothing left to do
    assert len(read_metrics(run)) == 2
    assert fit(small_config(training={"epochs": 4}), plankton, run, resume=True) == 0
    assert fit(small_config(training={"epochs": 4}), plankton, tmp_path / "whole") == 0
    continued = torch.load(run / "last.pt", weights_only=False)
    whole = torch.load(tmp_path / "whole" / "last.pt", weights_only=False)
    assert continued["finished"] == "max_epochs" and continued["epoch"] == 4
    assert all(torch.equal(whole["model"][k], continued["model"][k]) for k in whole["model"])
    timing = ("images_per_s", "data_wait_fraction", "epoch_seconds")
    strip = lambda ms: [{k: v for k, v in m.items() if k not in timing} for m in ms]
    assert strip(read_metrics(run)) == strip(read_metrics(tmp_path / "whole"))
    # From the command line: the run's own config, one more epoch.
    result = run_cli("fit", "--out", str(run), "--data", str(plankton), "--resume", "--set", "training.epochs=5")
    assert result.returncode == 0, result.stderr
    assert "resuming" in result.stdout and "had finished: max_epochs" in result.stdout
    assert [m["epoch"] for m in read_metrics(run)] == [0, 1, 2, 3, 4]
    # What changes the computation is still refused.
    with pytest.raises(PlanktonioError, match="differs from the run's in optimizer.lr"):
        fit(small_config(training={"epochs": 6}, optimizer={"lr": 0.01}), plankton, run, resume=True)


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


def torchrun(*args, env=None):
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           *args], cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def test_two_process_run_stopped_by_sigterm_resumes_bitwise_and_ranks_draw_their_own_dropout(plankton, tmp_path):
    """mobilenet_v3_small (dropout before its last layer), 2 gloo ranks of 5 steps an epoch, a check
    every 2 steps. Rank 1 alone gets SIGTERM after its 3rd step; both stop at the next check. The
    resumed run ends bitwise where the uninterrupted one does, which needs each rank's own random
    state back (restoring rank 0's on both ranks was tried: the weights differ)."""
    config = tmp_path / "ddp.yaml"
    config.write_text(json.dumps({**SMALL, "model": {"name": "mobilenet_v3_small"},
                                  "optimizer": {"name": "sgd", "lr": 0.01},
                                  "training": {**SMALL["training"], "epochs": 2, "check_every": 2}}))
    hooked = ["-m", "tests.fit_with_hooks", "fit", "--config", str(config), "--data", str(plankton)]
    whole = torchrun(*hooked, "--out", str(tmp_path / "whole"), env={"MASKS": str(tmp_path / "masks")})
    assert whole.returncode == 0, whole.stdout + whole.stderr
    masks = [json.loads((tmp_path / "masks" / f"mask-rank{rank}.json").read_text()) for rank in (0, 1)]
    assert masks[0] != masks[1] and all(100 < sum(mask) < 412 for mask in masks)  # 512 draws, p = 0.5

    split = torchrun(*hooked, "--out", str(tmp_path / "split"), env={"SIGTERM_RANK": "1", "SIGTERM_AT_STEP": "3"})
    assert split.returncode != 0 and "stopping on a signal at epoch 0, step 4" in split.stdout, split.stderr
    state = torch.load(tmp_path / "split" / "last.pt", weights_only=False)
    assert (state["epoch"], state["batches_done"]) == (0, 4) and len(state["ranks"]) == 2
    assert not torch.equal(state["ranks"][0]["rng"]["torch"], state["ranks"][1]["rng"]["torch"])
    resumed = torchrun("-m", "train", "fit", "--out", str(tmp_path / "split"), "--data", str(plankton), "--resume")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr

    whole_weights = torch.load(tmp_path / "whole" / "last.pt", weights_only=False)["model"]
    split_weights = torch.load(tmp_path / "split" / "last.pt", weights_only=False)["model"]
    assert all(torch.equal(whole_weights[k], split_weights[k]) for k in whole_weights)
    timing = ("images_per_s", "data_wait_fraction", "epoch_seconds")
    strip = lambda ms: [{k: v for k, v in m.items() if k not in timing} for m in ms]
    assert strip(read_metrics(tmp_path / "whole")) == strip(read_metrics(tmp_path / "split"))


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


def test_evaluate_needs_no_training_split(plankton, tmp_path):
    """Evaluation builds the model and the evaluated split's loader only: a data set whose training
    split makes no full batch (4 images, batch 16) still scores a run."""
    from planktonio import make_loader
    from train.evaluate import evaluate_run
    prepare(plankton.parent / "images", tmp_path / "few", plan=SplitPlan(per_class=(1, 10, 10)), workers=1)
    with pytest.raises(PlanktonioError, match="no full batch"):
        make_loader("torchvision", tmp_path / "few", "train", batch_size=16, workers=0)
    assert fit(small_config(training={"epochs": 1}), plankton, tmp_path / "run") == 0
    result = evaluate_run(tmp_path / "run", "valid", tmp_path / "few", other_data=True)  # not its own data
    assert result["images"] == 40 and set(result["per_class"]) == {
        "chaetognath", "copepod", "diatom_chain", "radiolarian"}


# ------------------------------------------------------------------ errors


@pytest.mark.parametrize("override, message", [
    ("training.epoch=3", "--set training.epoch=3: unknown key .training.epoch."),
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

"""The fit loop (train/loop.py, train/step.py, train/early_stopping.py): a short run learns and records
each epoch, the step loop waits for the device only at its checks, frozen layers stay frozen, precisions
run in their dtypes. AlexNet from random initialisation barely moves in a few CPU epochs, and no
pretrained weights can be downloaded here, so learning is shown with tiny-cnn through the same code path
(config, loaders, loop, checkpoints), and AlexNet is tested for structure, freezing and precision."""

from __future__ import annotations

import json

import pytest
import torch
import torchvision

from planktonio import PlanktonioError, prepare
from planktonio.preparation import SplitPlan
from train import distributed, loop
from train.early_stopping import EarlyStopping
from train.executor import Executor
from train.loop import fit
from train.model import build_model
from train.step import has_bf16_hardware, make_scaler, precisions_for

from .conftest import write_coloured_set
from .helpers import (
    one_line_error,
    read_checkpoint,
    read_metrics,
    run_train,
    same_run,
    small_config,
    weights,
    write_config,
)


def executor_for(config, data) -> Executor:
    """An Executor of one process on the config's device (no process group)."""
    from planktonio.loaders import resolve_device
    ctx = distributed.join(resolve_device(config.training.device), 60)
    return Executor(config, data, ctx)


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


def test_early_stopping_counts_epochs_without_a_better_loss():
    early = EarlyStopping(patience=2)
    assert [early.update(e, loss) for e, loss in enumerate([1.0, 0.8, 0.9, 0.8, 0.7])] == \
        [True, True, False, False, True]
    assert (early.best_epoch, early.bad_epochs, early.should_stop) == (4, 0, False)
    early.update(5, 0.7)
    early.update(6, float("nan"))  # a NaN is never better
    assert early.should_stop and early.best_loss == 0.7
    again = EarlyStopping(patience=2)
    again.load_state_dict(early.state_dict())
    assert again == early


def test_an_empty_validation_split_stops_fit_before_training(tmp_path, capsys):
    source = tmp_path / "source"
    write_coloured_set(source, classes=2, per_class=10, size=16)
    prepare(source, tmp_path / "data", plan=SplitPlan(fractions=(1.0, 0.0, 0.0)), workers=1)
    code, _, err = run_train(["fit", "--config", write_config(tmp_path / "c.yaml"), "--data", tmp_path / "data",
                               "--out", tmp_path / "run"], capsys)
    line = one_line_error(code, err)
    assert "the valid split has no images" in line and not (tmp_path / "run" / "metrics.jsonl").exists()


def test_short_run_on_real_plankton(tmp_path, ndsb):
    prepare(ndsb, tmp_path / "prepared", min_images=500, plan=SplitPlan(per_class=(40, 10, 10)))
    config = small_config(loader={"backend": "dali-cpu", "workers": 2}, training={"epochs": 2})
    assert fit(config, tmp_path / "prepared", tmp_path / "run") == 0
    metrics = read_metrics(tmp_path / "run")
    assert len(metrics) == 2 and all(m["val_images"] == 70 for m in metrics)  # 7 classes >= 500 images
    assert all(torch.isfinite(torch.tensor(m["train_loss"])) for m in metrics)


# ------------------------------------------------------------------ the step loop: no host sync per step


HOST_READS = [(torch.Tensor, name) for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__float__",
                                                "__int__", "__index__")] + [
    (torch.cuda, "synchronize"), (torch.cuda.Event, "synchronize"), (torch.cuda.Event, "elapsed_time")]


def count_host_reads_per_epoch(monkeypatch) -> list[int]:
    """How many HOST_READS each training epoch (Trainer.train_epoch) makes, not counting the loader's own
    work (inside TimedBatches.__next__: the torchvision loader reads its seeds with .item())."""
    counting, per_epoch = [False], []
    def counted(original):
        def wrapper(*args, **kwargs):
            if counting[0]:
                per_epoch[-1] += 1
            return original(*args, **kwargs)
        return wrapper

    for owner, name in HOST_READS:
        monkeypatch.setattr(owner, name, counted(getattr(owner, name)))

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
    for n in (4, 50):
        assert same_run(runs[n], runs[1])


@pytest.mark.gpu
def test_steps_never_synchronise_on_a_gpu(plankton):
    """torch.cuda.set_sync_debug_mode("error") raises on any synchronising call: fp16 AMP with loss
    scaling, the fused optimizer, device-side sums and the timed batches, step after step."""
    from train.metrics import RunningSums
    from train.step import make_optimizer, train_step
    from train.timing import TimedBatches
    executor = executor_for(small_config(training={"precision": "amp-fp16", "device": "cuda", "channels_last": True}),
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


# ------------------------------------------------------------------ freezing and precision


def test_alexnet_transfer_step_keeps_frozen_weights_and_trains_the_head(plankton, tmp_path):
    """The study's recipe on AlexNet (small images for speed): frozen weights bit-identical, head changed."""
    file = tmp_path / "alexnet-owt-test.pth"
    torch.save(torchvision.models.alexnet().state_dict(), file)  # stands in for the ImageNet file
    config = small_config(model={"name": "alexnet", "weights": str(file), "freeze": "all-but-head"},
                          optimizer={"name": "sgd", "lr": 0.01}, training={"epochs": 1, "precision": "amp-bf16"})
    assert fit(config, plankton, tmp_path / "run") == 0
    trained = weights(tmp_path / "run")
    original = torch.load(file)
    for key, value in original.items():
        if not key.startswith("classifier.6."):
            assert torch.equal(trained[key], value), key
    assert trained["classifier.6.weight"].shape == (4, 4096)
    torch.manual_seed(1)  # seeded like the run (training.seed): the same initial head
    initial_head = build_model("alexnet", 4, str(file)).classifier[6].weight
    assert not torch.equal(trained["classifier.6.weight"], initial_head)


def test_precision_modes_run_in_their_dtype(plankton, tmp_path):
    images = torch.randn(2, 3, 64, 64)
    for precision, dtype in (("fp32", torch.float32), ("amp-bf16", torch.bfloat16), ("amp", torch.bfloat16)):
        executor = executor_for(small_config(model={"name": "alexnet"}, training={"precision": precision}), plankton)
        assert executor.forward(images).dtype == dtype
        assert make_scaler(executor.precision, executor.device).is_enabled() is False  # loss scaling only for fp16


def test_frozen_features_stay_bit_identical(plankton, tmp_path):
    config = small_config(model={"freeze": "features"}, training={"epochs": 2})
    torch.manual_seed(1)
    initial = build_model("tiny-cnn", 4, freeze_mode="features").state_dict()
    assert fit(config, plankton, tmp_path / "run") == 0
    trained = read_checkpoint(tmp_path / "run" / "best.pt")["model"]
    for key, value in initial.items():
        if key.startswith("features."):  # BatchNorm running statistics included
            assert torch.equal(trained[key], value), key
        else:
            assert not torch.equal(trained[key], value), key


@pytest.mark.parametrize("capability, bf16", [((7, 0), False), ((7, 5), False), ((8, 0), True), ((8, 6), True),
                                              ((9, 0), True)])
def test_bf16_is_measured_only_where_the_gpu_has_the_hardware(monkeypatch, capability, bf16):
    assert has_bf16_hardware(capability) is bf16
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    kept, left_out = precisions_for(torch.device("cuda", 0), ("fp32", "amp-fp16", "amp-bf16"))
    assert ("amp-bf16" in kept) is bf16 and ("amp-bf16" in left_out) is (not bf16)
    if not bf16:
        assert f"compute capability {capability[0]}.{capability[1]} has no bf16 hardware" in left_out["amp-bf16"]
    assert precisions_for(torch.device("cpu"), ("fp32", "amp-bf16")) == (("fp32", "amp-bf16"), {})




def test_an_image_size_whose_batch_would_not_fit_the_machine_is_refused_with_the_estimate(plankton, tmp_path,
                                                                                          monkeypatch):
    """Finding 7: `augment size: 10000` ran with nothing said (a batch of 16 such images is 18 GiB in
    float32). Refused before any work, with the estimate and what the machine has (here said to be 16 GiB,
    so that the test does not depend on the machine it runs on)."""
    from types import SimpleNamespace

    from train import executor
    monkeypatch.setattr(executor.psutil, "virtual_memory", lambda: SimpleNamespace(available=16 * 2**30))
    big, small = {"crop": "center", "size": 10000, "resize": 10000}, {"crop": "center", "size": 64, "resize": 72}
    with pytest.raises(PlanktonioError, match=r"augment.train.size 10000 with batch size 16: one batch of images "
                                              r"is 17.9 GiB \(float32\), over half of the 16.0 GiB of memory"):
        fit(small_config(augment={"train": big, "eval": small}), plankton, tmp_path / "run")
    assert not (tmp_path / "run" / "last.pt").exists()

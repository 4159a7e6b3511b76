"""The feature cache: the same run as without it, from a frozen prefix computed once per image.

Cached and uncached runs of one config end with the same weights and the same metrics lines (timing
fields aside). On this CPU in fp32 they are bitwise equal: the prefix's kernels (oneDNN convolutions,
pooling) give each image the same values whatever batch it is computed in, so no tolerance is needed;
the tests say so by comparing exactly. AlexNet runs at 64 px (its adaptive pooling makes small inputs
work) to stay quick.
"""

from __future__ import annotations

import errno
import json
import os
import re
import signal

import pytest
import torch
from PIL import Image

from planktonio import PlanktonioError, files, prepare
from planktonio.dataset import PreparedDataset
from planktonio.index import SplitIndex, index_file
from planktonio.preparation import SplitPlan
from train import checkpoint_file, config as config_module, feature_cache
from train.executor import Executor
from train.feature_cache import find_cut
from train.loop import fit
from train.model import build_model
from train.signals import EXIT_INTERRUPTED

from .conftest import write_coloured_set
from .helpers import python, read_checkpoint, run_train, sigterm_after_step, torchrun, write_config

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
    return read_checkpoint(run / "last.pt")["model"]


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


ON_DISK = {"feature_cache_budget_bytes": 1000}  # no memory budget takes the store (host=False on a CPU): a file


@pytest.fixture(scope="module")
def uncached_three_epochs(synthetic, tmp_path_factory):
    """The uncached run the cached ones below must equal (made once: AlexNet uncached is the slow one)."""
    run = tmp_path_factory.mktemp("uncached") / "run"
    assert fit(config_module.from_dict(settings(epochs=3, check_every=2, feature_cache="off")), synthetic, run) == 0
    return run


def test_a_run_with_the_store_on_disk_is_the_run_in_memory(synthetic, tmp_path, uncached_three_epochs):
    """Past every memory budget the activations live in a memory-mapped file, read ahead by a thread in each
    epoch's order: bitwise the same run as the uncached one (which the in-memory run equals); the file is
    unlinked as soon as it is made, so nothing is left behind."""
    folder = tmp_path / "node-local"
    assert fit(config_module.from_dict(settings(epochs=3, check_every=2, feature_cache_dir=str(folder), **ON_DISK)),
               synthetic, tmp_path / "disk") == 0
    assert_same_run(tmp_path / "disk", uncached_three_epochs)
    used = summary(tmp_path / "disk")["feature_cache"]
    assert used["used"] and used["placement"].startswith(f"disk ({folder}")
    assert [p.name for p in folder.iterdir() if not p.name.startswith("features-")] == []


def test_a_store_on_disk_reads_ahead_in_the_epoch_s_order():
    """FeatureBatches over a store in a file and over the same rows in memory: the same batches, in order,
    entered mid-epoch too (a resume), with fewer batches than the reader runs ahead and with more."""
    import tempfile

    from planktonio import memory
    values = torch.arange(37 * 5, dtype=torch.float32).reshape(37, 5)
    with tempfile.TemporaryDirectory() as folder:
        on_disk = memory.Rows.in_file(37, 5, torch.float32, folder, "test")
        assert on_disk.on_disk and list(os.scandir(folder)) == []  # mapped, unlinked
        in_memory = memory.Rows(37, 5, torch.float32, torch.device("cpu"))
        for store in (on_disk, in_memory):
            store.write(0, values)
        for batch_size, skip in ((3, 0), (3, 5), (16, 1)):
            batches = []
            for store in (on_disk, in_memory):
                loader = feature_cache.FeatureBatches(store, 37, 1, torch.arange(37), batch_size=batch_size, train=True,
                                                      seed=4, shard_index=0, shard_count=1, device=torch.device("cpu"))
                loader.set_epoch(2, skip_batches=skip)
                batches.append(list(loader))
            assert len(batches[0]) == 37 // batch_size - skip
            for (rows, labels), (rows_m, labels_m) in zip(*batches):
                assert torch.equal(rows, rows_m) and torch.equal(labels, labels_m)
                assert torch.equal(rows, values[labels])


def test_a_node_s_other_ranks_map_its_store_read_only():
    """One store per node: the file its first rank makes (unlinked) is mapped by the others through that
    rank's descriptor, for reading: the same rows, written after the mapping too; a write is refused."""
    import tempfile

    from planktonio import memory
    with tempfile.TemporaryDirectory() as folder:
        mine = memory.Rows.in_file(10, 4, torch.float32, folder, "test")
        theirs = memory.Rows.of_peer(os.getpid(), mine.descriptor, 10, 4, torch.float32)
        mine.write(0, torch.arange(40, dtype=torch.float32).reshape(10, 4))
        assert torch.equal(theirs.gather(torch.tensor([7, 2]), torch.device("cpu")),
                           torch.tensor([[28.0, 29, 30, 31], [8, 9, 10, 11]]))
        assert theirs.on_disk and list(os.scandir(folder)) == []
        with pytest.raises(RuntimeError, match="mapped for reading only"):
            theirs.write(0, torch.zeros(1, 4))


def test_a_store_on_disk_is_read_in_file_order_within_each_batch():
    """A shuffled batch's rows are gathered from the file in ascending order (read-ahead along the file, each
    page once), then given in the batch's order."""
    import tempfile

    from planktonio import memory
    values = torch.arange(64 * 3, dtype=torch.float32).reshape(64, 3)
    with tempfile.TemporaryDirectory() as folder:
        store = memory.Rows.in_file(64, 3, torch.float32, folder, "test")
        store.write(0, values)
        asked, gather = [], store.gather
        store.gather = lambda index, to: asked.append(index.clone()) or gather(index, to)
        loader = feature_cache.FeatureBatches(store, 64, 1, torch.arange(64), batch_size=16, train=True, seed=4,
                                              shard_index=0, shard_count=1, device=torch.device("cpu"))
        batches = list(loader)
    assert len(asked) == 4 and all(torch.equal(index, index.sort().values) for index in asked)
    assert not all(torch.equal(labels, labels.sort().values) for _, labels in batches)  # the batches: shuffled
    assert all(torch.equal(rows, values[labels]) for rows, labels in batches)


def test_a_store_that_no_budget_and_no_disk_takes_is_refused_with_both(synthetic, tmp_path, capsys, monkeypatch):
    """auto stays off with the reason, on stops with it: the sizes, the budget and the free disk."""
    monkeypatch.setattr(feature_cache, "disk_free_bytes", lambda folder: 1000)
    assert fit(config_module.from_dict(settings("tiny-cnn", **ON_DISK)), synthetic, tmp_path / "auto") == 0
    assert "feature cache off:" in capsys.readouterr().out and not summary(tmp_path / "auto")["feature_cache"]["used"]
    with pytest.raises(PlanktonioError, match=r"training.feature_cache on: it cannot apply here: .*need "
                                              r"\d+\.\d (KiB|MiB) .*over .* cache budget .* and .* has 1000 B free "
                                              r"\(training.feature_cache_dir"):
        fit(config_module.from_dict(settings(feature_cache="on", **ON_DISK)), synthetic, tmp_path / "on")


@pytest.mark.parametrize("store", ["memory", "disk"])
def test_a_cached_run_stopped_mid_epoch_resumes_to_the_same_end(synthetic, tmp_path, monkeypatch, store,
                                                                 uncached_three_epochs):
    where = ON_DISK if store == "disk" else {}
    config = config_module.from_dict(settings(epochs=3, check_every=2, **where))
    with monkeypatch.context() as patch:
        sigterm_after_step(patch, 11)  # epoch 1's third step: obeyed at the step's end
        assert fit(config, synthetic, tmp_path / "cached") == 75
    assert read_checkpoint(tmp_path / "cached" / "last.pt")["batches_done"] == 3
    assert fit(config, synthetic, tmp_path / "cached", resume=True) == 0
    assert summary(tmp_path / "cached")["feature_cache"]["source"].startswith("read from")  # not computed again
    assert_same_run(tmp_path / "cached", uncached_three_epochs)


@pytest.mark.slow  # three 2-rank torchrun runs: about a minute
def test_two_gloo_ranks_cached_and_uncached_end_alike(synthetic, tmp_path):
    """Each rank computes its share of the one pass; the shares are gathered; the runs end alike, with the
    store in memory and on disk."""
    runs = {}
    for name, mode, where in (("cached", "auto", {}), ("disk", "auto", ON_DISK), ("plain", "off", {})):
        config = tmp_path / f"{name}.yaml"
        config.write_text(json.dumps(settings(feature_cache=mode, **where)))
        done = torchrun("-m", "train", "fit", "--config", config, "--data", synthetic, "--out", tmp_path / name)
        assert done.returncode == 0, done.stdout + done.stderr
        runs[name] = done.stdout
    assert "feature cache: computed" in runs["cached"] and "feature cache" not in runs["plain"]
    assert re.search(r"\d (B|KiB|MiB|GiB) on disk \(", runs["disk"]) and "one store for the 2 ranks of each node" in runs["disk"]
    assert_same_run(tmp_path / "cached", tmp_path / "plain")
    assert_same_run(tmp_path / "disk", tmp_path / "plain")


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
    index = PreparedDataset.load(copy).index("valid")  # its last image left out, as prepare would write it:
    n = len(index) - 1
    manifest = (copy / "valid.txt").read_bytes().splitlines(keepends=True)[:-1]
    SplitIndex.build([index.path(p) for p in range(n)], index.label[:n], index.width[:n], index.height[:n],
                     index.bytes[:n], index.mtime_ns[:n], index.sha256[:n], b"".join(manifest)).write(
        index_file(copy, "valid"))
    (copy / "valid.txt").write_bytes(b"".join(manifest))
    shared = str(tmp_path / "cache")
    for data, name in ((synthetic, "a"), (copy, "b")):
        assert fit(config_module.from_dict(settings("tiny-cnn", feature_cache_dir=shared)), data, tmp_path / name) == 0
        assert summary(tmp_path / name)["feature_cache"]["source"] == "computed"


# ------------------------------------------------------------------ when it applies


@pytest.mark.parametrize("change, reason", [
    ({"augment": {"train": {"crop": "random_resized", "size": 64, "resize": 72}}}, "does not repeat"),
    ({"model": {"name": "tiny-cnn", "freeze": "none"}}, "nothing before it to compute once"),
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


# ------------------------------------------------------------------ the cached run refuses what the uncached run refuses


@pytest.fixture
def own_data(tmp_path):
    """A small prepared set of this test's own (its images may be changed): 2 classes x 12, 8/2/2."""
    source = tmp_path / "source"
    write_coloured_set(source, classes=2, per_class=12, size=48)
    prepare(source, tmp_path / "prepared", plan=SplitPlan(per_class=(8, 2, 2)), workers=1)
    return tmp_path / "prepared", source


def small_cached(**training):
    values = settings("tiny-cnn", **training)
    values["loader"]["batch_size"] = 4
    return config_module.from_dict(values)


def test_an_image_replaced_after_the_pass_is_refused_as_the_uncached_run_refuses_it(own_data, tmp_path, capsys):
    """Finding 1: after an image was replaced (new bytes, size and date), resuming a cached run, or a new run
    sharing its feature-cache folder, read the old activations and exited 0; the uncached run refuses."""
    data, source = own_data
    shared = str(tmp_path / "shared")
    assert fit(small_cached(feature_cache_dir=shared), data, tmp_path / "run") == 0
    Image.new("RGB", (60, 60), (5, 5, 5)).save(source / "class0" / "img003.jpg", quality=70)  # another picture
    for mode, out, resume in (("auto", tmp_path / "run", True), ("auto", tmp_path / "other", False),
                              ("off", tmp_path / "plain", False)):
        with pytest.raises(PlanktonioError, match="img003.jpg: changed since prepare checked it"):
            fit(small_cached(feature_cache_dir=shared, feature_cache=mode, epochs=3), data, out, resume=resume)


def test_a_batch_larger_than_the_training_split_is_refused_cached_or_not(own_data, tmp_path):
    """Finding 3: cached, a batch size above the training images trained nothing and exited 0."""
    data, _ = own_data
    for mode in ("auto", "off"):
        values = settings("tiny-cnn", feature_cache=mode)
        values["loader"]["batch_size"] = 32  # 16 training images
        with pytest.raises(PlanktonioError, match="16 images over 1 shard\\(s\\) make no full batch of 32"):
            fit(config_module.from_dict(values), data, tmp_path / mode)
        assert not list((tmp_path / mode).glob("feature-cache/*.pt"))


def test_an_image_that_breaks_after_prepare_never_makes_a_short_cache(own_data, tmp_path, capsys):
    """Finding 2: an image broken after prepare (same size and date, half its bytes zeroed) was skipped in the
    pass and the file kept one image fewer under the intact data's fingerprint. Now the run reads images as
    the uncached run does (the torchvision loader skips the broken file and says so), no file is kept, and a
    later run on the intact data computes the activations of every image."""
    data, source = own_data
    broken = source / "class1" / "img005.jpg"
    intact, stat = broken.read_bytes(), broken.stat()
    broken.write_bytes(intact[: len(intact) // 2] + bytes(len(intact) - len(intact) // 2))
    os.utime(broken, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    shared = tmp_path / "shared"
    assert fit(small_cached(feature_cache_dir=str(shared)), data, tmp_path / "broken") == 0
    assert "feature cache off: an image of the train split could not be read in the pass" in capsys.readouterr().out
    assert not summary(tmp_path / "broken")["feature_cache"]["used"] and not list(shared.glob("*.pt"))
    with pytest.raises(PlanktonioError, match="could not be read in the pass"):  # `on` cannot apply
        fit(small_cached(feature_cache_dir=str(shared), feature_cache="on"), data, tmp_path / "on")
    broken.write_bytes(intact)
    os.utime(broken, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert fit(small_cached(feature_cache_dir=str(shared)), data, tmp_path / "intact") == 0
    used = summary(tmp_path / "intact")["feature_cache"]
    assert used["source"] == "computed" and used["bytes"] == (16 + 4 + 4) * 64 * 4


def test_a_file_with_the_right_fingerprint_but_other_rows_is_computed_again(own_data, tmp_path, capsys):
    """Finding 2's last case: a file whose fingerprint and checksum are right but whose rows are not this
    run's (here: one row short, re-saved with a valid checksum) was a traceback; it is computed again."""
    data, _ = own_data
    shared = tmp_path / "shared"
    assert fit(small_cached(feature_cache_dir=str(shared)), data, tmp_path / "first") == 0
    path, = shared.glob("features-*.pt")
    state = checkpoint_file.load(path)
    state["splits"]["train"]["rows"] = [torch.cat(state["splits"]["train"]["rows"])[:-1]]
    checkpoint_file.save_atomic(state, path)
    assert fit(small_cached(feature_cache_dir=str(shared)), data, tmp_path / "second") == 0
    assert "holds other images of the train split (15 rows of 16 images" in capsys.readouterr().out
    assert summary(tmp_path / "second")["feature_cache"]["source"] == "computed"
    assert_same_run(tmp_path / "first", tmp_path / "second")


# ------------------------------------------------------------------ disks and signals around the pass


def test_a_cache_folder_that_cannot_be_written_costs_one_line_and_the_run_goes_on(own_data, tmp_path, capsys):
    """Finding 5: a feature_cache_dir that is not a folder (or read-only, or full) failed with a traceback
    after the whole pass. Now it is checked before the pass; the activations are used from memory."""
    data, _ = own_data
    (tmp_path / "file").write_text("x")
    assert fit(small_cached(feature_cache_dir=str(tmp_path / "file" / "cache")), data, tmp_path / "run") == 0
    out = capsys.readouterr().out
    assert "feature cache: not kept on disk (training.feature_cache_dir" in out and "from memory" in out
    assert summary(tmp_path / "run")["feature_cache"]["source"] == "computed"


def test_a_full_disk_while_the_file_is_written_costs_one_line(own_data, tmp_path, capsys, monkeypatch):
    """The disk fills up while the file is written: one line, the activations used from memory, no file."""
    data, _ = own_data
    save = checkpoint_file.save_atomic

    def on_a_full_disk(state, path):
        if not path.name.startswith("features-"):
            return save(state, path)
        with files.atomic_file(path, "wb") as f:
            f.write(b"the first bytes")
            raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(feature_cache.checkpoint_file, "save_atomic", on_a_full_disk)
    assert fit(small_cached(), data, tmp_path / "run") == 0
    out = capsys.readouterr().out
    assert "feature cache: not kept on disk" in out and "No space left on device" in out
    assert not list((tmp_path / "run" / "feature-cache").iterdir())  # neither the file nor a temporary


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_a_signal_during_the_pass_stops_with_the_requeue_code_and_writes_nothing(own_data, tmp_path, capsys,
                                                                                  monkeypatch, sig):
    """Finding 6: SIGTERM or SIGUSR1 during the pass killed the process (143/138) with no message, so a Slurm
    --signal arriving then was not requeued. Now the pass stops at its next batch: exit 75, one line."""
    data, _ = own_data
    loader_for = Executor.loader_for

    class SignalAfterFirstBatch:
        def __init__(self, loader):
            self.loader = loader

        def __iter__(self):
            for index, batch in enumerate(self.loader):
                yield batch
                if index == 0:
                    os.kill(os.getpid(), sig)

        def __getattr__(self, name):
            return getattr(self.loader, name)

    def signalling(self, split, batch_size, train, spec=None):  # the pass's loaders: train=False
        loader = loader_for(self, split, batch_size, train, spec)
        return loader if train else SignalAfterFirstBatch(loader)
    monkeypatch.setattr(Executor, "loader_for", signalling)
    code, out, err = run_train(["fit", "--config", write_config(tmp_path / "c.yaml", **settings("tiny-cnn")),
                                "--data", data, "--out", tmp_path / "run"], capsys)
    assert code == EXIT_INTERRUPTED, out + err
    assert f"stopping on {sig.name} during the feature cache's pass: nothing to checkpoint yet" in out
    assert not (tmp_path / "run" / "last.pt").exists() and not list((tmp_path / "run").glob("feature-cache/*"))


def test_a_cache_in_host_memory_takes_little_more_than_its_size(tmp_path):
    """Issue "Four GPUs on one node must start", item 3: the pass kept a list of batches, joined them (cat)
    and stacked the views (about 3x the split at its peak), and the file's checksum copied every tensor.
    Now the pass writes into the store made for it (host memory in chunks), and the checksum reads it in
    place: a 310 MiB store raises the process's peak by less than 1.3 times its size (1.16 here), the
    pass, the file and two epochs included (measured in a process of its own: tests/feature_cache_peak.py)."""
    done = python("-m", "tests.feature_cache_peak", tmp_path)
    assert done.returncode == 0, done.stderr
    measured = json.loads(done.stdout.strip().splitlines()[-1])
    assert measured["store"] > 300 * 2**20 and measured["ratio"] < 1.3, measured


def test_a_split_index_is_hashed_once(synthetic, monkeypatch):
    """SplitIndex.checksum hashed every column each time it was asked (at read, then twice per split by the
    feature cache: its identity and its fingerprint): now once per index read."""
    from planktonio import index as index_module
    real, hashed = index_module.hashlib.sha256, []

    def sha256(data=b""):
        if bytes(data).startswith(b"planktonio index"):
            hashed.append(1)
        return real(data)
    monkeypatch.setattr(index_module.hashlib, "sha256", sha256)
    index = SplitIndex.read(index_file(synthetic, "train"))
    first = index.checksum()
    assert index.checksum() == index.checksum() == first and len(hashed) == 1
    assert SplitIndex.read(index_file(synthetic, "train")).checksum() == first and len(hashed) == 2

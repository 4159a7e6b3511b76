"""`python -m train predict` (train/predict.py, planktonio/unlabelled.py): new images classified by a run, with
its evaluation transform, every good image exactly once, bad files rejected with the reason, resumable and
split into shards of a job array, each output carrying its provenance."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from planktonio import PreparedDataset, unlabelled
from train import config as config_module, distributed, predict as predict_module
from train.executor import Executor
from train.signals import EXIT_INTERRUPTED

from .helpers import REPO, one_line_error, process_env, read_checkpoint, run_train


def predicted(out) -> pd.DataFrame:
    return predict_module.read_predictions(out).sort_values("path").reset_index(drop=True)


def without_provenance(out) -> dict:
    """Every unit file's table (and record), as values: what two equal runs must both have written."""
    tables = {}
    for path in sorted((out / "units").iterdir()):
        if path.suffix == ".parquet":
            tables[path.name] = pd.read_parquet(path).to_dict("list")
        elif path.suffix == ".json":
            tables[path.name] = json.loads(path.read_text())
    return tables


def assert_same_outputs(out, whole) -> None:
    """The same unit files, images, classes and records as `whole`'s; probabilities equal to float32
    rounding: a resumed or sharded run's batches hold other images than the whole run's (its last batch
    is shorter), and a CPU's kernels round differently by batch size (1e-7 on one machine, 0 on another)."""
    ours, theirs = without_provenance(out), without_provenance(whole)
    assert sorted(ours) == sorted(theirs)
    for name, table in ours.items():
        assert sorted(table) == sorted(theirs[name]), name
        for column, values in table.items():
            if isinstance(values, list) and values and isinstance(values[0], float):
                np.testing.assert_allclose(values, theirs[name][column], rtol=0, atol=1e-6, err_msg=name)
            else:
                assert values == theirs[name][column], (name, column)


def test_predict_gives_evaluate_s_probabilities(finished_run, plankton, test_split_list, tmp_path, capsys):
    """On the prepared test split, predict's top-1 classes and probabilities are evaluate's for the same
    checkpoint and backend: bitwise, in fp32 on this CPU."""
    code, out, err = run_train(["predict", "--run", finished_run, "--images", test_split_list, "--out",
                                tmp_path / "pred"], capsys)
    assert code == 0, err
    table = predicted(tmp_path / "pred")
    config = config_module.load(finished_run / "config.yaml")
    state = read_checkpoint(finished_run / "best.pt")
    with distributed.Session(torch.device("cpu"), 60) as ctx, Executor(config, plankton, ctx) as executor:
        executor.model.load_state_dict(state["model"])
        with executor.eval_loader("test") as loader:
            _, logits, labels = executor.evaluate(loader, collect=True)
    dataset = PreparedDataset.load(plankton)
    paths = [str(dataset.root / path) for path, _ in dataset.entries("test")]
    expected = F.softmax(logits, dim=1).numpy()
    order = np.argsort(paths)
    classes = list(state["classes"])
    assert table["path"].tolist() == [paths[i] for i in order]
    got = table[[f"p_{c}" for c in classes]].to_numpy()
    assert np.array_equal(got, expected[order])  # bitwise
    assert table["top1"].tolist() == [classes[c] for c in expected[order].argmax(axis=1)]
    assert table["label"].tolist() == table["top1"].tolist()  # no thresholds asked for


def test_the_training_augmentation_is_never_used(finished_run, test_split_list, tmp_path, capsys):
    """The run trained with random crops and flips; the same weights with no augmentation at all predict
    exactly the same: predict takes the run's evaluation transform."""
    plain = shutil.copytree(finished_run, tmp_path / "plain")
    values = config_module.parse_yaml((plain / "config.yaml").read_text())
    assert values["augment"]["train"]["crop"] == "random_resized" and values["augment"]["train"]["hflip"] > 0
    values["augment"]["train"] = values["augment"]["eval"]
    (plain / "config.yaml").write_text(config_module.dump(config_module.from_dict(values)))
    for run, out in ((finished_run, tmp_path / "a"), (plain, tmp_path / "b")):
        assert run_train(["predict", "--run", run, "--images", test_split_list, "--out", out], capsys)[0] == 0
    assert predicted(tmp_path / "a").equals(predicted(tmp_path / "b"))


@pytest.fixture
def bad_folder(plankton, tmp_path):
    """Three samples of good images with bad files planted in them."""
    dataset = PreparedDataset.load(plankton)
    source = tmp_path / "images"
    good = []
    for number, (path, _) in enumerate(dataset.entries("valid")[:30]):
        target = source / f"station{number % 3}" / f"{number:03d}.jpg"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(dataset.root / path, target)
        good.append(target.relative_to(source).as_posix())
    whole = (source / "station0" / "000.jpg").read_bytes()
    (source / "station0" / "truncated.jpg").write_bytes(whole[: len(whole) // 3])
    (source / "station1" / "empty.jpg").write_bytes(b"")
    (source / "station1" / "notes.png").write_text("not an image\n")
    Image.fromarray(np.full((20, 20), 1000, dtype=np.uint16)).save(source / "station2" / "wide.png")
    (source / "station2" / "folder.jpg").mkdir()
    return source, good


@pytest.mark.parametrize("backend", ["torchvision", "dali-cpu"])
def test_bad_files_are_rejected_with_the_reason_and_every_good_image_is_predicted_once(finished_run, bad_folder,
                                                                                     tmp_path, capsys, backend):
    """Truncated, empty, text and 16-bit files and a folder named like an image: the run ends (exit 0), the bad
    ones are in rejected.csv with their reasons, every good image once. DALI stops a pipeline on a bad file:
    the batch is run again without it."""
    source, good = bad_folder
    code, out, err = run_train(["predict", "--run", finished_run, "--images", source, "--out", tmp_path / "pred",
                                "--backend", backend, "--batch-size", "4"], capsys)
    assert code == 0, err
    if backend == "dali-cpu":  # the batch DALI stopped on, run again without the file
        assert "truncated.jpg: truncated" in out and "rejected; going on without it" in out
    table = predicted(tmp_path / "pred")
    assert sorted(table["path"]) == sorted(good) and table["path"].is_unique
    rejected = pd.read_csv(tmp_path / "pred" / "rejected.csv")
    assert dict(zip(rejected["path"], rejected["reason"])) == {
        "station0/truncated.jpg": "truncated", "station1/empty.jpg": "empty", "station1/notes.png": "not an image",
        "station2/wide.png": "unsupported bit depth"}
    samples = pd.read_csv(tmp_path / "pred" / "samples.csv").set_index("sample")
    assert samples["images"].to_dict() == {"station0": 11, "station1": 12, "station2": 11}
    assert samples["rejected"].to_dict() == {"station0": 1, "station1": 2, "station2": 1}
    classes = json.loads((tmp_path / "pred" / "provenance.json").read_text())["classes"]
    assert (samples[classes].sum(axis=1) == samples["images"] - samples["rejected"]).all()


def test_a_stopped_prediction_goes_on_to_the_same_outputs_and_shards_make_the_whole(finished_run, bad_folder,
                                                                                  tmp_path, capsys, monkeypatch):
    """SIGTERM after the second batch: exit 75, the units done are kept; the same command again finishes the
    rest, and the outputs are those of an uninterrupted run, no image twice. --shard 0/2 and 1/2 together
    write the same units as the whole."""
    source, _ = bad_folder
    args = ["predict", "--run", finished_run, "--images", source, "--batch-size", "4", "--format", "parquet"]
    assert run_train([*args, "--out", tmp_path / "whole"], capsys)[0] == 0

    put = predict_module.Writer.put
    calls = {"n": 0}

    def stopping_put(self, ready, host):
        put(self, ready, host)
        calls["n"] += 1
        if calls["n"] == 4:  # after 16 images: the first sample's unit (11 images) is done, the second is not
            os.kill(os.getpid(), signal.SIGTERM)
    with monkeypatch.context() as patch:
        patch.setattr(predict_module.Writer, "put", stopping_put)
        code, out, _ = run_train([*args, "--out", tmp_path / "split"], capsys)
    assert code == EXIT_INTERRUPTED and "stopping on SIGTERM: 1 unit(s) written" in out
    assert not (tmp_path / "split" / "samples.csv").exists()
    code, out, _ = run_train([*args, "--out", tmp_path / "split"], capsys)
    assert code == 0 and "2 to do" in out
    assert_same_outputs(tmp_path / "split", tmp_path / "whole")
    for index in (0, 1):
        assert run_train([*args, "--out", tmp_path / "sharded", "--shard", f"{index}/2"], capsys)[0] == 0
    assert_same_outputs(tmp_path / "sharded", tmp_path / "whole")
    assert (tmp_path / "sharded" / "samples.csv").read_text() == (tmp_path / "whole" / "samples.csv").read_text()


def test_every_output_carries_its_provenance(finished_run, test_split_list, tmp_path, capsys):
    for fmt in ("parquet", "csv"):
        assert run_train(["predict", "--run", finished_run, "--images", test_split_list, "--out", tmp_path / fmt,
                          "--format", fmt, "--float16", "--embeddings"], capsys)[0] == 0
        unit = next((tmp_path / fmt / "units").glob(f"*.{fmt}"))
        provenance = predict_module.provenance_of(unit)
        assert provenance["checkpoint"] == "best.pt" and len(provenance["checkpoint_sha256"]) == 64
        assert provenance["transform"]["crop"] == "center" and provenance["calibration"] is None
        assert {"torch", "dali", "pyarrow"} <= set(provenance["versions"]) and provenance["command"].startswith(
            "python -m train predict")
        embeddings = np.load(unit.with_name(unit.name.replace(f".{fmt}", ".embeddings.npy")))
        assert embeddings.dtype == np.float16 and embeddings.shape == (40, 64)  # tiny-cnn's head takes 64 values
    table = predict_module.read_predictions(tmp_path / "parquet")
    assert table["p_copepod"].dtype == np.float16


def test_units_of_other_settings_in_the_same_out_are_refused(finished_run, test_split_list, tmp_path, capsys):
    args = ["predict", "--run", finished_run, "--images", test_split_list, "--out", tmp_path / "pred"]
    assert run_train(args, capsys)[0] == 0
    code, _, err = run_train([*args, "--top-k", "2"], capsys)
    assert "predicted with other settings or another checkpoint" in one_line_error(code, err)
    assert run_train([*args, "--top-k", "2", "--overwrite"], capsys)[0] == 0


def test_a_backend_that_keeps_a_split_is_not_used_for_one_pass(finished_run, test_split_list, tmp_path, capsys):
    """The cache backend decodes a whole split before its first batch: asked for, it is a one-line error; a run
    trained with it predicts with the default backend, and says so."""
    args = ["predict", "--run", finished_run, "--images", test_split_list]
    code, _, err = run_train([*args, "--out", tmp_path / "asked", "--backend", "cache"], capsys)
    assert "predict reads each image once: choose one of dali-gpu, dali-cpu, torchvision, pil" in \
        one_line_error(code, err)
    run = tmp_path / "cached-run"
    shutil.copytree(finished_run, run)
    text = (run / "config.yaml").read_text()
    (run / "config.yaml").write_text(text.replace(f"backend: {config_module.load(run / 'config.yaml').loader.backend}",
                                                  "backend: cache"))
    assert config_module.load(run / "config.yaml").loader.backend == "cache"
    code, out, err = run_train(["predict", "--run", run, "--images", test_split_list, "--out", tmp_path / "run"], capsys)
    assert code == 0, err
    assert "the run trained with the cache backend" in out and "predicting with dali" in out
    assert predict_module.provenance_of(next((tmp_path / "run" / "units").glob("*.parquet")))["backend"] == "dali"


def test_the_inputs_it_reads(tmp_path):
    """A folder: each folder holding images is a sample; a list: paths relative to the list; tar shards."""
    for sample, names in (("day1/bin1", ("a.jpg", "b.png")), ("day1/bin2", ("c.jpg",)), ("day2", ("d.jpg",))):
        (tmp_path / "src" / sample).mkdir(parents=True)
        for name in names:
            Image.new("RGB", (30, 20), (9, 9, 9)).save(tmp_path / "src" / sample / name)
    (tmp_path / "src" / "day1" / "bin1" / ".hidden.jpg").write_bytes(b"x")
    (tmp_path / "src" / "day1" / "bin1" / "notes.txt").write_text("x")
    catalog = unlabelled.discover(tmp_path / "src")
    assert catalog.paths == ["day1/bin1/a.jpg", "day1/bin1/b.png", "day1/bin2/c.jpg", "day2/d.jpg"]
    assert [u.name for u in catalog.units] == ["day1%2Fbin1.part0000", "day1%2Fbin2.part0000", "day2.part0000"]
    widths, heights, problems = unlabelled.read_headers(catalog, np.arange(4))
    assert widths.tolist() == [30] * 4 and heights.tolist() == [20] * 4 and problems == {}
    listing = tmp_path / "list.txt"
    listing.write_text("src/day2/d.jpg\n# a comment\n\nsrc/day1/bin1/a.jpg\n")
    listed = unlabelled.discover(listing)
    assert listed.paths == [str(tmp_path / "src/day1/bin1/a.jpg"), str(tmp_path / "src/day2/d.jpg")]
    assert [u.name for u in listed.units] == ["list.part0000"]
    with pytest.raises(unlabelled.PlanktonioError, match="no such file or folder"):
        unlabelled.discover(tmp_path / "nowhere")


@pytest.mark.gpu
def test_predict_on_a_gpu_gives_the_cpu_s_classes(finished_run, test_split_list, tmp_path, capsys):
    """The same weights and decoder (DALI's CPU one) on cuda and on the CPU: the same top-1 classes, the
    probabilities within cuDNN's rounding (the results reach the writer through pinned host memory)."""
    for device in ("cpu", "cuda"):
        code, _, err = run_train(["predict", "--run", finished_run, "--images", test_split_list, "--out",
                                  tmp_path / device, "--device", device, "--backend", "dali-cpu",
                                  "--precision", "fp32"], capsys)
        assert code == 0, err
    on_cpu, on_gpu = predicted(tmp_path / "cpu"), predicted(tmp_path / "cuda")
    assert on_gpu["path"].tolist() == on_cpu["path"].tolist()
    columns = [c for c in on_cpu.columns if c.startswith("p_")]
    # cuDNN may run fp32 convolutions in TF32 (Ampere and later): about 1e-3 relative
    assert np.allclose(on_gpu[columns].to_numpy(), on_cpu[columns].to_numpy(), atol=5e-3)
    clear = (on_cpu["top1_prob"] - on_cpu["top2_prob"]) > 1e-2  # no near-tie that rounding may turn
    assert (on_gpu["top1"][clear] == on_cpu["top1"][clear]).all() and clear.sum() > 0


@pytest.fixture
def stations(plankton, tmp_path):
    """Three samples of four good images each: three units."""
    dataset = PreparedDataset.load(plankton)
    source = tmp_path / "stations"
    for number, (path, _) in enumerate(dataset.entries("valid")[:12]):
        target = source / f"station{number % 3}" / f"{number:03d}.jpg"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(dataset.root / path, target)
    return source


def test_a_folder_of_predictions_belongs_to_one_checkpoint(finished_run, stations, tmp_path, capsys):
    """Shard 0 of a job with best.pt, shard 1 with last.pt into the same OUT: the second is refused before it
    writes. In a folder that does not say whose it is (an older planktonio's), the merge refuses to add up
    units of two checkpoints, naming both."""
    out = tmp_path / "pred"
    args = ["predict", "--run", finished_run, "--images", stations, "--out", out, "--batch-size", "4"]
    assert run_train([*args, "--shard", "0/2"], capsys)[0] == 0
    owner = json.loads((out / "predictions.json").read_text())
    assert owner["checkpoint"] == "best.pt" and owner["classes"]
    units = sorted(p.name for p in (out / "units").iterdir())
    code, _, err = run_train([*args, "--shard", "1/2", "--checkpoint", "last"], capsys)
    line = one_line_error(code, err)
    assert "holds the predictions of" in line and "best.pt" in line and "last.pt" in line and "--out" in line
    assert sorted(p.name for p in (out / "units").iterdir()) == units
    (out / "predictions.json").unlink()
    code, _, err = run_train([*args, "--shard", "1/2", "--checkpoint", "last"], capsys)
    line = one_line_error(code, err)
    assert "samples.csv would add up two runs" in line and "best.pt" in line and "last.pt" in line
    assert not (out / "samples.csv").exists()


HOLDER = """
import json, sys, time
from train.predict.folder import PredictionsFolder
with PredictionsFolder(sys.argv[1], json.loads(sys.argv[2]), overwrite=False):
    print("held", flush=True)
    time.sleep(120)
"""


def test_the_tasks_of_one_job_share_a_folder_and_another_run_is_refused(finished_run, stations, tmp_path,
                                                                         capsys):
    """While another process writes OUT for the same run and settings (a task of the same job array), a task
    goes on beside it; a run of another checkpoint is refused while it writes, --overwrite or not."""
    out = tmp_path / "pred"
    options = predict_module.PredictOptions(run=finished_run, images=stations, out=out, batch_size=4)
    record = predict_module.owner_record(predict_module.Predictor(options).provenance)
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out), json.dumps(record)], cwd=REPO,
                              env=process_env(), text=True, stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline().strip() == "held"
        args = ["predict", "--run", finished_run, "--images", stations, "--out", out, "--batch-size", "4"]
        code, _, err = run_train([*args, "--shard", "1/2"], capsys)
        assert code == 0, err
        code, _, err = run_train([*args, "--checkpoint", "last", "--overwrite"], capsys)
        assert "another predict is writing it" in one_line_error(code, err)
    finally:
        holder.kill()
        holder.wait()
    assert run_train([*args, "--checkpoint", "last", "--overwrite"], capsys)[0] == 0  # the holder gone: allowed
    assert json.loads((out / "predictions.json").read_text())["checkpoint"] == "last.pt"


def test_csv_names_with_a_hash_and_a_path_listed_twice(finished_run, plankton, tmp_path, capsys):
    """CSV output read back keeps a file name holding `#`; a path listed twice is predicted once, its second
    listing rejected as a duplicate, and samples.csv counts the sample's images once each."""
    dataset = PreparedDataset.load(plankton)
    folder = tmp_path / "station"
    folder.mkdir()
    names = []
    for number, (path, _) in enumerate(dataset.entries("valid")[:5]):
        names.append(f"roi#{number}.jpg")
        shutil.copy(dataset.root / path, folder / names[-1])
    listing = tmp_path / "images.txt"
    listing.write_text("".join(f"station/{name}\n" for name in [*names, names[2]]))
    out = tmp_path / "pred"
    code, _, err = run_train(["predict", "--run", finished_run, "--images", listing, "--out", out, "--format",
                              "csv"], capsys)
    assert code == 0, err
    table = predicted(out)
    assert table["path"].tolist() == sorted(str(folder / name) for name in names)
    assert not table.isna().any().any() and table["p_copepod"].dtype == np.float64
    rejected = pd.read_csv(out / "rejected.csv")
    assert rejected["path"].tolist() == [str(folder / names[2])] and rejected["reason"].tolist() == ["duplicate path"]
    samples = pd.read_csv(out / "samples.csv").set_index("sample")
    assert samples["images"].tolist() == [6] and samples["rejected"].tolist() == [1]
    classes = json.loads((out / "provenance.json").read_text())["classes"]
    assert samples[classes].sum(axis=1).tolist() == [5]


def test_no_images_creates_nothing(finished_run, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    for images, says in ((tmp_path / "empty", "no images under it"), (tmp_path / "nowhere", "no such file")):
        code, _, err = run_train(["predict", "--run", finished_run, "--images", images, "--out", tmp_path / "out"],
                                 capsys)
        assert says in one_line_error(code, err)
        assert not (tmp_path / "out").exists()


def test_ctrl_c_says_what_predict_keeps(finished_run, test_split_list, tmp_path, capsys, monkeypatch):
    """SIGINT during predict: exit 75 and a line that speaks of the units kept, not of a checkpoint."""
    put = predict_module.Writer.put

    def interrupting_put(self, ready, host):
        put(self, ready, host)
        os.kill(os.getpid(), signal.SIGINT)
    monkeypatch.setattr(predict_module.Writer, "put", interrupting_put)
    code, out, err = run_train(["predict", "--run", finished_run, "--images", test_split_list, "--out",
                                tmp_path / "pred", "--batch-size", "8"], capsys)
    assert code == EXIT_INTERRUPTED and "stopping on SIGINT" in out
    assert "the units written are kept" in err and "checkpoint" not in err


def test_predict_needs_no_backbone_weights_file(run_copy, test_split_list, tmp_path, capsys):
    """The run's config names the backbone weights it started from; on another machine that file is not
    there: predict builds the model without it (the checkpoint holds every weight)."""
    values = config_module.parse_yaml((run_copy / "config.yaml").read_text())
    values["model"]["weights"] = str(tmp_path / "deleted" / "backbone.pth")
    (run_copy / "config.yaml").write_text(config_module.dump(config_module.from_dict(values)))
    code, _, err = run_train(["predict", "--run", run_copy, "--images", test_split_list, "--out", tmp_path / "pred"],
                             capsys)
    assert code == 0, err
    assert len(predicted(tmp_path / "pred")) == 40


def test_one_large_image_does_not_size_every_decoder_buffer():
    """Plankton ROIs with one 8000 x 6000 photograph among them: the GPU decoder's hints stay at HINT_SIDE a
    side (the photograph reallocates when it comes); small images alone are sized as before."""
    from planktonio.loaders.dali_graph import HINT_SIDE, decoder_hints
    widths, heights = np.array([120, 255, 80, 8000]), np.array([90, 255, 300, 6000])
    hints = decoder_hints(widths, heights)
    assert hints["preallocate_width_hint"] == HINT_SIDE and hints["preallocate_height_hint"] == HINT_SIDE
    assert hints["device_memory_padding"] == hints["host_memory_padding"] == 2 * HINT_SIDE * HINT_SIDE * 3
    small = decoder_hints(widths[:3], heights[:3])
    assert small["preallocate_width_hint"] == 255 and small["preallocate_height_hint"] == 300
    assert small["device_memory_padding"] == 1 << 20


def test_the_writer_thread_binds_its_device_and_sleeps_on_a_blocking_event(monkeypatch):
    """Without a GPU, with fakes: the writer thread makes the predictor's device its own before it waits on
    anything, and the event it waits on is a blocking one, recorded on that device's current stream."""
    import threading

    from train.predict import predictor as predictor_module
    bound, events = [], []

    class FakeEvent:
        def __init__(self, **kwargs):
            events.append(kwargs)

        def record(self, stream):
            events.append(stream)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: bound.append((device, threading.current_thread().name)))
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device: ("stream of", device))
    device = torch.device("cuda", 1)
    writer = predict_module.Writer(None, [], {}, None, {"classes": []}, None, None, device)
    writer.close()
    assert bound == [(device, "predict-writer")]
    predictor_module.copies_done(device)
    assert events == [{"blocking": True}, ("stream of", device)]


def test_the_shard_header_scan_sends_each_job_its_positions_only():
    """The header scan of tar shards: each worker gets the shards once, when it starts; each job's bytes do
    not grow with the catalog (they carried the whole member table: 53 MiB a job at a million members)."""
    import pickle
    from concurrent.futures import ThreadPoolExecutor

    class CountingPool(ThreadPoolExecutor):
        """Threads of this process stand in for the scan workers: they keep the shards as a worker does, but
        do not tie this process's life to its parent's."""
        sent: list[int] = []
        started: list[int] = []

        def __init__(self, max_workers, initializer, initargs):
            CountingPool.started.append(len(pickle.dumps(initargs)))
            super().__init__(max_workers, initializer=unlabelled.keep_shards, initargs=initargs[1:])

        def map(self, fn, chunks):
            chunks = list(chunks)
            CountingPool.sent += [len(pickle.dumps((fn, chunk))) for chunk in chunks]
            return super().map(fn, chunks)

    per_job = {}
    for members in (1_000, 100_000):
        names = [f"shard-{i // 1000:04d}/roi-{i:07d}.jpg" for i in range(members)]
        zeros = np.zeros(members, dtype=np.int64)
        shards = unlabelled.TarShards(Path("/nowhere"), ["a.tar"], zeros, zeros, zeros, names)
        catalog = unlabelled.Catalog(Path("/nowhere"), Path("/nowhere"), names, ["s"] * members,
                                     [unlabelled.Unit("s", 0, members)], shards)
        CountingPool.sent, CountingPool.started = [], []
        widths, _, problems = unlabelled.read_headers(catalog, np.arange(1000), workers=2, pool=CountingPool)
        assert len(widths) == 1000 and set(problems) == set(range(1000))  # every member empty here
        per_job[members] = max(CountingPool.sent)
        assert CountingPool.started[0] > 10 * per_job[members]  # the shards, once
    assert per_job[1_000] == per_job[100_000] < 2000


def test_images_a_decoder_fails_on_but_pil_reads_are_decoded_again_image_by_image(finished_run, test_split_list,
                                                                                  tmp_path, capsys, monkeypatch):
    """A GPU decoder may fail on a file that PIL decodes (DALI then names no file): the batches it had in
    flight are decoded again with the reference backend one image at a time, and the run's backend goes on
    after them; every image is predicted once, none rejected. (No GPU here: DALI's CPU loader, made to fail
    after two batches as the mixed decoder would.)"""
    real, built = predict_module.Predictor.loader, []

    class FailsAfterTwoBatches:
        def __init__(self, inner):
            self.inner, self.spec, self.prefetch_depth = inner, inner.spec, inner.prefetch_depth

        def __iter__(self):
            for number, batch in enumerate(self.inner):
                if number == 2:
                    raise RuntimeError("Error in thread 0: nvjpeg: Failed to decode sample #3\nC++ context")
                yield batch

        def close(self):
            self.inner.close()

    def loader(self, positions, sizes, backend=None, batch_size=None):
        built.append((backend, batch_size, len(positions)))
        made = real(self, positions, sizes, backend, batch_size)
        return FailsAfterTwoBatches(made) if len(built) == 1 else made
    monkeypatch.setattr(predict_module.Predictor, "loader", loader)
    code, out, err = run_train(["predict", "--run", finished_run, "--images", test_split_list, "--out",
                                tmp_path / "pred", "--backend", "dali-cpu", "--batch-size", "4"], capsys)
    assert code == 0, err
    assert "Failed to decode sample #3); decoding them with pil, image by image" in out
    first, again, rest = built
    assert first == (None, None, 40) and again[:2] == ("pil", 1) and rest == (None, None, 40 - 8 - again[2])
    table = predicted(tmp_path / "pred")
    assert len(table) == 40 and table["path"].is_unique
    assert len(pd.read_csv(tmp_path / "pred" / "rejected.csv")) == 0


def test_every_predict_option_is_taken_from_its_command_line_argument():
    """PredictOptions is filled from the arguments of the same names: each field, given on the command line,
    differs from its default (an option added to one and not the other would fail here)."""
    import dataclasses

    from train.__main__ import build_parser
    args = build_parser().parse_args([
        "predict", "--run", "r", "--images", "i", "--out", "o", "--checkpoint", "last", "--calibrated",
        "--backend", "pil", "--batch-size", "8", "--device", "cpu", "--precision", "fp32", "--workers", "1",
        "--format", "csv", "--top-k", "2", "--float16", "--embeddings", "--shard", "1/3", "--overwrite"])
    options = predict_module.predict_options(args, ["python", "-m", "train", "predict"])
    defaults = predict_module.PredictOptions(run=None, images=None, out=None)
    for field in dataclasses.fields(predict_module.PredictOptions):
        assert getattr(options, field.name) != getattr(defaults, field.name), field.name
    assert options.shard == (1, 3) and options.top_k == 2 and str(options.run) == "r"

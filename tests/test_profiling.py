"""The measuring programs: statistics, result files, traces read back, reports."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from profiling import inspect_trace, report, stats
from profiling.amp_bench import run as run_amp
from profiling.loader_bench import MIN_CPU_WINDOW, run as run_loaders
from profiling.predict_bench import run as run_predict
from profiling.render.common import goal
from profiling.settings import AmpBenchmark, LoaderBenchmark, PredictBenchmark, TraceOptions
from profiling.trace import run_trace

from .helpers import one_line_error, python, run_profiling, write_config

# ------------------------------------------------------------------ statistics


def test_percentiles_and_medians_on_known_inputs():
    values = [5.0, 1.0, 4.0, 2.0, 3.0]
    assert stats.median(values) == 3.0
    assert stats.median([1.0, 2.0, 3.0, 4.0]) == 2.5
    assert stats.percentile(values, 0) == 1.0 and stats.percentile(values, 100) == 5.0
    assert stats.percentile(list(range(101)), 95) == 95.0
    random = np.random.default_rng(0).exponential(size=257).tolist()
    for q in (50, 95, 99):
        assert stats.percentile(random, q) == pytest.approx(np.percentile(random, q))
    s = stats.summary([100.0, 90.0, 110.0])
    assert (s["median"], s["min"], s["max"]) == (100.0, 90.0, 110.0) and s["spread"] == pytest.approx(0.2)
    latency = stats.latency_summary([0.010, 0.020, 0.030])
    assert latency["p50"] == pytest.approx(20.0) and latency["mean"] == pytest.approx(20.0)


def test_union_length_counts_overlaps_once():
    assert inspect_trace.union_length([(0, 10), (5, 15), (20, 30)]) == 25
    assert inspect_trace.union_length([(0, 10), (2, 3)]) == 10
    assert inspect_trace.union_length([]) == 0


# ------------------------------------------------------------------ loaders


def test_loader_benchmark_writes_the_documented_fields(synthetic, tmp_path, capsys):
    out = tmp_path / "loaders.json"
    code, stdout, err = run_profiling(["loaders", "--data", synthetic, "--backends", "dali-cpu,torchvision,memory",
                                        "--batch-size", "16", "--epochs", "2", "--warmup", "1", "--repeats", "2",
                                        "--workers", "2", "--json", out], capsys)
    assert code == 0, err
    data = json.loads(out.read_text())
    assert data["kind"] == "loaders"
    for key in ("device", "torch", "torchvision", "dali", "cpu_count", "date", "command"):
        assert key in data["environment"]
    assert [r["backend"] for r in data["results"]] == ["dali-cpu", "torchvision", "memory"]
    assert [r["backend_info"]["role"] for r in data["results"]] == ["candidate", "baseline", "upper-bound"]
    assert data["config"]["batches_per_epoch"] == 64 // 16 and data["complete"] is True
    config = data["config"]
    timed_images = config["epochs"] * config["batches_per_epoch"] * config["batch_size"]  # per timed turn
    for r in data["results"]:
        assert len(r["images_per_s"]["runs"]) == 2 and r["images_per_s"]["median"] > 0
        assert r["latency_ms"]["p50"] <= r["latency_ms"]["p95"] <= r["latency_ms"]["p99"]
        assert r["epoch_boundary_ms"] > 0 and r["batch_ms"] > 0
        assert r["boundary_vs_batch"] == pytest.approx(r["epoch_boundary_ms"] / r["batch_ms"])
        # CPU use is measured only over timed windows long enough for the OS's
        # 10 ms CPU-time ticks; how long a window was follows from its speed.
        windows_s = [timed_images / ips for ips in r["images_per_s"]["runs"]]
        if any(w >= MIN_CPU_WINDOW for w in windows_s):
            assert 0 <= r["cpu_util_percent"] <= 100 * 1.5  # sampling can overshoot a little
        else:  # e.g. the memory backend: microseconds per batch
            assert r["cpu_util_percent"] is None
        assert r["peak_gpu_memory_mb"] is None and r.get("device_memory_added_mb") is None  # no GPU here
    dali = data["results"][0]
    assert dali["pipelines_built"] == 1  # one DALI pipeline for the warm-up and every timed epoch
    assert "dali-cpu" in stdout and "vs torchvision" in stdout  # the first baseline measured


@pytest.mark.parametrize("args, message", [
    (["--epochs", "0"], "must be >= 1"),
    (["--repeats", "0"], "must be >= 1"),
    (["--backends", "memory"], "name at least one loader backend"),
    (["--backends", "nosuch"], "unknown loader backend 'nosuch'"),
])
def test_loader_benchmark_options_are_checked(coloured, capsys, args, message):
    prepared, _ = coloured
    code, _, err = run_profiling(["loaders", "--data", prepared, "--batch-size", "4", *args], capsys)
    assert message in one_line_error(code, err)


def test_the_upper_bound_replays_real_batches_from_the_device(synthetic):
    """The memory backend's batches are the first batches of epoch 0 as the reference implementation makes
    them, replayed: same values, shape, dtype and layout, an epoch's worth per epoch."""
    from planktonio import Output, make_loader
    output = Output("float16", "NHWC")
    memory = make_loader("memory", synthetic, "train", batch_size=8, device="cpu", workers=0, output=output)
    real = make_loader("torchvision", synthetic, "train", batch_size=8, device="cpu", workers=0, output=output)
    for epoch in range(2):
        memory.set_epoch(epoch)
        replayed = list(memory)
        assert len(replayed) == len(real) == 8
    real.set_epoch(0)
    for (x, y), (x_real, y_real) in zip(replayed, real, strict=True):
        assert torch.equal(x, x_real) and torch.equal(y, y_real)
        assert x.dtype == torch.float16 and x.is_contiguous(memory_format=torch.channels_last)
    bench = run_loaders(LoaderBenchmark(data=str(synthetic), backends=("torchvision", "memory"), batch_size=8,
                                        epochs=1, warmup=1, repeats=1, workers=0, dtype="float16", layout="NHWC"))
    assert {r["backend"] for r in bench["results"]} == {"torchvision", "memory"}


def test_the_predict_benchmark_times_predict_and_its_parts_on_the_same_images(finished_run, test_split_list,
                                                                                 tmp_path, capsys):
    """Per backend predict may use: the loader alone, the forward alone and predict itself over the same 40
    images, predict's shares taken of the medians; the report's goal is the CPU one (85% of what the loader
    and the model allow on the same cores)."""
    result = run_predict(PredictBenchmark(run=str(finished_run), images=str(test_split_list), repeats=2),
                         tmp_path / "predict.json")
    assert result["complete"] and result["config"]["image_count"] == 40 and result["config"]["rejected"] == 0
    assert [r["backend"] for r in result["results"]] == ["dali-cpu", "torchvision", "pil", "turbo"]
    for r in result["results"]:
        rates = {part: r[f"{part}_images_per_s"] for part in ("loader", "forward", "predict")}
        assert all(len(rate["runs"]) == 2 and rate["min"] > 0 for rate in rates.values())
        loader, forward = rates["loader"]["median"], rates["forward"]["median"]
        assert r["predict_vs_slower"] == pytest.approx(rates["predict"]["median"] / min(loader, forward))
        assert r["predict_vs_shared_bound"] == pytest.approx(rates["predict"]["median"] * (1 / loader + 1 / forward))
    text = report.write_report([tmp_path / "predict.json"], tmp_path / "report").read_text()
    assert text.count("of loader and forward on the same cores") == len(result["results"]) and "| pil |" in text
    code, _, err = run_profiling(["predict", "--run", finished_run, "--images", test_split_list, "--backends",
                                  "memory"], capsys)
    assert "--backends memory: predict does not use it" in one_line_error(code, err)


def test_a_benchmark_stopped_mid_way_keeps_the_rows_it_finished(tmp_path):
    """Results are on disk as they are measured: a stage stopped by its budget still reports its rows."""
    from profiling.measure import ResultFile
    path = tmp_path / "amp.json"
    result = ResultFile(path, "amp", config={"steps": 3}, compute=[])
    assert json.loads(path.read_text())["complete"] is False
    result.add("compute", {"precision": "fp32"})
    on_disk = json.loads(path.read_text())  # what a killed process would leave
    assert on_disk["compute"] == [{"precision": "fp32"}] and on_disk["complete"] is False
    result.finish()
    assert json.loads(path.read_text())["complete"] is True


# ------------------------------------------------------------------ AMP


def test_amp_benchmark_runs_on_cpu_and_says_so(synthetic):
    bench = AmpBenchmark(model="tiny-cnn", batch_size=4, steps=2, warmup=1, repeats=3, image_size=64,
                         num_classes=4, data=str(synthetic), loaders=("dali-cpu", "torchvision"), workers=1)
    result = run_amp(bench)
    assert "CPU" in result["note"]
    combos = {(r["freeze"], r["precision"], r["channels_last"]) for r in result["compute"]}
    assert len(combos) == 2 * 3 * 2
    for r in result["compute"]:
        # an odd number of repeats: the median rate is the rate of the median step
        assert r["images_per_s"]["median"] == pytest.approx(1000 * 4 / r["step_ms"]["median"], rel=1e-6)
    assert {(r["loader"], r["precision"]) for r in result["end_to_end"]} == {
        (loader, p) for loader in ("dali-cpu", "torchvision") for p in ("fp32", "amp-fp16", "amp-bf16")}
    assert all(0 <= r["data_wait_fraction"] <= 1 for r in result["end_to_end"])


# ------------------------------------------------------------------ traces


@pytest.fixture(scope="module")
def trace_file(synthetic, tmp_path_factory):
    """One traced run (tiny-cnn, DALI on the CPU, 3 recorded steps), made in this process."""
    out = tmp_path_factory.mktemp("trace")
    config = write_config(out / "tiny.yaml", loader={"backend": "dali-cpu", "batch_size": 8, "workers": 2})
    assert run_trace(config, [], synthetic, out, TraceOptions(wait=1, warmup=1, active=3)) == 0
    return out / "trace-rank0.json.gz"


def test_a_memory_trace_on_the_cpu_that_runs_out_of_steps_says_so(synthetic, tmp_path, capsys):
    """Issue 33: `trace --memory` was a traceback on the CPU (torch's HTML memory timeline needs CUDA), and a
    run that ended before the trace's last step gave a shorter trace without a word. 64 training images in
    batches of 8, one epoch: 8 steps, of which 6 recorded (wait 1, warmup 1), not 10."""
    config = write_config(tmp_path / "tiny.yaml", loader={"backend": "torchvision", "batch_size": 8, "workers": 0})
    code, out, err = run_profiling(["trace", "--config", config, "--data", synthetic, "--out", tmp_path / "out",
                                    "--set", "training.epochs=1", "--wait", "1", "--warmup", "1", "--active", "10",
                                    "--memory"], capsys)
    assert code == 0, err
    assert "the run ended after 8 step(s)" in out and "the trace holds 6 active step(s) of 10" in out
    for name in ("trace-rank0.json.gz", "memory-rank0.json.gz", "memory-rank0.png"):
        assert (tmp_path / "out" / name).stat().st_size > 0, name


def test_trace_is_loadable_and_inspect_finds_the_data_ranges(trace_file):
    frame = inspect_trace.load_events(trace_file)
    names = set(frame["name"])
    assert {"data", "forward", "backward", "optimizer"} <= names
    result = inspect_trace.analyse(frame)
    assert result["steps"] == 3
    assert result["busy_ms"] + result["idle_ms"] == pytest.approx(result["span_ms"])
    assert 0 < result["data_wait_share"] < 1
    data = frame[(frame["name"] == "data") & (frame["cat"] == "user_annotation")]
    assert len(data) == 3
    steps = frame[frame["name"].str.startswith("ProfilerStep#")]
    assert result["data_wait_share"] == pytest.approx(data["dur"].sum() / steps["dur"].sum())
    assert result["top_operators"] and result["verdict"].split(":")[0] in ("input-bound", "compute-bound")


def test_inspect_verdicts_follow_the_numbers():
    base = {"span_ms": 100.0, "busy_ms": 90.0, "busy_source": "gpu kernels"}
    assert inspect_trace.verdict({**base, "data_wait_share": 0.62}) == \
        "input-bound: 62% of step time waiting for data"
    assert inspect_trace.verdict({**base, "busy_ms": 40.0, "data_wait_share": 0.02}).startswith("GPU underused")
    assert inspect_trace.verdict({**base, "data_wait_share": 0.02}).startswith("compute-bound")


def test_inspect_rejects_a_file_that_is_not_a_trace(tmp_path):
    from planktonio import PlanktonioError
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(PlanktonioError, match="cannot be read as a Chrome trace"):
        inspect_trace.load_events(bad)


# ------------------------------------------------------------------ report


def loader_row(name: str, values: list[float], boundary_vs_batch: float | None = 1.0) -> dict:
    """A row as `profiling loaders` records it, with what the registry declares about the backend."""
    from planktonio.loaders import BACKENDS
    return {"backend": name, "backend_info": BACKENDS[name].describe(), "images_per_s": stats.summary(values),
            "latency_ms": stats.latency_summary([0.05]), "cpu_util_percent": 90.0, "peak_gpu_memory_mb": None,
            "epoch_boundary_ms": None if boundary_vs_batch is None else 50.0, "boundary_vs_batch": boundary_vs_batch,
            "stats": {}}


def loaders_result(rows: list[dict], device: str = "cpu") -> dict:
    return {"kind": "loaders", "environment": {"device": device, "cpu_count": 2, "torch": "x", "date": "today"},
            "config": {"workers": 2, "threads": 2, "batch_size": 64, "split": "train", "repeats": 3, "epochs": 1,
                       "batches_per_epoch": 10, "augment": True, "device": "cuda:0" if device != "cpu" else "cpu"},
            "results": rows}


def test_report_renders_tables_and_plots(trace_file, synthetic, tmp_path, capsys):
    loaders = tmp_path / "loaders.json"
    loaders.write_text(json.dumps(loaders_result([loader_row("dali-cpu", [1300.0, 1250.0, 1350.0]),
                                                  loader_row("torchvision", [600.0, 580.0, 640.0])])))
    inspected = tmp_path / "inspect.json"
    assert run_profiling(["inspect", trace_file, "--json", inspected], capsys)[0] == 0
    amp = tmp_path / "amp.json"
    amp.write_text(json.dumps({"environment": {"device": "cpu"}, **run_amp(AmpBenchmark(
        model="tiny-cnn", batch_size=2, steps=1, warmup=0, repeats=1, image_size=32, num_classes=3,
        precisions=("fp32", "amp-bf16"), layouts=("NCHW",), freeze=("none",)))}))

    path = report.write_report([loaders, amp, inspected], tmp_path / "report")
    text = path.read_text()
    assert "| dali-cpu | candidate | 1300 | 1250 - 1350 | 2.17x |" in text and "| - / - |" in text
    assert "met: dali-cpu >= 2x torchvision (baseline) images/s" in text
    assert "| none frozen | amp-bf16 | NCHW |" in text and "**Verdict:**" in text
    for png in ("loaders-0.png", "amp-1.png"):
        assert (tmp_path / "report" / png).read_bytes()[:4] == b"\x89PNG"
        assert f"({png})" in text


def test_gpu_goals_take_the_best_gpu_row_and_are_not_checked_on_a_cpu(tmp_path):
    """The AMP goal takes the fastest mixed-precision row, the data-wait goal the lowest wait."""
    def row(precision, channels_last, images_per_s):
        return {"freeze": "none", "precision": precision, "channels_last": channels_last, "peak_memory_mb": None,
                "step_ms": stats.summary([1.0]), "images_per_s": stats.summary([images_per_s])}

    def wait(precision, fraction):
        return {"loader": "dali-gpu", "precision": precision, "images_per_s": stats.summary([1.0]),
                "data_wait_fraction": fraction}

    amp = {"kind": "amp", "environment": {"device": "NVIDIA H100 80GB HBM3"},
           "config": {"model": "alexnet", "batch_size": 256, "image_size": 224, "repeats": 1, "steps": 1},
           "compute": [row("fp32", False, 1000.0), row("amp-fp16", False, 1900.0), row("amp-bf16", True, 2300.0)],
           "end_to_end": [wait("fp32", 0.01), wait("amp-fp16", 0.08), wait("amp-bf16", 0.03)]}
    on_gpu, on_cpu = tmp_path / "gpu.json", tmp_path / "cpu.json"
    on_gpu.write_text(json.dumps(amp))
    on_cpu.write_text(json.dumps({**amp, "environment": {"device": "cpu"}}))
    goals = [line for line in report.write_report([on_gpu], tmp_path / "a").read_text().splitlines()
             if line.startswith("- ")]
    assert goals == [
        "- met: AMP >= 2x FP32, full fine-tuning (amp-bf16, channels_last, NVIDIA H100 80GB HBM3): "
        "measured 2.30x (gpu.json)",
        "- met: data wait < 5% of step time, the best loader + AMP (dali-gpu, amp-bf16, NVIDIA H100 80GB HBM3): "
        "measured 3.00% (gpu.json)"]
    assert "## Goals" not in report.write_report([on_cpu], tmp_path / "b").read_text()


def test_report_says_by_how_much_a_goal_was_missed(tmp_path):
    line = goal("dali-gpu >= 10x torchvision", 7.5, 10.0, tmp_path / "r.json")
    assert line == "- MISSED: dali-gpu >= 10x torchvision: measured 7.50x, 2.50x short of 10x (r.json)"


def test_backend_goals_come_from_the_registry_and_apply_on_their_device(tmp_path):
    """The ratios are over the reference where one was measured; a GPU goal is not checked on a CPU; the
    cache's goal is over the fastest other candidate."""
    from planktonio.loaders import BACKENDS
    from profiling.render.loaders import backend_goals
    rows = [loader_row("dali-cpu", [1300.0]), loader_row("torchvision", [650.0]), loader_row("cache", [900.0])]
    result = loaders_result(rows)
    goals = backend_goals(rows, result["config"], result["environment"], tmp_path / "r.json")
    declared = sum(1 for name in ("dali-cpu", "cache") for g in BACKENDS[name].goals if g.device in ("cpu", "any"))
    assert len(goals) == declared
    assert any("dali-cpu >= 2x torchvision (baseline)" in line and "measured 2.00x" in line for line in goals)
    assert any("cache >= 1x the fastest other candidate, dali-cpu" in line and "MISSED" in line for line in goals)
    gpu = loaders_result([loader_row("dali-gpu", [9000.0]), loader_row("torchvision", [1000.0])], "NVIDIA H200")
    gpu_goals = backend_goals(gpu["results"], gpu["config"], gpu["environment"], tmp_path / "r.json")
    assert any("dali-gpu >= 10x torchvision" in line and "MISSED" in line and "9.00x" in line for line in gpu_goals)


def test_a_backend_whose_package_is_missing_is_skipped_with_the_reason(monkeypatch, tmp_path):
    """FFCV is optional: where it is not installed, `--backends auto` (or naming it) measures the others and
    the result and the report say why its row is missing; it is not among the runnable backends."""
    import dataclasses

    from planktonio.loaders import BACKENDS, ffcv_loader, runnable_backends
    from profiling.loader_bench import chosen_backends
    from profiling.render.loaders import text_table
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *args: None)
    why = ffcv_loader.ffcv_missing()
    assert "pip install 'planktonio[ffcv]'" in why and "libturbojpeg0-dev" in why
    monkeypatch.setitem(BACKENDS, "ffcv", dataclasses.replace(BACKENDS["ffcv"], missing=lambda: why))
    cpu = torch.device("cpu")
    assert "ffcv" not in runnable_backends(cpu)
    names, skipped = chosen_backends(LoaderBenchmark(data="x"), cpu)
    assert "ffcv" not in names and "turbo" in names and skipped == {"ffcv": why}
    names, skipped = chosen_backends(LoaderBenchmark(data="x", backends=("ffcv", "turbo")), cpu)
    assert names == ["turbo"] and skipped == {"ffcv": why}
    result = {**loaders_result([loader_row("turbo", [2000.0])]), "skipped": skipped}
    assert f"ffcv         skipped: {why}" in text_table(result)
    path = tmp_path / "loaders.json"
    path.write_text(json.dumps(result))
    assert f"ffcv: not measured: {why}" in report.write_report([path], tmp_path / "report").read_text()


def test_the_turbo_goal_is_over_the_fastest_peer(tmp_path):
    """turbo promises FFCV's speed on a CPU: its goal is taken over the fastest peer row of the same run."""
    from profiling.render.loaders import backend_goals
    rows = [loader_row("turbo", [2300.0]), loader_row("ffcv", [2000.0]), loader_row("torchvision", [600.0])]
    result = loaders_result(rows)
    goals = backend_goals(rows, result["config"], result["environment"], tmp_path / "r.json")
    assert any("turbo >= 1x the fastest other peer, ffcv" in line and "1.15x" in line and "MISSED" not in line
               for line in goals)


def test_a_loader_result_of_one_batch_epochs_renders(tmp_path):
    """With the training split no larger than two batches every timed batch opens an epoch: no ordinary
    batch to compare the boundary with, boundary_vs_batch is None, and the report says '-' for it."""
    path = tmp_path / "loaders.json"
    path.write_text(json.dumps(loaders_result([loader_row("dali-cpu", [1300.0], None),
                                               loader_row("torchvision", [600.0], None)])))
    text = report.write_report([path], tmp_path / "report").read_text()
    assert "| dali-cpu | candidate | 1300 |" in text and "epoch boundary costs" not in text


def test_the_report_imports_no_torch(tmp_path):
    """Turning JSON into markdown runs anywhere: `profiling report` imports neither torch nor the model code."""
    code = ("import sys; from profiling.__main__ import main; main(['report', sys.argv[1], '--out', sys.argv[2]]); "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    path = tmp_path / "loaders.json"
    path.write_text(json.dumps(loaders_result([loader_row("dali-cpu", [1300.0]), loader_row("torchvision", [600.0])])))
    done = python("-c", code, path, tmp_path / "report")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "report" / "report.md").is_file()


@pytest.mark.slow  # eight measurements, each in a process of its own (the point: its peak memory): about a minute
def test_the_scale_benchmark_measures_each_size_and_fits_the_growth(tmp_path, capsys):
    """Two tiny sizes through `profiling scale`: every cost measured for each (prepare, pack, the first batch
    from loose files and from shards), in processes of their own; the growth exponents and bytes per image
    follow from the figures; the sets are kept and not made again; the report renders the section with its
    goals. (The figures themselves are the benchmark's to record, never a test's to check.)"""
    from profiling import scale
    out = tmp_path / "scale"
    argv = ["scale", "--out", str(out), "--sizes", "300,600", "--image-size", "16", "--batch-size", "16",
            "--batches", "2", "--workers", "1"]
    code, printed, err = run_profiling(argv, capsys)
    assert code == 0, err
    result = json.loads((out / "scale.json").read_text())
    assert result["kind"] == "scale" and result["config"]["sizes"] == [300, 600]
    for row in result["results"]:
        for how in ("loose", "shards"):
            measured = row[how]
            assert 0 < measured["make_loader_seconds"] <= measured["first_batch_seconds"]
            assert measured["steady_batches"] == 2 and measured["peak_bytes"] > 0
        assert row["prepare_images_per_s"] > 0 and row["pack_images_per_s"] > 0
    rows = result["results"]
    assert result["growth"]["first_batch_seconds_shards"] == pytest.approx(scale.growth(
        [300, 600], [r["shards"]["first_batch_seconds"] for r in rows]))
    assert result["bytes_per_image"]["prepare"] == pytest.approx(
        (rows[1]["prepare_peak_bytes"] - rows[0]["prepare_peak_bytes"]) / 300)
    assert sorted(p.name for p in (out / "sets" / "600").iterdir()) == [*(f"class{k}" for k in range(8)), "made.json"]
    assert sum(len(list((out / "sets" / "600" / f"class{k}").iterdir())) for k in range(8)) == 600
    assert scale.make_set(out / "sets" / "600", 600, 16, 1) == 0.0  # kept: not made again
    assert not (out / "prepared" / "600").exists()  # removed once measured (--keep keeps it)
    assert "| 600 |" in printed and "wrote" in printed
    text = report.write_report([out / "scale.json"], tmp_path / "report").read_text()
    assert "How the costs grow" in text and "grows no faster than N^0.2" in text


def test_scale_refuses_sizes_over_the_disk_or_the_memory_before_it_starts(tmp_path, capsys):
    """Issue 34 #8: --sizes 999999999999999 grew to 24 GB before the OOM killer ended it; now one line."""
    out = tmp_path / "scale"
    code, _, err = run_profiling(["scale", "--out", str(out), "--sizes", "999999999999999"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "scale benchmark: --sizes 999999999999999 needs about" in err and "give smaller sizes" in err
    assert not (out / "sets").exists()


def test_a_kept_set_is_reused_only_with_its_images(tmp_path, capsys):
    """Issue 34 #8: a kept set with some of its images deleted was reused and reported at its old size. Its
    count and a fingerprint of its files are checked; a set changed since it was made is made again."""
    from profiling import scale
    folder = tmp_path / "sets" / "40"
    assert scale.make_set(folder, 40, 16, 1) > 0
    assert scale.make_set(folder, 40, 16, 1) == 0.0  # kept
    for victim in sorted((folder / "class3").iterdir())[:2]:
        victim.unlink()
    assert scale.make_set(folder, 40, 16, 1) > 0
    assert "holds 38 images, not 40 since it was made: making it again" in capsys.readouterr().out
    assert scale.contents(folder)[0] == 40
    with open(next((folder / "class0").iterdir()), "ab") as image:
        image.write(b"\0")
    assert scale.make_set(folder, 40, 16, 1) > 0
    assert "holds other files since it was made" in capsys.readouterr().out


def test_the_growth_fit_finds_known_exponents():
    from profiling.scale import growth, per_image
    sizes = [10_000, 100_000, 1_000_000]
    assert growth(sizes, [3.0 * n ** 0.5 for n in sizes]) == pytest.approx(0.5)
    assert growth(sizes, [7.0, 7.0, 7.0]) == pytest.approx(0.0, abs=1e-12)
    assert growth([10_000], [1.0]) is None
    assert per_image(sizes, [100, 200, 1_000_100]) == pytest.approx(1_000_000 / 990_000)


def test_the_stage_breakdown_times_each_stage_of_each_pipeline_and_every_backend_whole(plankton, tmp_path):
    """`python -m profiling.stages`: each operation pipeline's stages cost some CPU per image, the decoded
    store reads and decodes nothing, and every backend that reads images here is timed whole."""
    from planktonio.loaders import runnable_backends
    from profiling import stages

    assert stages.main(["--data", str(plankton), "--images", "8", "--json", str(tmp_path / "stages.json")]) == 0
    result = json.loads((tmp_path / "stages.json").read_text())["us_per_image"]
    for pipeline in (stages.TV, stages.PIL_ROW, stages.TURBO):
        assert all(result[pipeline][stage] > 0 for stage in ("read", "decode", "crop+resize", "normalise"))
    assert result[stages.CACHE_ROW]["read"] == result[stages.CACHE_ROW]["decode"] == 0
    assert result[stages.CACHE_ROW]["crop+resize"] > 0
    backends = runnable_backends(torch.device("cpu"), roles=("reference", "baseline", "candidate", "peer"))
    assert backends and all(result[name]["whole"] > 0 for name in backends)


def test_smoke_checks_every_loader_of_ours_and_no_peer(monkeypatch, tmp_path):
    """The smoke check builds every backend a job could run here; a peer (another project's loader, FFCV)
    is measured by `profiling loaders` only, so its set-up is not the smoke check's."""
    from planktonio.loaders import BACKENDS, runnable_backends
    from profiling import smoke
    from profiling.settings import Smoke

    def nothing(*args):
        return lambda: "not run here"
    monkeypatch.setattr(smoke, "training_check", nothing)
    monkeypatch.setattr(smoke, "all_reduce_check", nothing)
    monkeypatch.setattr(smoke, "loader_check", nothing)
    result = smoke.run(Smoke(data=str(tmp_path), device="cpu"))
    loaders = [c["name"].removeprefix("loader ") for c in result["checks"] if c["name"].startswith("loader ")]
    runnable = runnable_backends(torch.device("cpu"))
    assert loaders == [name for name in runnable if BACKENDS[name].role != "peer"]
    assert {"torchvision", "turbo"} <= set(loaders)

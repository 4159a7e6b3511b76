"""Reading traces back: every rank of a run, two runs compared, the GPU breakdown, bad input.

The CPU traces come from real runs of `python -m profiling trace` (tiny-cnn,
64 px, the small synthetic set, 3 recorded steps), with one OpenMP thread per
process: on this shared 2-core machine two threads per process made steps
swing between 10 and 400 ms (threads spinning for a core), one thread gives
5.5 +- 0.3 ms. A slow loader is made by tests/delayed_loader.py, a sleep in
the training batches of one rank. The GPU arithmetic is checked on a
synthetic trace whose answers are worked out by hand below.
"""

from __future__ import annotations

import gzip
import json
import sys
import tracemalloc

import pytest

from planktonio import PlanktonioError
from profiling import report
from profiling.__main__ import main as profiling_main
from profiling.inspect_compare import compare, format_comparison
from profiling.inspect_ranks import analyse_ranks
from profiling.inspect_trace import BREAKDOWN, analyse, format_report, load_events, shares_of_step

from .helpers import process_env, python, run_process, run_profiling

DELAY = 0.2  # seconds a delayed loader sleeps before each batch: 30-40 times a step here
STEPS = 3    # recorded ("active") steps of every traced run
CONFIG = {"model": {"name": "tiny-cnn"}, "loader": {"backend": "torchvision", "batch_size": 4, "workers": 0},
          "training": {"progress": False},
          "augment": {"train": {"crop": "random_resized", "size": 64, "resize": 72},
                      "eval": {"crop": "center", "size": 64, "resize": 72}}}


def no_nan(text: str) -> dict:
    """JSON as the CLI wrote it, refusing NaN and infinities."""
    def refuse(constant):
        raise AssertionError(f"{constant} in the JSON")
    return json.loads(text, parse_constant=refuse)


def traced(data, out, processes: int = 1, delay: float | None = None, delay_rank: int | None = None):
    """Runs `profiling trace` (under torch.distributed.run for several processes) and returns its folder."""
    out.mkdir(parents=True, exist_ok=True)
    config = out / "tiny.yaml"
    config.write_text(json.dumps(CONFIG))
    env = process_env()
    env.pop("DELAY_RANK", None)
    if delay:
        env["DELAY_SECONDS"] = str(delay)
        if delay_rank is not None:
            env["DELAY_RANK"] = str(delay_rank)
    command = [sys.executable]
    if processes > 1:
        command += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    command += ["-m", "tests.delayed_loader" if delay else "profiling", "trace", "--config", str(config),
                "--data", str(data), "--out", str(out), "--wait", "1", "--warmup", "1", "--active", str(STEPS)]
    result = run_process(command, timeout=300, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def gloo_run(synthetic, tmp_path_factory):
    return traced(synthetic, tmp_path_factory.mktemp("gloo"), processes=2)


@pytest.fixture(scope="module")
def straggler_run(synthetic, tmp_path_factory):
    return traced(synthetic, tmp_path_factory.mktemp("straggler"), processes=2, delay=DELAY, delay_rank=1)


@pytest.fixture(scope="module")
def delayed_pair(synthetic, tmp_path_factory):
    plain = traced(synthetic, tmp_path_factory.mktemp("plain"))
    delayed = traced(synthetic, tmp_path_factory.mktemp("delayed"), delay=DELAY / 2)
    return plain / "trace-rank0.json.gz", delayed / "trace-rank0.json.gz"


# ------------------------------------------------------------------ every rank of a run


def test_every_rank_of_a_gloo_run_matches_its_trace_read_alone(gloo_run, tmp_path, capsys):
    assert sorted(p.name for p in gloo_run.glob("trace-rank*")) == ["trace-rank0.json.gz", "trace-rank1.json.gz"]
    out = tmp_path / "ranks.json"
    code, stdout, err = run_profiling(["inspect", gloo_run, "--json", out], capsys)
    assert code == 0, err
    assert "rank steps" in stdout and "verdict: 2 ranks" in stdout
    ranks = no_nan(out.read_text())
    assert ranks["kind"] == "inspect-ranks" and [r["rank"] for r in ranks["ranks"]] == [0, 1]
    for row in ranks["ranks"]:
        frame = load_events(gloo_run / f"trace-rank{row['rank']}.json.gz")
        alone = analyse(frame)
        assert frame.attrs["rank"] == row["rank"]  # the trace's own distributedInfo agrees with its name
        for key in ("steps", "mean_step_ms", "data_wait_share", "range_share_of_step", "breakdown_ms_per_step",
                    "communication_share"):
            assert row[key] == pytest.approx(alone[key]), key
        # ... and with the raw events: ProfilerStep and "data" ranges of this trace
        steps = frame[frame["name"].str.startswith("ProfilerStep#")]
        data = frame[(frame["name"] == "data") & (frame["cat"] == "user_annotation")]
        assert row["steps"] == len(steps) == STEPS
        assert row["data_wait_share"] == pytest.approx(data["dur"].sum() / steps["dur"].sum())
        assert sum(shares_of_step(row).values()) == pytest.approx(1)
        # On gloo the all-reduce runs on gloo's threads as "gloo:all_reduce" ranges.
        assert "gloo:all_reduce" in row["communication_ops"] and row["communication_share"] > 0


def test_a_rank_slowed_in_its_data_path_is_named_the_straggler(straggler_run):
    result = analyse_ranks(straggler_run)
    summary, (fast, slow) = result["summary"], result["ranks"]
    assert (summary["straggler"], summary["cause"]) == (1, "data wait")
    # Rank 1 waits for its loader; rank 0, in step with it, waits for rank 1 in the collectives.
    assert slow["data_wait_share"] > 0.5 and shares_of_step(slow)["communication"] < 0.2
    assert shares_of_step(fast)["communication"] > 0.5 and fast["data_wait_share"] < 0.2
    assert "rank 1 is the straggler: its data wait" in summary["verdict"]
    assert "while rank 0 waits for it in communication (gloo:" in summary["verdict"]


# ------------------------------------------------------------------ two runs compared


def test_a_delay_in_the_data_path_is_found_in_the_data_range(delayed_pair, tmp_path, capsys):
    """The delay d (0.1 s per batch) must show as a change of the "data" range between 0.9 d and 1.5 d
    per step, while no compute range changes by more than d / 4.

    Why these bounds: time.sleep never returns early, so the change is at least d, less any drift of
    the loader's own time between the two runs (about 2 ms a batch here; 10% of d leaves room for a
    busy machine). Past d it is the scheduler's lateness in waking the process, which on a shared
    2-core machine can reach tens of ms (hence +50%). The compute ranges do the same work in both runs.
    """
    plain, delayed = delayed_pair
    delay_ms = 1000 * DELAY / 2
    out = tmp_path / "compare.json"
    code, _, err = run_profiling(["inspect", plain, delayed, "--json", out], capsys)
    assert code == 0, err
    comparison = no_nan(out.read_text())
    assert comparison["kind"] == "inspect-compare"
    ranges = {r["name"]: r["change_ms"] for r in comparison["ranges"]}
    assert 0.9 * delay_ms <= ranges["data"] <= 1.5 * delay_ms, ranges
    assert all(abs(ranges[name]) < delay_ms / 4 for name in ("forward", "backward", "optimizer")), ranges
    assert comparison["step"]["change_ms"] > 0.75 * delay_ms  # the step also carries the compute's jitter
    assert 'the step got' in comparison["verdict"] and 'longer' in comparison["verdict"]
    assert 'the largest change is in the "data" range' in comparison["verdict"]
    assert comparison["b"]["data_wait_share"] > 0.5 > comparison["a"]["data_wait_share"]
    backwards = compare(delayed, plain)  # the same pair the other way round
    assert backwards["step"]["change_ms"] == pytest.approx(-comparison["step"]["change_ms"])
    assert "shorter" in backwards["verdict"] and "the CPU idles" in backwards["verdict"]


def test_folders_compare_as_the_mean_of_their_ranks(gloo_run, straggler_run):
    """One rank of two delayed by d: the mean "data" range grows by about d / 2 (the bounds of the test
    above, halved), and both ranks' steps by about d, as they meet in every all-reduce. The step's lower
    bound is looser, 0.75 d: the undelayed run's step carries the jitter of two processes meeting in
    collectives on 2 shared cores (seen: 25 ms a step), which the "data" range does not."""
    comparison = compare(gloo_run, straggler_run)
    delay_ms = 1000 * DELAY
    ranges = {r["name"]: r["change_ms"] for r in comparison["ranges"]}
    device = {r["name"]: r["change_ms"] for r in comparison["breakdown"]}
    assert comparison["a"]["traces"] == comparison["b"]["traces"] == 2
    assert 0.75 * delay_ms <= comparison["step"]["change_ms"] <= 1.5 * delay_ms
    assert 0.45 * delay_ms <= ranges["data"] <= 0.75 * delay_ms
    assert device["communication"] > 0.3 * delay_ms  # rank 0's wait for rank 1


# ------------------------------------------------------------------ GPU traces (synthetic)

NCCL = "ncclDevKernel_AllReduce_Sum_f32_RING_LL(ncclDevKernelArgsStorage<4096ul>)"


def complete(cat, name, ts, dur, pid=1, tid=1, **args):
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "pid": pid, "tid": tid, "args": args}


def gpu_events() -> list[dict]:
    """Two 1000 us steps of a GPU run, in torch.profiler's categories (GPU: pid 0, stream 7).

    Step 1 [0, 1000): the host loads data [0, 300) with the GPU idle; an H2D copy [310, 350); kernels
    [350, 600) and [550, 700); an all-reduce [650, 800), exposed from 700; a memset [820, 840); a kernel
    [850, 900). Compute 400, copies 60, communication 100 (150 in all), idle waiting for data 300,
    idle waiting for the host 10 + 20 + 10 + 100 = 140.
    Step 2 [1000, 2000): data [1000, 1100) with a kernel [1050, 1080) left from the step before; an H2D
    copy [1100, 1200) under a kernel [1150, 1500) from 1150; an all-reduce [1400, 1600); a D2H copy
    [1500, 1520) under it. Compute 380, copies 50, communication 100 (200 in all), idle waiting for
    data 50 + 20 = 70, for the host 400.
    """
    host = [("ProfilerStep#1", 0, 1000), ("data", 0, 300), ("forward", 300, 200), ("backward", 500, 300),
            ("optimizer", 800, 100), ("ProfilerStep#2", 1000, 1000), ("data", 1000, 100), ("forward", 1100, 200),
            ("backward", 1300, 400), ("optimizer", 1700, 100)]
    events = [complete("user_annotation", name, ts, dur) for name, ts, dur in host]
    events += [complete("cpu_op", "aten::conv2d", 310, 100), complete("cuda_runtime", "cudaLaunchKernel", 320, 5),
               complete("gpu_user_annotation", "forward", 350, 300, pid=0, tid=7)]  # the GPU's copy of a range

    def gpu(cat, name, ts, dur, **args):
        return complete(cat, name, ts, dur, pid=0, tid=7, **args)

    events += [gpu("gpu_memcpy", "Memcpy HtoD (Pinned -> Device)", 310, 40, bytes=1_000_000),
               gpu("kernel", "sm90_gemm", 350, 250), gpu("kernel", "elementwise", 550, 150),
               gpu("kernel", NCCL, 650, 150), gpu("gpu_memset", "Memset (Device)", 820, 20, bytes=512),
               gpu("kernel", "sgd_update", 850, 50),
               gpu("kernel", "elementwise", 1050, 30),
               gpu("gpu_memcpy", "Memcpy HtoD (Pinned -> Device)", 1100, 100, bytes=3_000_000),
               gpu("kernel", "sm90_gemm", 1150, 350), gpu("kernel", NCCL, 1400, 200),
               gpu("gpu_memcpy", "Memcpy DtoH (Device -> Pinned)", 1500, 20, bytes=4000),
               gpu("kernel", "after_the_last_step", 2100, 100)]  # outside every step: in totals, not in steps
    events += [{"ph": "M", "name": "process_name", "pid": 0, "args": {"name": "GPU 0"}},
               {"ph": "s", "id": 1, "cat": "ac2g", "name": "ac2g", "ts": 320, "pid": 1, "tid": 1}]
    return events


def write_trace(path, trace) -> None:
    with gzip.open(path, "wt") as f:
        json.dump(trace, f)


def gpu_trace(path, events=None, rank=3):
    write_trace(path, {"schemaVersion": 1, "deviceProperties": [{"id": 0, "name": "NVIDIA H100 80GB HBM3"}],
                       "distributedInfo": {"backend": "nccl", "rank": rank, "world_size": 4},
                       "traceEvents": gpu_events() if events is None else events})
    return path


def test_gpu_breakdown_on_a_synthetic_trace_has_the_known_answers(tmp_path):
    result = analyse(load_events(gpu_trace(tmp_path / "trace-rank3.json.gz")))
    assert (result["rank"], result["device"], result["steps"]) == (3, "NVIDIA H100 80GB HBM3", 2)
    assert result["breakdown_ms_per_step"] == pytest.approx(
        {"compute": 0.390, "copies": 0.055, "communication": 0.100, "loader": 0.0, "idle_data": 0.185,
         "idle_host": 0.270})
    assert result["mean_step_ms"] == pytest.approx(1.0) and result["step_ms"] == pytest.approx([1.0, 1.0])
    assert (result["busy_ms"], result["idle_ms"], result["span_ms"]) == pytest.approx((1.09, 0.91, 2.0))
    assert result["copy_bytes_per_step"] == pytest.approx({"HtoD": 2_000_000, "DtoH": 2000, "DtoD": 0})
    assert result["communication_share"] == pytest.approx(350 / 2000)
    assert result["data_wait_share"] == pytest.approx(400 / 2000)
    assert result["ranges_ms_per_step"] == pytest.approx(
        {"data": 0.2, "forward": 0.2, "backward": 0.35, "optimizer": 0.1})
    assert result["communication_ops"] == [NCCL]
    top = result["top_kernels"][0]
    assert (top["name"], top["calls"], top["total_ms"], top["ms_per_step"]) == ("sm90_gemm", 2, pytest.approx(0.6),
                                                                                pytest.approx(0.3))
    assert result["busy_source"] == "gpu kernels" and result["verdict"].startswith("GPU underused")
    assert "idle waiting for data" in result["verdict"] and "for the host" in result["verdict"]


def test_gpu_traces_compare_copies_and_idle(tmp_path):
    """uint8 instead of float32 input: a quarter of the host-to-device bytes, the rest unchanged."""
    smaller = gpu_events()
    for event in smaller:
        if event.get("name", "").startswith("Memcpy HtoD"):
            event["args"]["bytes"] //= 4
    a = gpu_trace(tmp_path / "a.json.gz")
    b = gpu_trace(tmp_path / "b.json.gz", smaller)
    comparison = compare(a, b)
    assert comparison["step"]["change_ms"] == 0
    assert comparison["b"]["copy_bytes_per_step"]["HtoD"] == 500_000
    assert [r["change_ms"] for r in comparison["breakdown"]] == [0] * len(BREAKDOWN)
    assert comparison["kernels"][0]["change_ms"] == 0
    for part in ("the step took as long (1.0 -> 1.0 ms)", "data wait went from 20% to 20% of the step",
                 "the GPU idles as much", "host-to-device copies 2.00 -> 0.50 MB per step"):
        assert part in comparison["verdict"]


def test_a_straggler_on_gpus_is_found_through_nccl_kernels(tmp_path):
    """Rank 1 is the trace above, whose loader takes 300 us in step 1; rank 0 has its batch after 10 us
    and waits the rest in an NCCL kernel (a collective that rank 1 joins late)."""
    folder = tmp_path / "run"
    folder.mkdir()
    gpu_trace(folder / "trace-rank1.json.gz", rank=1)
    waiting = [e for e in gpu_events() if (e["name"], e.get("ts")) != ("data", 0)]
    waiting += [complete("user_annotation", "data", 0, 10), complete("kernel", NCCL, 10, 290, pid=0, tid=7)]
    gpu_trace(folder / "trace-rank0.json.gz", waiting, rank=0)
    summary = analyse_ranks(folder)["summary"]
    assert (summary["straggler"], summary["cause"]) == (1, "data wait")
    assert "rank 0 waits for it in communication (ncclDevKernel_AllReduce" in summary["verdict"]


# A dali-gpu run: the training thread (tid 1) launches the model's kernels on stream 7 (the autograd
# thread, tid 3, the backward's); DALI's thread (tid 2) launches its decoding and resizing on its own
# stream 20; launches and kernels share a correlation id, as in torch.profiler's traces.
TRAINING, DALI_THREAD, AUTOGRAD, MODEL_STREAM, DALI_STREAM = 1, 2, 3, 7, 20


def dali_gpu_events() -> list[dict]:
    """Two 1000 us steps; the answers, worked out by hand:

    Step 1 [0, 1000): the host leaves "data" at 50 (DALI hands over a batch its kernels still work on);
    DALI's kernels run [10, 200) (dali::) and [200, 400) (a generic name, on DALI's stream), the model's
    forward waits for them: [400, 600), backward [600, 800), optimizer [800, 850). Compute 450, loader
    390 (nothing of the model runs meanwhile), idle waiting for data 10 ([0, 10)), for the host 150.
    Step 2 [1000, 2000): the host waits in "data" [1000, 1100) and there launches a normalisation on
    the model's stream, [1020, 1060): the loader's work; a copy [1060, 1100); forward [1120, 1500), under
    which DALI's [1300, 1450) costs nothing and its nvJPEG kernel [1450, 1550) costs 50; backward
    [1550, 1750), optimizer [1750, 1800); DALI prefetches [1800, 1950). Compute 630, copies 40, loader
    40 + 50 + 150 = 240, idle waiting for data 20 ([1000, 1020)), for the host 20 + 50 = 70.
    """
    host = [("ProfilerStep#1", 0, 1000), ("data", 0, 50), ("forward", 50, 250), ("backward", 300, 300),
            ("optimizer", 600, 100), ("ProfilerStep#2", 1000, 1000), ("data", 1000, 100),
            ("forward", 1100, 300), ("backward", 1400, 300), ("optimizer", 1700, 100)]
    events = [complete("user_annotation", name, ts, dur, tid=TRAINING) for name, ts, dur in host]
    kernels = [  # (launching thread, launch time, stream, name, start, duration)
        (DALI_THREAD, 5, DALI_STREAM, "void dali::kernels::ResizeKernel<float>", 10, 190),
        (DALI_THREAD, 15, DALI_STREAM, "void cub::DeviceRadixSortOnesweepKernel", 200, 200),
        (TRAINING, 60, MODEL_STREAM, "sm90_gemm", 400, 200),
        (AUTOGRAD, 310, MODEL_STREAM, "conv_backward", 600, 200),
        (TRAINING, 610, MODEL_STREAM, "sgd_update", 800, 50),
        (TRAINING, 1010, MODEL_STREAM, "normalize_uint8", 1020, 40),
        (TRAINING, 1110, MODEL_STREAM, "sm90_gemm", 1120, 380),
        (DALI_THREAD, 1200, DALI_STREAM, "void dali::kernels::SliceFlipNormalizePermutePad", 1300, 150),
        (DALI_THREAD, 1440, DALI_STREAM, "nvjpeg::decode_huffman_gpu", 1450, 100),
        (AUTOGRAD, 1410, MODEL_STREAM, "conv_backward", 1550, 200),
        (TRAINING, 1710, MODEL_STREAM, "sgd_update", 1750, 50),
        (DALI_THREAD, 1790, DALI_STREAM, "void dali::kernels::ResizeKernel<float>", 1800, 150),
    ]
    for correlation, (thread, launched, stream, name, ts, dur) in enumerate(kernels, start=100):
        events.append(complete("cuda_runtime", "cudaLaunchKernel", launched, 3, tid=thread, correlation=correlation))
        events.append(complete("kernel", name, ts, dur, pid=0, tid=stream, stream=stream, correlation=correlation))
    events.append(complete("gpu_memcpy", "Memcpy HtoD (Pinned -> Device)", 1060, 40, pid=0, tid=MODEL_STREAM,
                           stream=MODEL_STREAM, bytes=600_000))
    return events


def test_dali_kernels_on_their_own_stream_are_the_loaders_and_the_model_waiting_on_them_is_data_wait(tmp_path):
    result = analyse(load_events(gpu_trace(tmp_path / "dali.json.gz", dali_gpu_events())))
    assert result["breakdown_ms_per_step"] == pytest.approx(
        {"compute": 0.540, "copies": 0.020, "communication": 0.0, "loader": 0.315, "idle_data": 0.015,
         "idle_host": 0.110})
    assert sum(shares_of_step(result).values()) == pytest.approx(1)
    assert (result["busy_ms"], result["idle_ms"], result["span_ms"]) == pytest.approx((1.75, 0.25, 2.0))
    assert result["data_wait_share"] == pytest.approx(150 / 2000)  # the host hardly waits ...
    assert result["device_data_wait_share"] == pytest.approx(0.33)  # ... the model does, on the device
    assert result["verdict"].startswith("input-bound: 33% of step time waiting for data"), result["verdict"]
    assert "32% with only the loader's kernels running" in result["verdict"]
    assert "loader kernels 0.3 ms" in format_report(tmp_path / "dali.json.gz", result)
    # Against the same run with every kernel the model's (as read before the loader part), the loader's
    # share moves out of compute and out of idle: the step is the same.
    comparison = compare(gpu_trace(tmp_path / "plain.json.gz"), tmp_path / "dali.json.gz")
    rows = {r["name"]: r for r in comparison["breakdown"]}
    assert [r["name"] for r in comparison["breakdown"]] == list(BREAKDOWN)
    assert (rows["loader"]["a_ms"], rows["loader"]["b_ms"]) == pytest.approx((0.0, 0.315))
    assert "device: loader kernels" in format_comparison(comparison)


def test_without_launch_records_only_dali_and_nvjpeg_names_mark_loader_kernels(tmp_path):
    """A trace without correlation ids (older or trimmed): streams cannot be told apart, so every kernel is
    the model's as before, except those named as DALI's or nvJPEG's / nvImageCodec's."""
    events = gpu_events() + [complete("kernel", "void dali::kernels::ResizeKernel<float>", 1750, 40, pid=0, tid=7),
                             complete("kernel", "nvimgcodec_decode", 1790, 10, pid=0, tid=7)]
    result = analyse(load_events(gpu_trace(tmp_path / "t.json.gz", events)))
    before = analyse(load_events(gpu_trace(tmp_path / "plain.json.gz")))
    parts, was = result["breakdown_ms_per_step"], before["breakdown_ms_per_step"]
    assert parts["loader"] == pytest.approx(0.025) and parts["compute"] == pytest.approx(was["compute"])
    assert parts["idle_host"] == pytest.approx(was["idle_host"] - 0.025)  # [1750, 1800) was idle: the host's


# ------------------------------------------------------------------ bad input: one line, never a traceback


def test_chrome_array_format_and_stray_events_read_like_the_object_format(tmp_path):
    expected = analyse(load_events(gpu_trace(tmp_path / "object.json.gz")))
    array = tmp_path / "array.json"
    array.write_text(json.dumps([42, "text", None, [], {"ph": "X"}, {"ph": "X", "name": "x", "ts": "soon"},
                                 *gpu_events()]))
    result = analyse(load_events(array))
    for key in ("steps", "breakdown_ms_per_step", "copy_bytes_per_step", "communication_share", "data_wait_share"):
        assert result[key] == pytest.approx(expected[key]), key
    assert result["rank"] is None and result["device"] == "gpu"  # the array format carries no metadata


def test_zero_length_steps_are_left_out_and_a_trace_of_only_those_is_refused(tmp_path):
    events = gpu_events() + [complete("user_annotation", "ProfilerStep#3", 2000, 0)]
    result = analyse(load_events(gpu_trace(tmp_path / "t.json.gz", events)))
    assert (result["steps"], result["empty_steps_dropped"]) == (2, 1)
    assert result["mean_step_ms"] == pytest.approx(1.0)
    json.dumps(result, allow_nan=False)  # no NaN anywhere
    only_empty = [complete("user_annotation", "ProfilerStep#1", 0, 0), complete("cpu_op", "aten::mm", 0, 0)]
    with pytest.raises(PlanktonioError, match="zero length"):
        analyse(load_events(gpu_trace(tmp_path / "empty.json.gz", only_empty)))


RANDOM = bytes(range(256)) * 3  # not UTF-8, not JSON, not gzip


@pytest.mark.parametrize("name, content, message", [
    ("random.json", RANDOM, "cannot be read as a Chrome trace"),
    ("random.json.gz", RANDOM, "cannot be read as a Chrome trace"),
    ("broken.json.gz", b"\x1f\x8b\x08\x00" + RANDOM, "cannot be read as a Chrome trace"),
    ("truncated.json.gz", gzip.compress(b'{"traceEvents": [' * 50, mtime=0)[:40], "cannot be read as a Chrome trace"),
    ("deep.json", b"[" * 100_000, "cannot be read as a Chrome trace"),
    ("number.json", b"42", "not a Chrome trace"),
    ("events.json", b'{"traceEvents": "none"}', "not a Chrome trace"),
    ("instant.json", b'[{"ph": "i", "name": "x", "ts": 1}]', "no timed events"),
    ("nosteps.json", b'[{"ph": "X", "name": "aten::mm", "cat": "cpu_op", "ts": 1, "dur": 2}]', "no ProfilerStep"),
])
def test_bad_traces_give_one_line_errors(tmp_path, capsys, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(PlanktonioError, match=message) as error:
        analyse(load_events(path))
    assert "\n" not in str(error.value)
    # The command line (in this process: any other exception would fail the test with its traceback)
    assert profiling_main(["inspect", str(path)]) == 2
    assert capsys.readouterr().err == f"error: {error.value}\n"


def write_bomb(path, mib: int) -> None:
    """mib MiB of zeros, gzipped to about a thousandth of that, written a MiB at a time."""
    with gzip.open(path, "wb", compresslevel=9) as f:
        for _ in range(mib):
            f.write(bytes(2**20))


def test_a_gzip_bomb_stops_at_the_size_limit_without_inflating(tmp_path, monkeypatch, capsys):
    """64 MiB of zeros in 64 KB, read with a 4 MiB limit: refused once 4 MiB are out, with the memory
    of the limit, not of the whole (the default, 1 GiB, works alike on a bigger bomb)."""
    bomb = tmp_path / "bomb.json.gz"
    write_bomb(bomb, 64)
    assert bomb.stat().st_size < 2**20 // 4
    monkeypatch.setenv("PROFILING_TRACE_MAX_MB", "4")
    tracemalloc.start()
    try:
        with pytest.raises(PlanktonioError) as error:
            load_events(bomb)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 12 * 2**20, peak  # the limit, a chunk and the growth of one buffer
    message = str(error.value)
    assert message.startswith(f"trace {bomb}: more than 4 MiB once decompressed") and "\n" not in message
    assert "PROFILING_TRACE_MAX_MB=8" in message  # how to raise it
    assert profiling_main(["inspect", str(bomb)]) == 2
    assert capsys.readouterr().err == f"error: {message}\n"


def test_the_size_limit_lets_real_traces_through_and_is_checked(tmp_path, monkeypatch):
    trace = gpu_trace(tmp_path / "t.json.gz")
    size = len(gzip.decompress(trace.read_bytes()))
    assert analyse(load_events(trace, max_bytes=size))["steps"] == 2  # exactly at the limit: read
    with pytest.raises(PlanktonioError, match="more than"):
        load_events(trace, max_bytes=size - 1)
    plain = tmp_path / "plain.json"  # the limit is on the JSON text, compressed or not
    plain.write_bytes(gzip.decompress(trace.read_bytes()))
    with pytest.raises(PlanktonioError, match="more than"):
        load_events(plain, max_bytes=size - 1)
    for bad in ("lots", "0", "-5", "nan"):
        monkeypatch.setenv("PROFILING_TRACE_MAX_MB", bad)
        with pytest.raises(PlanktonioError, match=f"PROFILING_TRACE_MAX_MB={bad!r}: expected"):
            load_events(trace)


def test_inspect_refuses_an_empty_folder_and_three_paths(tmp_path, capsys):
    assert profiling_main(["inspect", str(tmp_path)]) == 2
    assert "no trace-rank<R>.json.gz files" in capsys.readouterr().err
    assert profiling_main(["inspect", str(tmp_path), str(tmp_path), str(tmp_path)]) == 2
    assert "give one trace or folder, or two to compare" in capsys.readouterr().err


# ------------------------------------------------------------------ report


def test_report_shows_every_rank_and_the_comparison(straggler_run, delayed_pair, tmp_path, capsys):
    ranks, comparison = tmp_path / "ranks.json", tmp_path / "compare.json"
    assert run_profiling(["inspect", straggler_run, "--json", ranks], capsys)[0] == 0
    assert run_profiling(["inspect", *delayed_pair, "--json", comparison], capsys)[0] == 0
    text = report.write_report([ranks, comparison], tmp_path / "report").read_text()
    assert f"| 1 | {STEPS} |" in text and "rank 1 is the straggler" in text
    assert "| range `data` |" in text and 'the largest change is in the "data" range' in text
    for png in ("inspect-ranks-0.png", "inspect-compare-1.png"):
        assert (tmp_path / "report" / png).read_bytes()[:4] == b"\x89PNG" and f"({png})" in text


def test_inspect_imports_no_torch(tmp_path):
    """Reading a trace needs neither torch nor a GPU: importing torch took most of the 1.3 GB that
    `profiling inspect` needed for its smallest trace (the parsed events of a million-event trace, kept as
    tuples, not dicts, took the rest down from 1.9 GB too: about 0.6 GB here)."""
    trace = gpu_trace(tmp_path / "trace.json")
    code = ("import sys; from profiling.__main__ import main; assert main(['inspect', sys.argv[1]]) == 0; "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    done = python("-c", code, trace)
    assert done.returncode == 0, done.stderr

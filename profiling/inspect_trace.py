"""`python -m profiling inspect TRACE`: where a traced step's time went.

Reads a torch.profiler Chrome trace into a pandas frame of events and splits
the device's time in every step (ProfilerStep#N) into parts that do not
overlap and add up to the step: compute (the model's GPU kernels; on a
CPU-only trace, the forward, backward and optimizer ranges of train/step.py),
copies not hidden under a kernel, communication (NCCL kernels; on a CPU,
gloo's ranges, counted even inside a compute range, because most of a
collective is waiting for the slowest rank), the loader's GPU kernels where
nothing of the above runs, and idle, split into idle in the host's "data"
range (waiting for the loader) and idle waiting for the host.

Which GPU kernels are the loader's: those named as DALI's, nvJPEG's or
nvImageCodec's; and, where the trace has launch records, kernels on a stream
the training thread launched no model kernel to inside forward, backward or
optimizer (backward's kernels come from autograd's thread but run on the
forward's stream, so the stream, not the thread, decides), and kernels the
training thread launched inside "data". DALI hands over a batch its kernels
are still making, so on a GPU the wait for data can show on the device, not
the host: the verdict reads the larger of the two (`device_data_wait_share`).

A trace is read a chunk at a time, up to PROFILING_TRACE_MAX_MB of JSON
(`TRACE_LIMIT_VARIABLE`), so a gzip bomb is refused before it fills the
memory. inspect_ranks.py and inspect_compare.py build on this for a folder
of rank traces and for two runs. Holistic Trace Analysis is not used: it
pulls in a notebook stack for this one use, and its breakdowns fail on
traces without GPU kernels, which is every trace CI can make; the GPU
arithmetic is tested on a synthetic trace with known answers instead.
docs/measuring.md.
"""

from __future__ import annotations

import gzip
import json
import math
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd

from planktonio.errors import PlanktonioError
from train import ranges

from .stats import percentile

COMPUTE_RANGES = ranges.COMPUTE  # the names train/step.py and train/timing.py give a step's ranges
RANGES = ranges.ALL
BREAKDOWN = ("compute", "copies", "communication", "loader", "idle_data", "idle_host")
COPY_CATEGORIES = ("gpu_memcpy", "gpu_memset", "memcpy", "memset")  # the last two: older kineto versions
COPY_DIRECTIONS = ("HtoD", "DtoH", "DtoD")
LAUNCH_CATEGORIES = ("cuda_runtime", "cuda_driver")  # a kernel's launch on a host thread
LOADER_KERNEL_NAMES = r"dali::|nvjpeg|nvimgcodec|nvimagecodec"  # DALI's kernels and its JPEG decoders'
COLLECTIVE_RANGE = r"^(?:gloo|nccl|mpi|ucc|xccl):"  # torch.distributed's record_function names: "<backend>:<op>"
INPUT_BOUND_SHARE = 0.25  # waiting more than this share of a step: the loader is the bottleneck
COMM_BOUND_SHARE = 0.25   # in collectives more than this share of a step: waiting for other ranks
GPU_BUSY_FLOOR = 0.6      # GPU busy less than this share of the span: it is being starved


# ------------------------------------------------------------------ reading


# The most JSON text a trace may hold, compressed or not. A gzip file can inflate a
# thousandfold (1.5 MB of zeros became 4.2 GB in memory before this limit), so
# it is decompressed a chunk at a time and refused past the limit. 1 GiB is four
# times what chrome://tracing opens (256 MB, google/trace-viewer#627) and about
# what Perfetto's UI holds in a browser (2 GB of memory, 2-4x the trace's size:
# perfetto.dev, "Visualising large traces"): a trace of a long GPU run that
# anyone can still look at fits; `profiling trace` writes 5 steps by default.
TRACE_LIMIT_VARIABLE = "PROFILING_TRACE_MAX_MB"
DEFAULT_TRACE_LIMIT_MB = 1024
_CHUNK = 2**20


def trace_size_limit() -> int:
    """The limit in bytes: PROFILING_TRACE_MAX_MB (MiB) where set, else 1 GiB."""
    text = os.environ.get(TRACE_LIMIT_VARIABLE)
    if text is None:
        return DEFAULT_TRACE_LIMIT_MB * 2**20
    try:
        mib = float(text)
    except ValueError:
        mib = math.nan
    if not (math.isfinite(mib) and mib > 0):
        raise PlanktonioError(f"{TRACE_LIMIT_VARIABLE}={text!r}: expected a size in MiB above 0, "
                              f"e.g. {2 * DEFAULT_TRACE_LIMIT_MB}")
    return int(mib * 2**20)


def _read_at_most(stream, limit: int) -> bytearray | None:
    """Everything `stream` gives, read a chunk at a time; None as soon as it exceeds `limit` bytes."""
    text = bytearray()
    while chunk := stream.read(min(_CHUNK, limit + 1 - len(text))):
        text += chunk
        if len(text) > limit:
            return None
    return text


def _read_json(path: Path, max_bytes: int | None = None, object_hook=None):
    limit = trace_size_limit() if max_bytes is None else max_bytes
    try:
        with open(path, "rb") as raw:
            compressed = raw.read(2) == b"\x1f\x8b"  # gzip's magic number, whatever the file is called
            raw.seek(0)
            text = _read_at_most(gzip.GzipFile(fileobj=raw) if compressed else raw, limit)
        if text is not None:
            return json.loads(text, object_hook=object_hook)
    except (OSError, EOFError, zlib.error, ValueError, RecursionError) as error:
        reason = (str(error).splitlines() or [type(error).__name__])[0]
        raise PlanktonioError(f"trace {path}: cannot be read as a Chrome trace ({reason})") from None
    mib = limit / 2**20
    raise PlanktonioError(f"trace {path}: more than {mib:g} MiB once decompressed, the limit that guards "
                          f"against decompression bombs; if it is a real trace, raise it, e.g. "
                          f"{TRACE_LIMIT_VARIABLE}={max(2 * mib, 1):g}")


def load_events(path: Path, max_bytes: int | None = None) -> pd.DataFrame:
    """Complete ("X") events of a Chrome trace: name, cat, ts, dur (microseconds), pid, tid, and from
    args bytes, stream and correlation (NaN where absent).

    Takes torch.profiler's object format and Chrome's array format (a bare list of
    events); skips events that are not objects or have no name or start time. The
    trace's path, and its rank and device where it names them, are in frame.attrs.
    max_bytes: the most JSON text to read (default: trace_size_limit()).
    """
    path = Path(path)
    trace = _read_json(path, max_bytes, object_hook=_compact_event)
    if isinstance(trace, list):  # Chrome's array format: the events alone
        trace = {"traceEvents": trace}
    events = trace.get("traceEvents") if isinstance(trace, dict) else None
    if not isinstance(events, list):
        raise PlanktonioError(f"trace {path}: not a Chrome trace (expected an object with a traceEvents list, "
                              f"or a list of events)")
    rows = [e for e in events if isinstance(e, _Event)]
    description = _describe(trace)
    del trace, events  # the parsed JSON: the columns below are all that is kept
    frame = pd.DataFrame(rows, columns=list(_Event._fields))
    del rows
    frame["cat"] = frame["cat"].where(frame["cat"].map(lambda c: isinstance(c, str)), "").astype("category")
    for column in ("ts", "dur", "bytes", "stream", "correlation"):
        frame[column] = pd.to_numeric(frame[column], errors="coerce").astype(float)
    frame = frame[np.isfinite(frame["ts"])].reset_index(drop=True)
    frame["dur"] = frame["dur"].where(np.isfinite(frame["dur"]) & (frame["dur"] > 0), 0.0)
    frame["bytes"] = frame["bytes"].where(np.isfinite(frame["bytes"]) & (frame["bytes"] > 0), 0.0)
    if frame.empty:
        raise PlanktonioError(f"trace {path}: no timed events")
    frame.attrs.update(description, path=str(path))
    return frame


class _Event(NamedTuple):
    """What is read of a complete ("X") event: a tuple, not the dict JSON makes (a million dicts of
    a trace took most of 2 GB; their tuples a fraction of that)."""

    name: str
    cat: object
    ts: object
    dur: object
    pid: object
    tid: object
    bytes: object
    stream: object
    correlation: object


def _compact_event(obj: dict):
    """json's object hook: an event becomes an _Event as soon as it is parsed (None when it is not a complete
    event with a name); every other object (args, the trace itself) stays a dict."""
    if "ph" not in obj:
        return obj
    if obj.get("ph") != "X" or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("args")
    args = args if isinstance(args, dict) else {}
    return _Event(obj["name"], obj.get("cat"), obj.get("ts"), obj.get("dur"), obj.get("pid"), obj.get("tid"),
                  args.get("bytes"), args.get("stream"), args.get("correlation"))


def _describe(trace: dict) -> dict:
    info = trace.get("distributedInfo")
    rank = info.get("rank") if isinstance(info, dict) else None
    devices = trace.get("deviceProperties")
    device = devices[0].get("name") if isinstance(devices, list) and devices and isinstance(devices[0], dict) else None
    return {"rank": rank if isinstance(rank, int) else None, "device": device if isinstance(device, str) else None}


# ------------------------------------------------------------------ intervals (microseconds)


def merge(intervals) -> list[tuple[float, float]]:
    """Sorted, disjoint (start, end) intervals covering the same time; empty ones dropped."""
    merged: list[list[float]] = []
    for start, end in sorted((s, e) for s, e in intervals if e > s):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(s, e) for s, e in merged]


def intersect(a, b) -> list[tuple[float, float]]:
    """Where two merged interval lists overlap."""
    out, i, j = [], 0, 0
    while i < len(a) and j < len(b):
        start, end = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if end > start:
            out.append((start, end))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return out


def subtract(a, b) -> list[tuple[float, float]]:
    """The parts of merged intervals a not covered by merged intervals b (one pass over each)."""
    out, first = [], 0
    for start, end in a:
        while first < len(b) and b[first][1] <= start:  # cuts wholly before this interval
            first += 1
        cut = first
        while cut < len(b) and b[cut][0] < end:
            if b[cut][0] > start:
                out.append((start, b[cut][0]))
            start = max(start, b[cut][1])
            cut += 1
        if end > start:
            out.append((start, end))
    return out


def length(intervals) -> float:
    return float(sum(e - s for s, e in intervals))


def union_length(intervals: list[tuple[float, float]]) -> float:
    """Total length covered by (start, end) intervals, overlaps counted once."""
    return length(merge(intervals))


# ------------------------------------------------------------------ the timeline of one trace


def totals_by_name(events: pd.DataFrame) -> pd.DataFrame:
    """Total microseconds and calls of each event name, largest first (inclusive of nested calls)."""
    return events.groupby("name")["dur"].agg(["sum", "count"]).sort_values("sum", ascending=False)


@dataclass
class Timeline:
    """The events that classify device time, as arrays of (start, end) in microseconds."""

    on_gpu: bool
    steps: list[tuple[float, float]]
    empty_steps: int
    ranges: dict[str, np.ndarray]
    compute: np.ndarray
    copies: np.ndarray
    communication: np.ndarray
    loader: np.ndarray                 # the loader's GPU kernels (empty on a CPU)
    copy_bytes: dict[str, np.ndarray]  # direction -> (start, bytes) of each copy
    communication_ops: list[str]       # the collectives' names, most time first

    @classmethod
    def of(cls, frame: pd.DataFrame) -> Timeline:
        def spans(mask) -> np.ndarray:
            part = frame[mask]
            return np.column_stack([part["ts"].to_numpy(), (part["ts"] + part["dur"]).to_numpy()])

        cat = frame["cat"].str.lower()
        annotation = frame["cat"] == "user_annotation"
        kernel = cat == "kernel"
        nccl = kernel & frame["name"].str.lower().str.startswith("nccl")
        copy = cat.isin(COPY_CATEGORIES)
        on_gpu = bool(kernel.any() or copy.any())
        steps = frame[annotation & frame["name"].str.startswith("ProfilerStep#")]
        where = frame.attrs.get("path", "the trace")
        if steps.empty:
            raise PlanktonioError(f"{where}: no ProfilerStep ranges: was it written by `python -m profiling trace`?")
        windows = sorted((s, s + d) for s, d in zip(steps["ts"], steps["dur"]) if d > 0)
        if not windows:
            raise PlanktonioError(f"{where}: all {len(steps)} ProfilerStep ranges have zero length, so no step "
                                  f"was recorded (trace again, with --active 1 or more)")
        ranges = {name: spans(annotation & (frame["name"] == name)) for name in RANGES}
        if on_gpu:
            training_thread = _threads(steps).mode()[0]
            loader = loader_kernels(frame, kernel & ~nccl, training_thread)
            compute, collective, loader = spans(kernel & ~nccl & ~loader), nccl, spans(loader)
        else:
            compute = spans(annotation & frame["name"].isin(COMPUTE_RANGES))
            collective = annotation & frame["name"].str.contains(COLLECTIVE_RANGE, regex=True)
            loader = np.empty((0, 2))
        copy_bytes = {}
        for direction in COPY_DIRECTIONS:
            part = frame[copy & frame["name"].str.contains(direction, regex=False)]
            copy_bytes[direction] = np.column_stack([part["ts"].to_numpy(), part["bytes"].to_numpy()])
        return cls(on_gpu, windows, len(steps) - len(windows), ranges, compute, spans(copy), spans(collective),
                   loader, copy_bytes, list(totals_by_name(frame[collective]).index[:3]))

    @staticmethod
    def _within(events: np.ndarray, start: float, end: float) -> list[tuple[float, float]]:
        if not len(events):
            return []
        clipped = np.column_stack([np.maximum(events[:, 0], start), np.minimum(events[:, 1], end)])
        return merge(map(tuple, clipped[clipped[:, 1] > clipped[:, 0]]))

    def breakdown(self, start: float, end: float) -> dict[str, float]:
        """Microseconds of [start, end] in each part of BREAKDOWN (they add up to end - start),
        and in each host range, with the whole communication time and the bytes copied."""
        compute = self._within(self.compute, start, end)
        communication = self._within(self.communication, start, end)
        copies = self._within(self.copies, start, end)
        loader = self._within(self.loader, start, end)
        if self.on_gpu:  # the model's kernels are the step's work: what runs under them costs nothing extra
            exposed_communication = subtract(communication, compute)
            exposed_copies = subtract(subtract(copies, compute), communication)
            exposed_loader = subtract(subtract(subtract(loader, compute), communication), copies)
        else:  # the compute ranges enclose the blocking wait for a collective: the collective wins
            exposed_communication, exposed_copies, exposed_loader = communication, [], []
            compute = subtract(compute, communication)
        busy = merge(compute + exposed_communication + exposed_copies + exposed_loader)
        idle = subtract([(start, end)], busy)
        data = self._within(self.ranges["data"], start, end)
        idle_data = length(intersect(idle, data))
        parts = {"compute": length(compute), "copies": length(exposed_copies),
                 "communication": length(exposed_communication), "loader": length(exposed_loader),
                 "idle_data": idle_data, "idle_host": length(idle) - idle_data}
        ranges = {name: length(self._within(events, start, end)) for name, events in self.ranges.items()}
        moved = {direction: float(events[(events[:, 0] >= start) & (events[:, 0] < end), 1].sum())
                 for direction, events in self.copy_bytes.items()}
        return {**parts, "ranges": ranges, "communication_all": length(communication), "bytes": moved}


def _threads(events: pd.DataFrame) -> pd.Series:
    """Each event's "pid/tid": its host thread (for a GPU event, its device and stream)."""
    return events["pid"].astype(str) + "/" + events["tid"].astype(str)


def _inside(times: np.ndarray, intervals: list[tuple[float, float]]) -> np.ndarray:
    """Whether each time lies in one of the merged intervals (NaN: never)."""
    if not intervals:
        return np.zeros(len(times), dtype=bool)
    starts, ends = np.array(intervals).T
    slot = np.searchsorted(starts, times, side="right") - 1
    found = slot >= 0
    return found & (times < ends[np.maximum(slot, 0)])


def loader_kernels(frame: pd.DataFrame, candidates: pd.Series, training_thread: str) -> pd.Series:
    """Which of the candidate kernels are the loader's, by the rule of the module docstring.

    training_thread: "pid/tid" of the thread with the ProfilerStep ranges.
    """
    named = candidates & frame["name"].str.contains(LOADER_KERNEL_NAMES, case=False, regex=True)
    thread = _threads(frame)
    mine = (frame["cat"] == "user_annotation") & (thread == training_thread)

    def ranges_of(names) -> list[tuple[float, float]]:
        part = frame[mine & frame["name"].isin(names)]
        return merge(zip(part["ts"], part["ts"] + part["dur"]))

    launches = frame[frame["cat"].str.lower().isin(LAUNCH_CATEGORIES) & frame["correlation"].notna()]
    launches = launches.assign(thread=thread[launches.index]).drop_duplicates("correlation").set_index("correlation")
    kernels = frame[candidates & ~named]
    launch = launches.reindex(kernels["correlation"].to_numpy())  # all NaN where no launch was recorded
    by_trainer = (launch["thread"] == training_thread).to_numpy()
    launched_at = launch["ts"].to_numpy(dtype=float)
    in_model_range = by_trainer & _inside(launched_at, ranges_of(COMPUTE_RANGES))
    in_data_range = by_trainer & _inside(launched_at, ranges_of(["data"]))
    # torch.profiler puts a kernel's stream in args.stream and in tid; the device is the pid.
    stream_id = kernels["stream"].fillna(pd.to_numeric(kernels["tid"], errors="coerce"))
    stream = (kernels["pid"].astype(str) + "/" + stream_id.astype(str)).to_numpy()
    model_streams = set(stream[in_model_range])
    if not model_streams:  # no launch records to tell by: every kernel but the named ones is the model's
        return named
    loader = named.copy()
    loader[kernels.index] = ~np.isin(stream, list(model_streams)) | in_data_range
    return loader


# ------------------------------------------------------------------ one trace


def _top(events: pd.DataFrame, n: int, steps: int) -> list[dict]:
    return [{"name": name, "total_ms": row["sum"] / 1000, "ms_per_step": row["sum"] / 1000 / steps,
             "calls": int(row["count"])} for name, row in totals_by_name(events).head(n).iterrows()]


def _share(part: float, whole: float) -> float:
    return part / whole if whole > 0 else 0.0


def analyse(frame: pd.DataFrame, top: int = 10) -> dict:
    """Every figure of one trace (a frame from load_events), per step and over its span, and a verdict."""
    timeline = Timeline.of(frame)
    steps = timeline.steps
    per_step = [timeline.breakdown(start, end) for start, end in steps]
    step_us = [end - start for start, end in steps]
    step_time = sum(step_us)
    n = len(steps)
    span_start, span_end = steps[0][0], max(end for _, end in steps)
    span = timeline.breakdown(span_start, span_end)
    busy = span["compute"] + span["copies"] + span["communication"] + span["loader"]
    ranges = {name: sum(s["ranges"][name] for s in per_step) for name in RANGES}
    cat = frame["cat"].str.lower()
    kernels = frame[cat == "kernel"]
    result = {
        "rank": frame.attrs.get("rank"),
        "device": frame.attrs.get("device") or ("gpu" if timeline.on_gpu else "cpu"),
        "steps": n,
        "empty_steps_dropped": timeline.empty_steps,
        "span_ms": (span_end - span_start) / 1000,
        "busy_ms": busy / 1000,
        "loader_ms": span["loader"] / 1000,  # of busy_ms: only the loader's kernels ran
        "idle_ms": (span["idle_data"] + span["idle_host"]) / 1000,
        "busy_source": "gpu kernels" if timeline.on_gpu else "cpu compute ranges",
        "mean_step_ms": step_time / n / 1000,
        "p95_step_ms": percentile(step_us, 95) / 1000,
        "step_ms": [us / 1000 for us in step_us],
        "range_share_of_step": {name: _share(value, step_time) for name, value in ranges.items()},
        "ranges_ms_per_step": {name: value / n / 1000 for name, value in ranges.items()},
        "data_wait_share": _share(ranges["data"], step_time),
        "breakdown_ms_per_step": {part: sum(s[part] for s in per_step) / n / 1000 for part in BREAKDOWN},
        # The device's view of the wait: idle in the host's data range, or running only the loader's kernels.
        "device_data_wait_share": _share(sum(s["idle_data"] + s["loader"] for s in per_step), step_time),
        "communication_share": _share(sum(s["communication_all"] for s in per_step), step_time),
        "communication_ops": timeline.communication_ops,
        "copy_bytes_per_step": ({d: sum(s["bytes"][d] for s in per_step) / n for d in COPY_DIRECTIONS}
                                if timeline.on_gpu else None),
        "top_operators": _top(frame[cat == "cpu_op"], top, n),
        "top_kernels": _top(kernels, top, n) if timeline.on_gpu else [],
    }
    result["verdict"] = verdict(result)
    return result


def shares_of_step(result: dict) -> dict[str, float]:
    """The BREAKDOWN parts as shares of the mean step (they add up to 1)."""
    return {part: _share(ms, result["mean_step_ms"]) for part, ms in result["breakdown_ms_per_step"].items()}


def verdict(result: dict) -> str:
    share = result["data_wait_share"]
    device_share = result.get("device_data_wait_share", 0.0)  # results from before the loader part lack it
    model_busy = result["busy_ms"] - result.get("loader_ms", 0.0)
    busy = model_busy / result["span_ms"] if result["span_ms"] else 0.0
    parts = shares_of_step(result) if "breakdown_ms_per_step" in result else {}
    if max(share, device_share) > INPUT_BOUND_SHARE:
        if device_share <= share:
            return f"input-bound: {100 * share:.0f}% of step time waiting for data"
        return (f"input-bound: {100 * device_share:.0f}% of step time waiting for data, "
                f"{100 * parts.get('loader', 0.0):.0f}% with only the loader's kernels running on the GPU "
                f"(the model idle; the host waited in the data range {100 * share:.0f}% of the step)")
    if parts.get("communication", 0.0) > COMM_BOUND_SHARE:
        ops = ", ".join(result.get("communication_ops") or []) or "collectives"
        return (f"communication-bound: {100 * parts['communication']:.0f}% of step time in {ops} "
                f"(waiting for other ranks or transferring)")
    if result["busy_source"] == "gpu kernels" and busy < GPU_BUSY_FLOOR:
        idle = (f"; idle waiting for data {100 * parts['idle_data']:.0f}%, for the host "
                f"{100 * parts['idle_host']:.0f}% of the step" if parts else "")
        loader = f", the loader's kernels alone {100 * parts['loader']:.0f}%" if parts.get("loader") else ""
        return (f"GPU underused: kernels busy {100 * busy:.0f}% of the span with only {100 * share:.0f}% "
                f"waiting for data (launch- or CPU-bound step){idle}{loader}")
    loader = f", the loader's kernels alone {100 * parts['loader']:.0f}% of the step" if parts.get("loader") else ""
    return f"compute-bound: {100 * share:.0f}% of step time waiting for data, device busy {100 * busy:.0f}%{loader}"


PART_LABELS = {"compute": "compute", "copies": "copies", "communication": "communication",
               "loader": "loader kernels", "idle_data": "idle waiting for data",
               "idle_host": "idle waiting for the host"}


def format_breakdown(result: dict) -> str:
    return ", ".join(f"{PART_LABELS[part]} {ms:.1f} ms" for part, ms in result["breakdown_ms_per_step"].items()
                     if ms or part in ("compute", "idle_data", "idle_host"))


def format_report(path: Path, result: dict) -> str:
    shares = ", ".join(f"{k} {100 * v:.0f}%" for k, v in result["range_share_of_step"].items())
    lines = [f"{path}: {result['steps']} steps, {result['mean_step_ms']:.1f} ms each "
             f"(p95 {result['p95_step_ms']:.1f} ms)",
             f"busy {result['busy_ms']:.1f} ms + idle {result['idle_ms']:.1f} ms = span {result['span_ms']:.1f} ms "
             f"({result['busy_source']})",
             f"per step: {format_breakdown(result)}",
             f"share of step time: {shares}"]
    if result["copy_bytes_per_step"] is not None:
        moved = result["copy_bytes_per_step"]
        lines.append(f"copied per step: host-to-device {moved['HtoD'] / 1e6:.2f} MB, device-to-host "
                     f"{moved['DtoH'] / 1e6:.2f} MB; communication (NCCL) {100 * result['communication_share']:.0f}% "
                     f"of the step")
    lines.append("top operators (total ms, calls):")
    lines += [f"  {op['total_ms']:9.2f} {op['calls']:6d}  {op['name']}" for op in result["top_operators"]]
    if result["top_kernels"]:
        lines.append("top GPU kernels (total ms, calls):")
        lines += [f"  {k['total_ms']:9.2f} {k['calls']:6d}  {k['name'][:100]}" for k in result["top_kernels"]]
    lines.append(f"verdict: {result['verdict']}")
    return "\n".join(lines)


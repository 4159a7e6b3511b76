"""`python -m profiling inspect TRACE`: where a traced step's time went.

Reads a torch.profiler Chrome trace into a pandas frame of events and
reports: the top operators and GPU kernels by total time; device busy vs idle
over the traced span (GPU kernels when the trace has them; for CPU-only
traces, the compute ranges forward/backward/optimizer), which add up to the
span; the share of each step spent in the "data" range (waiting for the
loader); and a one-line verdict.

Holistic Trace Analysis was weighed: it loads the same traces, but its
temporal and idle-time breakdowns fail on traces without GPU kernels (HTA
0.5.0: IndexError, "No objects to concatenate") and it pulls in jupyterlab
and plotly; pandas does this job on CPU and GPU traces alike.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pandas as pd

from planktonio.errors import PlanktonioError

COMPUTE_RANGES = ("forward", "backward", "optimizer")
INPUT_BOUND_SHARE = 0.25  # waiting more than this share of a step: the loader is the bottleneck
GPU_BUSY_FLOOR = 0.6      # GPU busy less than this share of the span: it is being starved


def load_events(path: Path) -> pd.DataFrame:
    """Complete ("X") events of a Chrome trace: name, cat, ts, dur (microseconds), pid, tid."""
    path = Path(path)
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt") as f:
            trace = json.load(f)
    except (OSError, json.JSONDecodeError, EOFError) as error:
        raise PlanktonioError(f"trace {path}: cannot be read as a Chrome trace ({error})") from None
    events = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X"]
    if not events:
        raise PlanktonioError(f"trace {path}: no timed events")
    frame = pd.DataFrame(events, columns=["name", "cat", "ts", "dur", "pid", "tid"])
    frame["dur"] = frame["dur"].fillna(0.0)
    return frame


def union_length(intervals: list[tuple[float, float]]) -> float:
    """Total length covered by (start, end) intervals, overlaps counted once."""
    total, current_start, current_end = 0.0, None, None
    for start, end in sorted(intervals):
        if current_end is None or start > current_end:
            if current_end is not None:
                total += current_end - current_start
            current_start, current_end = start, end
        else:
            current_end = max(current_end, end)
    if current_end is not None:
        total += current_end - current_start
    return total


def _top(frame: pd.DataFrame, n: int) -> list[dict]:
    grouped = frame.groupby("name")["dur"].agg(["sum", "count"]).sort_values("sum", ascending=False).head(n)
    return [{"name": name, "total_ms": row["sum"] / 1000, "calls": int(row["count"])}
            for name, row in grouped.iterrows()]


def analyse(frame: pd.DataFrame, top: int = 10) -> dict:
    annotations = frame[frame["cat"] == "user_annotation"]
    steps = annotations[annotations["name"].str.startswith("ProfilerStep#")]
    if steps.empty:
        raise PlanktonioError("trace has no ProfilerStep ranges: was it written by `python -m profiling trace`?")
    span_start, span_end = steps["ts"].min(), (steps["ts"] + steps["dur"]).max()
    span = span_end - span_start
    step_time = steps["dur"].sum()
    ranges = {name: annotations.loc[annotations["name"] == name, "dur"].sum()
              for name in ("data", *COMPUTE_RANGES)}
    kernels = frame[frame["cat"] == "kernel"]
    has_gpu = not kernels.empty
    busy_source = kernels if has_gpu else annotations[annotations["name"].isin(COMPUTE_RANGES)]
    clipped = [(max(s, span_start), min(s + d, span_end)) for s, d in zip(busy_source["ts"], busy_source["dur"])]
    busy = union_length([(s, e) for s, e in clipped if e > s])
    result = {
        "steps": int(len(steps)),
        "span_ms": span / 1000,
        "busy_ms": busy / 1000,
        "idle_ms": (span - busy) / 1000,
        "busy_source": "gpu kernels" if has_gpu else "cpu compute ranges",
        "mean_step_ms": step_time / len(steps) / 1000,
        "range_share_of_step": {name: value / step_time for name, value in ranges.items()},
        "data_wait_share": ranges["data"] / step_time,
        "top_operators": _top(frame[frame["cat"] == "cpu_op"], top),
        "top_kernels": _top(kernels, top) if has_gpu else [],
    }
    result["verdict"] = verdict(result)
    return result


def verdict(result: dict) -> str:
    share = result["data_wait_share"]
    busy = result["busy_ms"] / result["span_ms"] if result["span_ms"] else 0.0
    if share > INPUT_BOUND_SHARE:
        return f"input-bound: {100 * share:.0f}% of step time waiting for data"
    if result["busy_source"] == "gpu kernels" and busy < GPU_BUSY_FLOOR:
        return (f"GPU underused: kernels busy {100 * busy:.0f}% of the span with only {100 * share:.0f}% "
                f"waiting for data (launch- or CPU-bound step)")
    return f"compute-bound: {100 * share:.0f}% of step time waiting for data, device busy {100 * busy:.0f}%"


def format_report(path: Path, result: dict) -> str:
    lines = [f"{path}: {result['steps']} steps, {result['mean_step_ms']:.1f} ms each",
             f"busy {result['busy_ms']:.1f} ms + idle {result['idle_ms']:.1f} ms = span {result['span_ms']:.1f} ms "
             f"({result['busy_source']})",
             "share of step time: " + ", ".join(f"{k} {100 * v:.0f}%" for k, v in result["range_share_of_step"].items()),
             "top operators (total ms, calls):"]
    lines += [f"  {op['total_ms']:9.2f} {op['calls']:6d}  {op['name']}" for op in result["top_operators"]]
    if result["top_kernels"]:
        lines.append("top GPU kernels (total ms, calls):")
        lines += [f"  {k['total_ms']:9.2f} {k['calls']:6d}  {k['name'][:100]}" for k in result["top_kernels"]]
    lines.append(f"verdict: {result['verdict']}")
    return "\n".join(lines)

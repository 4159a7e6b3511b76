"""`python -m profiling inspect A B`: what changed between two runs.

A and B are each a trace file or a folder of rank traces (a folder counts as
the mean of its ranks). Every figure is time per step, so runs with different
step counts compare: the host's ranges (data, forward, backward, optimizer),
the device's parts (compute, copies, communication, loader kernels, idle
waiting for data or for the host: see inspect_trace), and the operators and GPU kernels whose
time per step changed most. Operator times are inclusive (aten::conv2d holds
aten::convolution), so a change shows at every level of a call chain.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from .inspect_ranks import rank_traces
from .inspect_trace import BREAKDOWN, PART_LABELS, RANGES, analyse, load_events, shares_of_step

NOTICEABLE = 0.005  # changes under half a percent of A's step are not named in the verdict


def _per_step(events: pd.DataFrame, steps: int) -> pd.Series:
    """Milliseconds per step of each event name."""
    return events.groupby("name")["dur"].sum() / 1000 / steps


def _mean(values: list[dict]) -> dict:
    return {key: sum(v[key] for v in values) / len(values) for key in values[0]}


def describe_run(path: Path, top: int = 10) -> dict:
    """One side of a comparison: a trace, or the mean over a folder's rank traces."""
    path = Path(path)
    paths = [p for _, p in rank_traces(path)] if path.is_dir() else [path]
    results, operators, kernels = [], [], []
    for trace in paths:
        frame = load_events(trace)
        result = analyse(frame, top)
        cat = frame["cat"].str.lower()
        results.append(result)
        operators.append(_per_step(frame[cat == "cpu_op"], result["steps"]))
        kernels.append(_per_step(frame[cat == "kernel"], result["steps"]))
    on_gpu = all(r["copy_bytes_per_step"] is not None for r in results)
    return {
        "path": str(path), "traces": len(paths), "device": results[0]["device"], "on_gpu": on_gpu,
        "steps": sum(r["steps"] for r in results),
        "mean_step_ms": sum(r["mean_step_ms"] for r in results) / len(results),
        "data_wait_share": sum(r["data_wait_share"] for r in results) / len(results),
        "idle_share": sum(shares_of_step(r)["idle_data"] + shares_of_step(r)["idle_host"]
                          for r in results) / len(results),
        "ranges_ms_per_step": _mean([r["ranges_ms_per_step"] for r in results]),
        "breakdown_ms_per_step": _mean([r["breakdown_ms_per_step"] for r in results]),
        "copy_bytes_per_step": _mean([r["copy_bytes_per_step"] for r in results]) if on_gpu else None,
        "communication_share": sum(r["communication_share"] for r in results) / len(results),
        "operators": pd.concat(operators, axis=1).fillna(0.0).mean(axis=1),
        "kernels": pd.concat(kernels, axis=1).fillna(0.0).mean(axis=1),
    }


def _row(name: str, a: float, b: float) -> dict:
    return {"name": name, "a_ms": float(a), "b_ms": float(b), "change_ms": float(b - a)}


def _largest_changes(a: pd.Series, b: pd.Series, top: int) -> list[dict]:
    both = pd.concat([a.rename("a"), b.rename("b")], axis=1).fillna(0.0)
    change = (both["b"] - both["a"]).abs().sort_values(ascending=False, kind="stable")
    return [_row(name, both.at[name, "a"], both.at[name, "b"]) for name in change.index[:top]]


def compare(a_path: Path, b_path: Path, top: int = 10) -> dict:
    a, b = describe_run(a_path, top), describe_run(b_path, top)
    result = {
        "a": {k: v for k, v in a.items() if k not in ("operators", "kernels")},
        "b": {k: v for k, v in b.items() if k not in ("operators", "kernels")},
        "step": _row("step", a["mean_step_ms"], b["mean_step_ms"]),
        "ranges": [_row(name, a["ranges_ms_per_step"][name], b["ranges_ms_per_step"][name]) for name in RANGES],
        "breakdown": [_row(part, a["breakdown_ms_per_step"][part], b["breakdown_ms_per_step"][part])
                      for part in BREAKDOWN],
        "operators": _largest_changes(a["operators"], b["operators"], top),
        "kernels": _largest_changes(a["kernels"], b["kernels"], top),
    }
    result["verdict"] = verdict(result)
    return result


def verdict(result: dict) -> str:
    a, b, step = result["a"], result["b"], result["step"]
    change = step["change_ms"]
    noticeable = NOTICEABLE * step["a_ms"]
    if abs(change) > noticeable:
        parts = [f"the step got {abs(change):.1f} ms {'shorter' if change < 0 else 'longer'} "
                 f"({step['a_ms']:.1f} -> {step['b_ms']:.1f} ms, {100 * change / step['a_ms']:+.0f}%)"]
    else:
        parts = [f"the step took as long ({step['a_ms']:.1f} -> {step['b_ms']:.1f} ms)"]
    biggest = max(result["ranges"], key=lambda r: abs(r["change_ms"]))
    if abs(biggest["change_ms"]) > noticeable:
        parts.append(f"the largest change is in the \"{biggest['name']}\" range "
                     f"({biggest['change_ms']:+.1f} ms per step)")
    for kind, rows in (("kernel", result["kernels"]), ("operator", result["operators"])):
        if rows and abs(rows[0]["change_ms"]) > noticeable:
            parts.append(f"the {kind} that changed most: {rows[0]['name'][:80]} "
                         f"({rows[0]['change_ms']:+.1f} ms per step)")
            break
    parts.append(f"data wait went from {100 * a['data_wait_share']:.0f}% to {100 * b['data_wait_share']:.0f}% "
                 f"of the step")
    device = "the GPU" if a["on_gpu"] and b["on_gpu"] else "the CPU" if not (a["on_gpu"] or b["on_gpu"]) \
        else "the device"
    points = 100 * (b["idle_share"] - a["idle_share"])
    shares = f"({100 * a['idle_share']:.0f}% -> {100 * b['idle_share']:.0f}% of the step)"
    unit = "point" if round(abs(points)) == 1 else "points"
    parts.append(f"{device} idles {abs(points):.0f} {unit} {'less' if points < 0 else 'more'} {shares}"
                 if abs(points) >= 0.5 else f"{device} idles as much {shares}")
    if a["copy_bytes_per_step"] and b["copy_bytes_per_step"]:
        parts.append(f"host-to-device copies {a['copy_bytes_per_step']['HtoD'] / 1e6:.2f} -> "
                     f"{b['copy_bytes_per_step']['HtoD'] / 1e6:.2f} MB per step")
    return "; ".join(parts)


def format_comparison(result: dict) -> str:
    a, b = result["a"], result["b"]
    lines = [f"A: {a['path']} ({a['traces']} trace{'s' if a['traces'] > 1 else ''}, {a['device']}, {a['steps']} steps)",
             f"B: {b['path']} ({b['traces']} trace{'s' if b['traces'] > 1 else ''}, {b['device']}, {b['steps']} steps)",
             f"{'ms per step':<60} {'A':>9} {'B':>9} {'change':>9}"]

    def row(label: str, r: dict) -> str:
        return f"{label[:60]:<60} {r['a_ms']:>9.2f} {r['b_ms']:>9.2f} {r['change_ms']:>+9.2f}"

    lines.append(row("step", result["step"]))
    lines += [row(f"range {r['name']}", r) for r in result["ranges"]]
    lines += [row(f"device: {PART_LABELS[r['name']]}", r) for r in result["breakdown"]]
    lines += [row(f"kernel {r['name']}", r) for r in result["kernels"]]
    lines += [row(f"operator {r['name']}", r) for r in result["operators"]]
    lines.append(f"verdict: {result['verdict']}")
    return "\n".join(lines)

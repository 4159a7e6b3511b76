"""Sections for `profiling inspect --json`: one trace, every rank of a run, two runs compared."""

from __future__ import annotations

from pathlib import Path

from ..inspect_trace import PART_LABELS, shares_of_step
from .common import Section, environment_line, stacked_bars

KINDS = ("inspect", "inspect-ranks", "inspect-compare")


def trace_section(index: int, source: Path, result: dict, out: Path) -> Section:
    r = result["result"]
    lines = [f"## Trace: {result['trace']}", "",
             f"{r['steps']} steps of {r['mean_step_ms']:.1f} ms; busy {r['busy_ms']:.1f} ms + idle "
             f"{r['idle_ms']:.1f} ms = span {r['span_ms']:.1f} ms ({r['busy_source']}).", "",
             "| range | share of step time |", "| --- | ---: |"]
    lines += [f"| {k} | {100 * v:.1f}% |" for k, v in r["range_share_of_step"].items()]
    if "breakdown_ms_per_step" in r:  # results written before the per-step breakdown lack it
        lines += ["", "| device, per step | ms |", "| --- | ---: |"]
        lines += [f"| {PART_LABELS.get(k, k)} | {v:.2f} |" for k, v in r["breakdown_ms_per_step"].items()]
    lines += ["", f"**Verdict:** {r['verdict']}", "", f"Measured with: {environment_line(result['environment'])}", ""]
    return Section(lines)


def ranks_section(index: int, source: Path, result: dict, out: Path) -> Section:
    ranks = result["ranks"]
    parts = list(ranks[0]["breakdown_ms_per_step"])
    lines = [f"## Trace, every rank: {result['folder']}", "",
             "| rank | steps | mean step ms | p95 ms | data wait | "
             + " | ".join(PART_LABELS.get(p, p) for p in parts) + " | forward / backward / optimizer ms |",
             "| ---: | ---: | ---: | ---: | ---: | " + " | ".join("---:" for _ in parts) + " | ---: |"]
    for r in ranks:
        shares = shares_of_step(r)
        compute = " / ".join(f"{r['ranges_ms_per_step'][k]:.1f}" for k in ("forward", "backward", "optimizer"))
        lines.append(f"| {r['rank']} | {r['steps']} | {r['mean_step_ms']:.1f} | {r['p95_step_ms']:.1f} | "
                     f"{100 * r['data_wait_share']:.0f}% | "
                     + " | ".join(f"{100 * shares[p]:.0f}%" for p in parts) + f" | {compute} |")
    chart = out / f"inspect-ranks-{index}.png"
    stacked_bars(chart, [f"rank {r['rank']}" for r in ranks], [r["breakdown_ms_per_step"] for r in ranks],
                 {p: PART_LABELS.get(p, p) for p in parts}, f"time per step by rank, {ranks[0]['device']}")
    lines += ["", f"![time per step by rank]({chart.name})", "", f"**Verdict:** {result['summary']['verdict']}", "",
              f"Traced on {ranks[0]['device']}; read with: {environment_line(result['environment'])}", ""]
    return Section(lines)


def compare_section(index: int, source: Path, result: dict, out: Path) -> Section:
    a, b = result["a"], result["b"]

    def row(label: str, r: dict) -> str:
        return f"| {label} | {r['a_ms']:.2f} | {r['b_ms']:.2f} | {r['change_ms']:+.2f} |"

    lines = [f"## Traces compared: A = {a['path']}, B = {b['path']}", "",
             f"A: {a['traces']} trace(s), {a['device']}, {a['steps']} steps; "
             f"B: {b['traces']} trace(s), {b['device']}, {b['steps']} steps. Operator times include their callees.",
             "", "| ms per step | A | B | change |", "| --- | ---: | ---: | ---: |", row("step", result["step"])]
    lines += [row(f"range `{r['name']}`", r) for r in result["ranges"]]
    lines += [row(f"device: {PART_LABELS.get(r['name'], r['name'])}", r) for r in result["breakdown"]]
    lines += [row(f"kernel `{r['name'][:80]}`", r) for r in result["kernels"][:5]]
    lines += [row(f"operator `{r['name'][:80]}`", r) for r in result["operators"][:5]]
    chart = out / f"inspect-compare-{index}.png"
    parts = {r["name"]: PART_LABELS.get(r["name"], r["name"]) for r in result["breakdown"]}
    stacked_bars(chart, ["A", "B"], [{r["name"]: r[key] for r in result["breakdown"]} for key in ("a_ms", "b_ms")],
                 parts, "time per step, A against B")
    lines += ["", f"![A against B]({chart.name})", "", f"**Verdict:** {result['verdict']}", "",
              f"Read with: {environment_line(result['environment'])}", ""]
    return Section(lines)

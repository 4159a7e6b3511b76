"""`python -m profiling inspect DIR`: every rank of a traced run side by side, and which one holds the others up.

DIR is the folder `python -m profiling trace --out DIR` wrote, with one
trace-rank<R>.json.gz per rank. Each trace is read as inspect_trace reads one.

In data-parallel training every step meets in collectives (DDP's all-reduce
of gradients in backward, the broadcast of buffers at the start of forward),
so all ranks take about the same time per step and the slow rank does not
show as the one with the longest steps: it shows as the one that waits least
in communication, while the others wait for it there. So the straggler is the
rank whose step minus its communication is longest, and its cause is the part
of the step (data wait, compute, copies, loader kernels, host) by which it exceeds the median
of the other ranks most. Without collectives this is simply the slowest rank.
"""

from __future__ import annotations

import re
from pathlib import Path

from planktonio.errors import PlanktonioError

from .inspect_trace import analyse, format_breakdown, load_events, shares_of_step
from .stats import median

TRACE_NAME = re.compile(r"trace-rank(\d+)\.json(?:\.gz)?")
STRAGGLER_SHARE = 0.10  # a rank's own time must exceed the others' by 10% of a step to be named: less is noise
CAUSES = {"idle_data": "data wait", "compute": "compute", "copies": "memory copies", "loader": "loader kernels",
          "idle_host": "host time"}


def rank_traces(folder: Path) -> list[tuple[int, Path]]:
    """(rank, path) of every trace-rank<R>.json[.gz] in a folder, by rank."""
    folder = Path(folder)
    if not folder.is_dir():
        raise PlanktonioError(f"{folder}: not a folder of traces")
    found = sorted((int(match.group(1)), path) for path in folder.iterdir()
                   if (match := TRACE_NAME.fullmatch(path.name)))
    if not found:
        raise PlanktonioError(f"{folder}: no trace-rank<R>.json.gz files (write them with "
                              f"`python -m profiling trace --out {folder}`)")
    return found


def analyse_ranks(folder: Path, top: int = 10) -> dict:
    ranks = [{**analyse(load_events(path), top), "rank": rank, "trace": str(path)}
             for rank, path in rank_traces(folder)]
    return {"folder": str(folder), "ranks": ranks, "summary": summarise(ranks)}


def _own_ms(row: dict) -> float:
    """A rank's time per step not spent in collectives: its own work and waits."""
    return row["mean_step_ms"] - row["breakdown_ms_per_step"]["communication"]


def summarise(ranks: list[dict]) -> dict:
    steps = [r["mean_step_ms"] for r in ranks]
    slowest = max(ranks, key=lambda r: r["mean_step_ms"])
    summary = {"ranks": len(ranks), "slowest_rank": slowest["rank"], "mean_step_ms": {"min": min(steps),
               "median": median(steps), "max": max(steps)},
               "step_spread": (max(steps) - min(steps)) / median(steps), "straggler": None, "cause": None,
               "excess_ms_per_step": None}
    head = (f"{len(ranks)} rank{'s' if len(ranks) > 1 else ''}, mean step {min(steps):.1f}-{max(steps):.1f} ms "
            f"(spread {100 * summary['step_spread']:.0f}%, slowest rank {slowest['rank']})")
    if len(ranks) == 1:
        summary["verdict"] = f"{head}: {ranks[0]['verdict']}"
        return summary
    straggler = max(ranks, key=_own_ms)
    others = [r for r in ranks if r is not straggler]
    excess = _own_ms(straggler) - median([_own_ms(r) for r in others])
    if excess < STRAGGLER_SHARE * median(steps):
        summary["verdict"] = (f"{head}: balanced, no rank holds the others up (own time per step within "
                              f"{excess:.1f} ms); rank {slowest['rank']}: {slowest['verdict']}")
        return summary

    def part_excess(part: str) -> float:
        return straggler["breakdown_ms_per_step"][part] - median([r["breakdown_ms_per_step"][part] for r in others])

    cause = max(CAUSES, key=part_excess)
    mine, theirs = shares_of_step(straggler), [shares_of_step(r) for r in others]
    summary.update(straggler=straggler["rank"], cause=CAUSES[cause], excess_ms_per_step=excess)
    text = (f"{head}: rank {straggler['rank']} is the straggler: its {CAUSES[cause]} takes "
            f"{part_excess(cause):.1f} ms per step more than on the other ranks "
            f"({100 * mine[cause]:.0f}% of its step vs {100 * median([t[cause] for t in theirs]):.0f}%)")
    waiting = median([r["breakdown_ms_per_step"]["communication"] for r in others]) \
        - straggler["breakdown_ms_per_step"]["communication"]
    if waiting > excess / 2:  # the others' extra time in collectives is this rank's lateness
        ops = ", ".join(sorted({op for r in others for op in r["communication_ops"]})) or "collectives"
        who = (f"ranks {', '.join(str(r['rank']) for r in others)} wait" if len(others) > 1
               else f"rank {others[0]['rank']} waits")
        text += (f", while {who} for it in communication ({ops}): "
                 f"{100 * median([t['communication'] for t in theirs]):.0f}% of the step vs "
                 f"{100 * mine['communication']:.0f}% on rank {straggler['rank']}")
    summary["verdict"] = text
    return summary


def format_ranks(result: dict) -> str:
    header = (f"{'rank':>4} {'steps':>5} {'mean ms':>8} {'p95 ms':>8} {'data':>5} {'busy':>5} {'idle':>5} "
              f"{'comm':>5}  {'forward/backward/optimizer ms per step':<38}")
    lines = [f"{result['folder']}: {len(result['ranks'])} rank traces", header]
    for r in result["ranks"]:
        shares = shares_of_step(r)
        busy = 1 - shares["idle_data"] - shares["idle_host"]
        compute = " / ".join(f"{r['ranges_ms_per_step'][name]:.1f}" for name in ("forward", "backward", "optimizer"))
        lines.append(f"{r['rank']:>4} {r['steps']:>5} {r['mean_step_ms']:>8.1f} {r['p95_step_ms']:>8.1f} "
                     f"{100 * r['data_wait_share']:>4.0f}% {100 * busy:>4.0f}% {100 * (1 - busy):>4.0f}% "
                     f"{100 * shares['communication']:>4.0f}%  {compute}")
    lines += [f"rank {r['rank']} per step: {format_breakdown(r)}" for r in result["ranks"]]
    lines.append(f"verdict: {result['summary']['verdict']}")
    return "\n".join(lines)

"""What every report section uses: the environment line, number formats, bar charts, goal lines.

Imports no torch (nor planktonio beyond its errors): a report is JSON turned
into markdown and PNG files, on any machine.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from planktonio.files import atomic_file

ENV_KEYS = ("device", "driver", "cuda", "torch", "torchvision", "dali", "cpu_count", "date", "command")


@dataclass
class Section:
    """A report section: its markdown lines, and the goal lines it checked."""

    lines: list[str]
    goals: list[str] = field(default_factory=list)


def environment_line(env: dict) -> str:
    return "; ".join(f"{k} {env[k]}" for k in ENV_KEYS if env.get(k) is not None)


def on_gpu(env: dict) -> bool:
    return env.get("device") not in (None, "cpu")


def percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def or_dash(value, form: str, scale: float = 1, unit: str = "") -> str:
    return "-" if value is None else format(scale * value, form) + unit


def incomplete_note(result: dict) -> list[str]:
    """A line for a result cut short (its benchmark stopped before every planned row was measured)."""
    if result.get("complete", True):
        return []
    return ["> This result is incomplete: its benchmark stopped (time budget or error) before every planned "
            "measurement; the rows below are those it finished.", ""]


def bar_chart(path: Path, labels, values, low=None, high=None, ylabel="", title="", line=None) -> None:
    fig, ax = plt.subplots(figsize=(max(4, 1.2 * len(labels) + 2), 3.5))
    errors = None
    if low is not None:
        errors = [[v - lo for v, lo in zip(values, low)], [hi - v for v, hi in zip(values, high)]]
    ax.bar(range(len(labels)), values, yerr=errors, capsize=4, color="#4c72b0")
    ax.set_xticks(range(len(labels)), labels, rotation=20, ha="right")
    if line is not None:
        ax.axhline(line, color="#c44e52", linestyle="--", linewidth=1)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    with atomic_file(path, "wb") as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)


PALETTE = ("#4c72b0", "#8172b2", "#dd8452", "#c44e52", "#bbbbbb", "#55a868", "#937860")


def stacked_bars(path: Path, labels: list[str], breakdowns: list[dict], part_labels: dict, title: str) -> None:
    """One bar per label: the parts of its mean step (ms) stacked, so a bar's height is the step."""
    fig, ax = plt.subplots(figsize=(max(4.5, 0.8 * len(labels) + 3.5), 3.5))
    bottom = [0.0] * len(labels)
    for part, colour in zip(part_labels, PALETTE):
        values = [b.get(part, 0.0) for b in breakdowns]
        ax.bar(range(len(labels)), values, bottom=bottom, color=colour, label=part_labels[part])
        bottom = [low + v for low, v in zip(bottom, values)]
    ax.set_xticks(range(len(labels)), labels)
    ax.set_ylabel("ms per step")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    with atomic_file(path, "wb") as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)


def goal(text: str, measured: float, target: float, source: Path, lower_is_better=False, unit="x") -> str:
    met = measured <= target if lower_is_better else measured >= target
    if met:
        return f"- met: {text}: measured {measured:.2f}{unit} ({source.name})"
    gap = (measured - target) if lower_is_better else (target - measured)
    return f"- MISSED: {text}: measured {measured:.2f}{unit}, {gap:.2f}{unit} short of {target:g}{unit} ({source.name})"


def best_on_gpu(env: dict, rows: list[dict], key, lowest: bool = False) -> dict | None:
    """The best of `rows` by `key`, for a goal about GPUs; None where nothing was measured on one."""
    if not on_gpu(env) or not rows:
        return None
    return (min if lowest else max)(rows, key=key)

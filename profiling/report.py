"""`python -m profiling report RESULTS... --out DIR`: one markdown report with tables and plots.

Reads the JSON that `loaders`, `amp` and `inspect --json` write, and writes
DIR/report.md with a PNG per chart beside it: loader throughput bars (median,
whiskers from min to max over repeats), AMP speed-up over FP32, and the
share of step time spent waiting for data. Every section names the machine
and software it was measured with, and the performance goals are checked
against what was measured, saying by how much a missed goal was missed.
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from planktonio.errors import PlanktonioError  # noqa: E402

from .amp import speedups  # noqa: E402
from .loaders import _percent  # noqa: E402

ENV_KEYS = ("device", "driver", "cuda", "torch", "torchvision", "dali", "cpu_count", "date", "command")


def load_results(paths: list[Path]) -> list[tuple[Path, dict]]:
    results = []
    for path in paths:
        try:
            result = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise PlanktonioError(f"result {path}: cannot be read ({error})") from None
        if result.get("kind") not in ("loaders", "amp", "inspect"):
            raise PlanktonioError(f"result {path}: not a profiling result (kind {result.get('kind')!r})")
        results.append((Path(path), result))
    return results


def environment_line(env: dict) -> str:
    return "; ".join(f"{k} {env[k]}" for k in ENV_KEYS if env.get(k) is not None)


def _bar_chart(path: Path, labels, values, low=None, high=None, ylabel="", title="", line=None):
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
    fig.savefig(path, dpi=100)
    plt.close(fig)


def loaders_section(index: int, source: Path, result: dict, out: Path) -> tuple[list[str], list[str]]:
    env, config = result["environment"], result["config"]
    rows = sorted(result["results"], key=lambda r: -r["images_per_s"]["median"])
    by_name = {r["backend"]: r["images_per_s"]["median"] for r in rows}
    base = by_name.get("torchvision")
    lines = [f"## Loader throughput ({source.name})", "",
             f"{env.get('device')}, {config['workers']} workers/threads, batch {config['batch_size']}, "
             f"split {config['split']}, {config['repeats']} repeats of {config['batches']} batches, "
             f"{'training augmentation' if config.get('augment', True) else 'evaluation transform'}.", "",
             "| backend | images/s (median) | min - max | vs torchvision | p50 / p95 / p99 ms | CPU % "
             "| peak GPU MiB (torch / device) |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        ips, lat = r["images_per_s"], r["latency_ms"]
        ratio = f"{ips['median'] / base:.2f}x" if base and r["backend"] != "memory" else "-"
        memory = " / ".join("-" if r.get(k) is None else f"{r[k]:.0f}"
                            for k in ("peak_gpu_memory_mb", "peak_device_memory_mb"))
        lines.append(f"| {r['backend']} | {ips['median']:.0f} | {ips['min']:.0f} - {ips['max']:.0f} | {ratio} | "
                     f"{lat['p50']:.1f} / {lat['p95']:.1f} / {lat['p99']:.1f} | {_percent(r['cpu_util_percent'])} | "
                     f"{memory} |")
    decoding = [r for r in rows if r["backend"] != "memory"]
    chart = out / f"loaders-{index}.png"
    _bar_chart(chart, [r["backend"] for r in decoding], [r["images_per_s"]["median"] for r in decoding],
               [r["images_per_s"]["min"] for r in decoding], [r["images_per_s"]["max"] for r in decoding],
               "images/s", f"loader throughput, {env.get('device')}")
    lines += ["", f"![loader throughput]({chart.name})", "", f"Measured with: {environment_line(env)}", ""]

    goals = []
    if base and config.get("augment", True):  # the goals are about the training pipeline
        on_gpu = env.get("device") not in (None, "cpu")
        name, target = ("dali-gpu", 10.0) if on_gpu else ("dali-cpu", 2.0)
        if name in by_name:
            goals.append(_goal(f"{name} >= {target:g}x torchvision images/s ({env.get('device')}, "
                               f"{config['workers']} workers)", by_name[name] / base, target, source))
    return lines, goals


def amp_section(index: int, source: Path, result: dict, out: Path) -> tuple[list[str], list[str]]:
    env, config = result["environment"], result["config"]
    lines = [f"## Mixed precision against FP32 ({source.name})", "",
             f"{config['model']}, batch {config['batch_size']}, {config['image_size']} px, "
             f"{config['repeats']} repeats of {config['steps']} steps, batches already on the device.", ""]
    if result.get("note"):
        lines += [f"> {result['note']}", ""]
    lines += ["| training | precision | layout | step ms | images/s | vs FP32 | peak MiB |",
              "| --- | --- | --- | ---: | ---: | ---: | ---: |"]
    rows = speedups(result)
    for r in rows:
        memory = "-" if r["peak_memory_mb"] is None else f"{r['peak_memory_mb']:.0f}"
        lines.append(f"| {r['freeze']} frozen | {r['precision']} | {'NHWC' if r['channels_last'] else 'NCHW'} | "
                     f"{r['step_ms']['median']:.1f} | {r['images_per_s']['median']:.0f} | "
                     f"{r['speedup_vs_fp32']:.2f}x | {memory} |")
    chart = out / f"amp-{index}.png"
    _bar_chart(chart, [f"{r['freeze'][:8]} {r['precision']}{' CL' if r['channels_last'] else ''}" for r in rows],
               [r["speedup_vs_fp32"] for r in rows], ylabel="speed-up over FP32",
               title=f"AMP vs FP32, {config['model']}, {env.get('device')}", line=1.0)
    lines += ["", f"![AMP speed-up]({chart.name})", ""]
    goals = []
    on_gpu = env.get("device") not in (None, "cpu")
    full = [r for r in rows if r["freeze"] == "none" and r["precision"] != "fp32"]
    if on_gpu and full:
        best = max(full, key=lambda r: r["speedup_vs_fp32"])
        goals.append(_goal(f"AMP >= 2x FP32, full fine-tuning ({best['precision']}"
                           f"{', channels_last' if best['channels_last'] else ''}, {env.get('device')})",
                           best["speedup_vs_fp32"], 2.0, source))
    if result["end_to_end"]:
        lines += ["| loader | precision | images/s | data wait |", "| --- | --- | ---: | ---: |"]
        for r in result["end_to_end"]:
            lines.append(f"| {r['loader']} | {r['precision']} | {r['images_per_s']['median']:.0f} | "
                         f"{100 * r['data_wait_fraction']:.1f}% |")
        chart = out / f"data-wait-{index}.png"
        _bar_chart(chart, [f"{r['loader']} {r['precision']}" for r in result["end_to_end"]],
                   [100 * r["data_wait_fraction"] for r in result["end_to_end"]], ylabel="% of step time",
                   title="waiting for data, end to end", line=5.0)
        lines += ["", f"![data wait]({chart.name})", ""]
        dali_amp = [r for r in result["end_to_end"] if r["loader"] == "dali-gpu" and r["precision"] != "fp32"]
        if on_gpu and dali_amp:
            best = min(dali_amp, key=lambda r: r["data_wait_fraction"])
            goals.append(_goal(f"data wait < 5% of step time, DALI + AMP ({best['precision']}, {env.get('device')})",
                               best["data_wait_fraction"] * 100, 5.0, source, lower_is_better=True, unit="%"))
    lines += [f"Measured with: {environment_line(env)}", ""]
    return lines, goals


def inspect_section(source: Path, result: dict) -> tuple[list[str], list[str]]:
    r = result["result"]
    lines = [f"## Trace: {result['trace']}", "",
             f"{r['steps']} steps of {r['mean_step_ms']:.1f} ms; busy {r['busy_ms']:.1f} ms + idle "
             f"{r['idle_ms']:.1f} ms = span {r['span_ms']:.1f} ms ({r['busy_source']}).", "",
             "| range | share of step time |", "| --- | ---: |"]
    lines += [f"| {k} | {100 * v:.1f}% |" for k, v in r["range_share_of_step"].items()]
    lines += ["", f"**Verdict:** {r['verdict']}", "", f"Measured with: {environment_line(result['environment'])}", ""]
    return lines, []


def _goal(text: str, measured: float, target: float, source: Path, lower_is_better=False, unit="x") -> str:
    met = measured <= target if lower_is_better else measured >= target
    if met:
        return f"- met: {text}: measured {measured:.2f}{unit} ({source.name})"
    gap = (measured - target) if lower_is_better else (target - measured)
    return f"- MISSED: {text}: measured {measured:.2f}{unit}, {gap:.2f}{unit} short of {target:g}{unit} ({source.name})"


def write_report(paths: list[Path], out: Path, title: str = "planktonio measurements") -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    body, goals = [], []
    for index, (source, result) in enumerate(load_results(paths)):
        if result["kind"] == "loaders":
            lines, found = loaders_section(index, source, result, out)
        elif result["kind"] == "amp":
            lines, found = amp_section(index, source, result, out)
        else:
            lines, found = inspect_section(source, result)
        body += lines
        goals += found
    text = [f"# {title}", ""]
    if goals:
        text += ["## Goals", "", *goals, ""]
    report = out / "report.md"
    report.write_text("\n".join(text + body))
    return report

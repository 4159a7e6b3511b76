"""`python -m profiling report RESULTS... --out DIR`: one markdown report with tables and plots.

Reads the JSON that `loaders`, `amp`, `inspect --json` and `suite` (suite.json:
what ran; training.json: the end-to-end runs) write, and writes
DIR/report.md with a PNG per chart beside it: loader throughput bars (median,
whiskers from min to max over repeats), AMP speed-up over FP32, the
share of step time spent waiting for data, and from `inspect` of a run's
rank traces or of two runs, tables and bars of each step's parts (compute,
copies, communication, idle waiting for data or for the host). Every section names the machine
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

from .amp import settings_line, speedups  # noqa: E402
from .inspect_trace import PART_LABELS, shares_of_step  # noqa: E402
from .loaders import _percent  # noqa: E402

BOUNDARY_GOAL = 1.1  # an epoch boundary against an ordinary batch, see loaders_section

ENV_KEYS = ("device", "driver", "cuda", "torch", "torchvision", "dali", "cpu_count", "date", "command")
INSPECT_KINDS = ("inspect", "inspect-ranks", "inspect-compare")  # `inspect` of a trace, of a run's ranks, of two runs


def load_results(paths: list[Path]) -> list[tuple[Path, dict]]:
    results = []
    for path in paths:
        try:
            result = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise PlanktonioError(f"result {path}: cannot be read ({error})") from None
        if result.get("kind") not in ("loaders", "amp", "training", "suite", *INSPECT_KINDS):
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
             f"{env.get('device')}, {config['workers']} workers, {config.get('threads', config['workers'])} DALI "
             f"threads, batch {config['batch_size']}, split {config['split']}, {config['repeats']} repeats of "
             f"{config['epochs']} whole epoch(s) of {config['batches_per_epoch']} batches, "
             f"{'training augmentation' if config.get('augment', True) else 'evaluation transform'}.", "",
             "| backend | images/s (median) | min - max | vs torchvision | p50 / p95 / p99 ms | epoch boundary ms "
             "(x batch) | CPU % | peak GPU MiB (torch / added by the loader) |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        ips, lat = r["images_per_s"], r["latency_ms"]
        ratio = f"{ips['median'] / base:.2f}x" if base and r["backend"] != "memory" else "-"
        memory = " / ".join("-" if r.get(k) is None else f"{r[k]:.0f}"
                            for k in ("peak_gpu_memory_mb", "device_memory_added_mb"))
        boundary = "-" if r.get("epoch_boundary_ms") is None else (
            f"{r['epoch_boundary_ms']:.1f} ({r['boundary_vs_batch']:.2f}x)")
        lines.append(f"| {r['backend']} | {ips['median']:.0f} | {ips['min']:.0f} - {ips['max']:.0f} | {ratio} | "
                     f"{lat['p50']:.1f} / {lat['p95']:.1f} / {lat['p99']:.1f} | {boundary} | "
                     f"{_percent(r['cpu_util_percent'])} | {memory} |")
    for r in rows:
        if r.get("cache_decode_seconds") is not None:
            lines += ["", f"cache: decoded once in {r['cache_decode_seconds']:.2f} s (its first epoch, not timed "
                          f"above), {r['cache_bytes_per_image']:.0f} bytes per image, "
                          f"{r['cache_bytes'] / 2**20:.0f} MiB in {r['cache_placement']} memory."]
    decoding = [r for r in rows if r["backend"] != "memory"]
    chart = out / f"loaders-{index}.png"
    _bar_chart(chart, [r["backend"] for r in decoding], [r["images_per_s"]["median"] for r in decoding],
               [r["images_per_s"]["min"] for r in decoding], [r["images_per_s"]["max"] for r in decoding],
               "images/s", f"loader throughput, {env.get('device')}")
    lines += ["", f"![loader throughput]({chart.name})", "", f"Measured with: {environment_line(env)}", ""]

    goals = []
    if base and config.get("augment", True):  # the goals are about the training pipeline
        name, target = ("dali-gpu", 10.0) if _on_gpu(env) else ("dali-cpu", 2.0)
        if name in by_name:
            goals.append(_goal(f"{name} >= {target:g}x torchvision images/s ({env.get('device')}, "
                               f"{config['workers']} workers)", by_name[name] / base, target, source))
        if "cache" in by_name and name in by_name:  # the cache's timed epochs follow its decoding warm-up
            goals.append(_goal(f"cache >= {name} images/s from its second epoch ({env.get('device')})",
                               by_name["cache"] / by_name[name], 1.0, source))
    for r in rows:
        if r["backend"] != "memory" and r.get("boundary_vs_batch") is not None:
            # A median of a few boundaries against a median of many batches: 10% is within the
            # spread of batch latencies here (a pipeline rebuilt per epoch cost about 3 batches).
            goals.append(_goal(f"{r['backend']}: an epoch boundary costs at most one ordinary batch "
                               f"(x1.1 for timing noise)", r["boundary_vs_batch"], BOUNDARY_GOAL, source,
                               lower_is_better=True))
    return lines, goals


def amp_section(index: int, source: Path, result: dict, out: Path) -> tuple[list[str], list[str]]:
    env, config = result["environment"], result["config"]
    lines = [f"## Mixed precision against FP32 ({source.name})", "",
             f"{config['model']}, batch {config['batch_size']}, {config['image_size']} px, "
             f"{config['repeats']} repeats of {config['steps']} steps, batches already on the device; "
             f"{settings_line(result)}.", ""]
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
    full = [r for r in rows if r["freeze"] == "none" and r["precision"] != "fp32"]
    if best := _best_on_gpu(env, full, key=lambda r: r["speedup_vs_fp32"]):
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
        if best := _best_on_gpu(env, dali_amp, key=lambda r: r["data_wait_fraction"], lowest=True):
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
    if "breakdown_ms_per_step" in r:  # results written before the per-step breakdown lack it
        lines += ["", "| device, per step | ms |", "| --- | ---: |"]
        lines += [f"| {PART_LABELS[k]} | {v:.2f} |" for k, v in r["breakdown_ms_per_step"].items()]
    lines += ["", f"**Verdict:** {r['verdict']}", "", f"Measured with: {environment_line(result['environment'])}", ""]
    return lines, []


PART_COLOURS = {"compute": "#4c72b0", "copies": "#8172b2", "communication": "#dd8452",
                "idle_data": "#c44e52", "idle_host": "#bbbbbb"}


def _stacked_bars(path: Path, labels: list[str], breakdowns: list[dict], title: str) -> None:
    """One bar per label: the parts of its mean step (ms) stacked, so a bar's height is the step."""
    fig, ax = plt.subplots(figsize=(max(4.5, 0.8 * len(labels) + 3.5), 3.5))
    bottom = [0.0] * len(labels)
    for part, colour in PART_COLOURS.items():
        values = [b[part] for b in breakdowns]
        ax.bar(range(len(labels)), values, bottom=bottom, color=colour, label=PART_LABELS[part])
        bottom = [low + v for low, v in zip(bottom, values)]
    ax.set_xticks(range(len(labels)), labels)
    ax.set_ylabel("ms per step")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def inspect_ranks_section(index: int, source: Path, result: dict, out: Path) -> tuple[list[str], list[str]]:
    ranks = result["ranks"]
    lines = [f"## Trace, every rank: {result['folder']}", "",
             "| rank | steps | mean step ms | p95 ms | data wait | compute | copies | communication "
             "| idle (data) | idle (host) | forward / backward / optimizer ms |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in ranks:
        shares = shares_of_step(r)
        compute = " / ".join(f"{r['ranges_ms_per_step'][k]:.1f}" for k in ("forward", "backward", "optimizer"))
        lines.append(f"| {r['rank']} | {r['steps']} | {r['mean_step_ms']:.1f} | {r['p95_step_ms']:.1f} | "
                     f"{100 * r['data_wait_share']:.0f}% | "
                     + " | ".join(f"{100 * shares[k]:.0f}%" for k in PART_COLOURS) + f" | {compute} |")
    chart = out / f"inspect-ranks-{index}.png"
    _stacked_bars(chart, [f"rank {r['rank']}" for r in ranks], [r["breakdown_ms_per_step"] for r in ranks],
                  f"time per step by rank, {ranks[0]['device']}")
    lines += ["", f"![time per step by rank]({chart.name})", "", f"**Verdict:** {result['summary']['verdict']}", "",
              f"Traced on {ranks[0]['device']}; read with: {environment_line(result['environment'])}", ""]
    return lines, []


def inspect_compare_section(index: int, source: Path, result: dict, out: Path) -> tuple[list[str], list[str]]:
    a, b = result["a"], result["b"]

    def row(label: str, r: dict) -> str:
        return f"| {label} | {r['a_ms']:.2f} | {r['b_ms']:.2f} | {r['change_ms']:+.2f} |"

    lines = [f"## Traces compared: A = {a['path']}, B = {b['path']}", "",
             f"A: {a['traces']} trace(s), {a['device']}, {a['steps']} steps; "
             f"B: {b['traces']} trace(s), {b['device']}, {b['steps']} steps. Operator times include their callees.", "",
             "| ms per step | A | B | change |", "| --- | ---: | ---: | ---: |", row("step", result["step"])]
    lines += [row(f"range `{r['name']}`", r) for r in result["ranges"]]
    lines += [row(f"device: {PART_LABELS[r['name']]}", r) for r in result["breakdown"]]
    lines += [row(f"kernel `{r['name'][:80]}`", r) for r in result["kernels"][:5]]
    lines += [row(f"operator `{r['name'][:80]}`", r) for r in result["operators"][:5]]
    chart = out / f"inspect-compare-{index}.png"
    _stacked_bars(chart, ["A", "B"], [{r["name"]: r[key] for r in result["breakdown"]} for key in ("a_ms", "b_ms")],
                  "time per step, A against B")
    lines += ["", f"![A against B]({chart.name})", "", f"**Verdict:** {result['verdict']}", "",
              f"Read with: {environment_line(result['environment'])}", ""]
    return lines, []


def _or_dash(value, form: str, scale: float = 1, unit: str = "") -> str:
    return "-" if value is None else format(scale * value, form) + unit


def training_section(index: int, source: Path, result: dict, out: Path) -> tuple[list[str], list[str]]:
    """`profiling suite`'s end-to-end runs: each loader and precision trained for whole epochs."""
    env, config, runs = result["environment"], result["config"], result["runs"]
    lines = [f"## End-to-end training ({source.name})", "",
             f"{config['file']} ({config['model']}), {config['epochs']} whole epochs per run, channels_last in "
             f"every run (only the precision varies), one process per run (its own GPU memory), "
             f"{env.get('device')}. Images/s, data wait (host time blocked on the loader) and GPU busy (time "
             f"inside steps, CUDA events) of the last epoch; the first includes the warm-up.", ""]
    if config.get("note"):
        lines += [f"> {config['note']}", ""]
    lines += ["| loader | precision | images/s | first epoch | data wait | GPU busy | peak MiB (torch / GPU) "
              "| val acc | status |", "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in runs:
        memory = f"{_or_dash(r['peak_gpu_memory_mb'], '.0f')} / {_or_dash(r['device_memory_mb'], '.0f')}"
        lines.append(f"| {r['loader']} | {r['precision']} | {_or_dash(r['images_per_s'], '.0f')} | "
                     f"{_or_dash(r['first_epoch_images_per_s'], '.0f')} | "
                     f"{_or_dash(r['data_wait_fraction'], '.1f', 100, '%')} | "
                     f"{_or_dash(r['gpu_busy_fraction'], '.0f', 100, '%')} | {memory} | "
                     f"{_or_dash(r['val_acc'], '.3f')} | {r['status']} |")
    measured = [r for r in runs if r["images_per_s"] is not None]
    if measured:
        chart = out / f"training-{index}.png"
        _bar_chart(chart, [f"{r['loader']} {r['precision']}" for r in measured],
                   [r["images_per_s"] for r in measured], ylabel="images/s",
                   title=f"end-to-end training, {env.get('device')}",
                   line=16000 if env.get("device") != "cpu" else None)
        lines += ["", f"![end-to-end training]({chart.name})"]
    lines += ["", f"Measured with: {environment_line(env)}", ""]
    goals = []
    dali_amp = [r for r in measured if r["loader"] == "dali-gpu" and r["precision"] != "fp32"]
    if best := _best_on_gpu(env, dali_amp, key=lambda r: r["images_per_s"]):
        goals.append(_goal(f"end to end, DALI GPU + AMP ({best['precision']}, {env.get('device')}): >= 16,000 "
                           f"images/s", best["images_per_s"], 16000, source, unit=" img/s"))
        goals.append(_goal(f"end to end, DALI GPU + AMP: data wait < 5% ({best['precision']})",
                           100 * best["data_wait_fraction"], 5.0, source, lower_is_better=True, unit="%"))
    return lines, goals


def suite_section(source: Path, result: dict) -> tuple[list[str], list[str]]:
    """What `profiling suite` ran, how long each stage took, and what did not fit or failed."""
    lines = [f"## What ran ({source.name})", "",
             f"{result['device']}, data {result['data']}: a budget of {result['budget_s'] / 60:.1f} min"
             + (f", used {result['seconds']:.0f} s before this report" if result.get("seconds") is not None else "")
             + (f"; work scaled to {result['scale']:.2f} of the nominal" if result["scale"] < 1 else "") + ".", "",
             "| stage | status | seconds | budget s |", "| --- | --- | ---: | ---: |"]
    for s in result["stages"]:
        lines.append(f"| {s['name']} | {s['status']} | {s['seconds']:.0f} | {s['budget_s']:.0f} |")
    lines.append("")
    if result.get("doctor_verdict"):
        lines += [f"`{result['doctor_verdict']}`", ""]
    tests = result.get("gpu_tests")
    if tests:
        passed = tests["tests"] - tests["failures"] - tests["errors"] - tests["skipped"]
        lines += [f"GPU tests: {passed} passed, {tests['failures']} failed, {tests['errors']} errors, "
                  f"{tests['skipped']} skipped.", ""]
    elif result["device"] == "cpu":
        lines += ["GPU tests: not run (no GPU).", ""]
    lines += ["Each stage's output: `../logs/<stage>.log` (from this report's folder).", ""]
    return lines, []


def _on_gpu(env: dict) -> bool:
    return env.get("device") not in (None, "cpu")


def _best_on_gpu(env: dict, rows: list[dict], key, lowest: bool = False) -> dict | None:
    """The best of `rows` by `key`, for a goal about GPUs; None where nothing was measured on one."""
    if not _on_gpu(env) or not rows:
        return None
    return (min if lowest else max)(rows, key=key)


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
        if result["kind"] == "suite":
            lines, found = suite_section(source, result)
        elif result["kind"] == "training":
            lines, found = training_section(index, source, result, out)
        elif result["kind"] == "loaders":
            lines, found = loaders_section(index, source, result, out)
        elif result["kind"] == "amp":
            lines, found = amp_section(index, source, result, out)
        elif result["kind"] == "inspect-ranks":
            lines, found = inspect_ranks_section(index, source, result, out)
        elif result["kind"] == "inspect-compare":
            lines, found = inspect_compare_section(index, source, result, out)
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

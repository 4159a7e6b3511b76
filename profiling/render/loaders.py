"""The loader benchmark's section: throughput per backend, ratios over the reference, the backends' goals.

Which row is the reference, and what each backend promises, comes from the
result itself: the benchmark records what the registry declares about each
backend (`backend_info`: role, goals), so this module names no backend.
"""

from __future__ import annotations

from pathlib import Path

from .common import Section, bar_chart, environment_line, goal, incomplete_note, percent

KIND = "loaders"
BOUNDARY_GOAL = 1.1  # an epoch boundary against an ordinary batch (x1.1 for timing noise)


def role(row: dict) -> str | None:
    return (row.get("backend_info") or {}).get("role")


def reference_row(rows: list[dict]) -> dict | None:
    """The row the speed-ups are taken over: the study's own pipeline (role reference) where it was
    measured, else the first baseline."""
    return next((r for r in rows if role(r) == "reference"), None) or \
        next((r for r in rows if role(r) == "baseline"), None)


def _device_type(config: dict) -> str:
    return "cuda" if str(config.get("device", "")).startswith("cuda") else "cpu"


def backend_goals(rows: list[dict], config: dict, env: dict, source: Path) -> list[str]:
    """Each backend's declared goals that apply on this device, checked against the measured rows."""
    found, device = [], _device_type(config)
    reference = reference_row(rows)
    ips = {r["backend"]: r["images_per_s"]["median"] for r in rows}
    where = f"{env.get('device')}, {config['workers']} workers"
    for r in rows:
        for g in (r.get("backend_info") or {}).get("goals", []):
            if g["device"] not in (device, "any"):
                continue
            if g["over"] == "reference" and reference is not None and reference is not r:
                base, against = ips[reference["backend"]], f"{reference['backend']} ({role(reference)})"
            elif g["over"] in ("candidates", "peers"):
                kind = "candidate" if g["over"] == "candidates" else "peer"
                others = [o for o in rows if role(o) == kind and o is not r]
                if not others:
                    continue
                best = max(others, key=lambda o: ips[o["backend"]])
                base, against = ips[best["backend"]], f"the fastest other {kind}, {best['backend']}"
            else:
                continue
            found.append(goal(f"{r['backend']} >= {g['factor']:g}x {against} images/s ({where})",
                              ips[r["backend"]] / base, g["factor"], source))
    return found


def _stats_line(row: dict) -> str | None:
    """A backend's own figures (its stats()), e.g. the cache's one decode and the memory it holds."""
    stats = row.get("stats") or {}
    if not stats:
        return None

    def shown(key, value):
        if key.endswith("_bytes") and isinstance(value, (int, float)):
            return f"{key.removesuffix('_bytes').replace('_', ' ')} {value / 2**20:.1f} MiB"
        if isinstance(value, float):
            return f"{key.replace('_', ' ')} {value:,.0f}" if value.is_integer() else \
                f"{key.replace('_', ' ')} {value:.2f}"
        return f"{key.replace('_', ' ')} {value}"
    return f"{row['backend']}: " + ", ".join(shown(k, v) for k, v in stats.items()) + " (after its first epoch)."


def section(index: int, source: Path, result: dict, out: Path) -> Section:
    env, config = result["environment"], result["config"]
    rows = sorted(result["results"], key=lambda r: -r["images_per_s"]["median"])
    reference = reference_row(rows)
    base = reference["images_per_s"]["median"] if reference else None
    versus = f"vs {reference['backend']}" if reference else "vs reference"
    lines = [f"## Loader throughput ({source.name})", "", *incomplete_note(result),
             f"{env.get('device')}, {config['workers']} workers, {config.get('threads', config['workers'])} DALI "
             f"threads, batch {config['batch_size']}, split {config['split']}, "
             f"{result.get('repeats_done', config['repeats'])} repeats of {config['epochs']} whole epoch(s) of "
             f"{config.get('batches_per_epoch', '?')} batches, "
             f"{'training augmentation' if config.get('augment', True) else 'evaluation transform'}.", "",
             f"| backend | role | images/s (median) | min - max | {versus} | p50 / p95 / p99 ms | epoch boundary "
             f"ms (x batch) | CPU % | peak GPU MiB (torch / added by the loader) |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        ips, lat = r["images_per_s"], r["latency_ms"]
        ratio = f"{ips['median'] / base:.2f}x" if base and role(r) != "upper-bound" else "-"
        memory = " / ".join("-" if r.get(k) is None else f"{r[k]:.0f}"
                            for k in ("peak_gpu_memory_mb", "device_memory_added_mb"))
        boundary = "-" if r.get("epoch_boundary_ms") is None else (
            f"{r['epoch_boundary_ms']:.1f}" + ("" if r.get("boundary_vs_batch") is None
                                               else f" ({r['boundary_vs_batch']:.2f}x)"))
        lines.append(f"| {r['backend']} | {role(r) or '-'} | {ips['median']:.0f} | {ips['min']:.0f} - "
                     f"{ips['max']:.0f} | {ratio} | {lat['p50']:.1f} / {lat['p95']:.1f} / {lat['p99']:.1f} | "
                     f"{boundary} | {percent(r['cpu_util_percent'])} | {memory} |")
    stats = [line for r in rows if (line := _stats_line(r))]
    if stats:
        lines += ["", *stats]
    skipped = result.get("skipped") or {}
    if skipped:
        lines += ["", *(f"{name}: not measured: {why}" for name, why in skipped.items())]
    if reference:
        lines += ["", f"Speed-ups are over {reference['backend']}, "
                      f"{(reference.get('backend_info') or {}).get('summary', '')} (role {role(reference)})."]
    decoding = [r for r in rows if role(r) != "upper-bound"]
    chart = out / f"loaders-{index}.png"
    bar_chart(chart, [r["backend"] for r in decoding], [r["images_per_s"]["median"] for r in decoding],
              [r["images_per_s"]["min"] for r in decoding], [r["images_per_s"]["max"] for r in decoding],
              "images/s", f"loader throughput, {env.get('device')}")
    lines += ["", f"![loader throughput]({chart.name})", "", f"Measured with: {environment_line(env)}", ""]

    goals = []
    if config.get("augment", True):  # the goals are about the training pipeline
        goals += backend_goals(rows, config, env, source)
    for r in decoding:
        # This project's pipelines promise it (the study's own pipeline, the reference, is only shown).
        if r.get("boundary_vs_batch") is not None and role(r) in ("candidate", "baseline"):
            # A median of a few boundaries against a median of many batches: 10% is within the
            # spread of batch latencies here (a pipeline rebuilt per epoch cost about 3 batches).
            goals.append(goal(f"{r['backend']}: an epoch boundary costs at most one ordinary batch "
                              f"(x1.1 for timing noise)", r["boundary_vs_batch"], BOUNDARY_GOAL, source,
                              lower_is_better=True))
    return Section(lines, goals)


def text_table(result: dict) -> str:
    """A plain-text table of a loader result, fastest first, with the ratio to the reference."""
    rows = sorted(result["results"], key=lambda r: -r["images_per_s"]["median"])
    reference = reference_row(rows)
    base = reference["images_per_s"]["median"] if reference else None
    header = f"vs {reference['backend']}" if reference else "vs reference"
    lines = [f"{'backend':<12} {'images/s':>9} {'min':>9} {'max':>9} {'p50 ms':>7} {'p99 ms':>7} "
             f"{'boundary ms':>11} {'CPU %':>6} {header:>14}"]
    for r in rows:
        ips = r["images_per_s"]
        ratio = f"{ips['median'] / base:.2f}x" if base and role(r) != "upper-bound" else "-"
        boundary = "-" if r["epoch_boundary_ms"] is None else f"{r['epoch_boundary_ms']:.1f}"
        lines.append(f"{r['backend']:<12} {_count(ips['median'])} {_count(ips['min'])} {_count(ips['max'])} "
                     f"{r['latency_ms']['p50']:>7.1f} {r['latency_ms']['p99']:>7.1f} {boundary:>11} "
                     f"{percent(r['cpu_util_percent']):>6} {ratio:>14}")
    lines += [f"{name:<12} skipped: {why}" for name, why in (result.get("skipped") or {}).items()]
    return "\n".join(lines)


def _count(value: float) -> str:
    """A rate in 9 characters: whole numbers, or scientific notation when huge (the upper bound)."""
    return f"{value:>9.0f}" if value < 1e8 else f"{value:>9.2e}"

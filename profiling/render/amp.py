"""The AMP benchmark's section: step time and speed-up over FP32, end-to-end data wait, the AMP goals."""

from __future__ import annotations

from pathlib import Path

from .common import Section, bar_chart, best_on_gpu, environment_line, goal, incomplete_note

KIND = "amp"


def speedups(result: dict) -> list[dict]:
    """Each compute row's images/s over the fp32 (no channels_last) row of the same freezing mode."""
    base = {r["freeze"]: r["images_per_s"]["median"] for r in result["compute"]
            if r["precision"] == "fp32" and not r["channels_last"]}
    return [{**r, "speedup_vs_fp32": r["images_per_s"]["median"] / base[r["freeze"]]}
            for r in result["compute"] if r["freeze"] in base]


def settings_line(result: dict) -> str:
    """cudnn.benchmark and TF32, which both move the FP32 baseline (results before them: unknown)."""
    s = result.get("settings")
    if not s:
        return "cudnn.benchmark and TF32 not recorded"
    return (f"cudnn.benchmark {'on' if s['cudnn_benchmark'] else 'off'}; TF32 {s['tf32']} (convolutions "
            f"{'TF32' if s['tf32_convolutions'] else 'FP32'}, matrix multiplications "
            f"{'TF32' if s['tf32_matmul'] else 'FP32'})")


def left_out_lines(result: dict) -> list[str]:
    return [f"> {precision} left out: {why}" for precision, why in (result.get("precisions_left_out") or {}).items()]


def section(index: int, source: Path, result: dict, out: Path) -> Section:
    env, config = result["environment"], result["config"]
    lines = [f"## Mixed precision against FP32 ({source.name})", "", *incomplete_note(result),
             f"{config['model']}, batch {config['batch_size']}, {config['image_size']} px, "
             f"{config['repeats']} repeats of {config['steps']} steps, batches already on the device; "
             f"{settings_line(result)}.", ""]
    if result.get("note"):
        lines += [f"> {result['note']}", ""]
    if left_out_lines(result):
        lines += [*left_out_lines(result), ""]
    lines += ["| training | precision | layout | step ms | images/s | vs FP32 | peak MiB |",
              "| --- | --- | --- | ---: | ---: | ---: | ---: |"]
    rows = speedups(result)
    for r in rows:
        memory = "-" if r["peak_memory_mb"] is None else f"{r['peak_memory_mb']:.0f}"
        lines.append(f"| {r['freeze']} frozen | {r['precision']} | {'NHWC' if r['channels_last'] else 'NCHW'} | "
                     f"{r['step_ms']['median']:.1f} | {r['images_per_s']['median']:.0f} | "
                     f"{r['speedup_vs_fp32']:.2f}x | {memory} |")
    goals = []
    if rows:
        chart = out / f"amp-{index}.png"
        bar_chart(chart, [f"{r['freeze'][:8]} {r['precision']}{' CL' if r['channels_last'] else ''}" for r in rows],
                  [r["speedup_vs_fp32"] for r in rows], ylabel="speed-up over FP32",
                  title=f"AMP vs FP32, {config['model']}, {env.get('device')}", line=1.0)
        lines += ["", f"![AMP speed-up]({chart.name})", ""]
    full = [r for r in rows if r["freeze"] == "none" and r["precision"] != "fp32"]
    if best := best_on_gpu(env, full, key=lambda r: r["speedup_vs_fp32"]):
        goals.append(goal(f"AMP >= 2x FP32, full fine-tuning ({best['precision']}"
                          f"{', channels_last' if best['channels_last'] else ''}, {env.get('device')})",
                          best["speedup_vs_fp32"], 2.0, source))
    end_to_end = result.get("end_to_end") or []
    if end_to_end:
        lines += ["| loader | precision | images/s | data wait |", "| --- | --- | ---: | ---: |"]
        for r in end_to_end:
            lines.append(f"| {r['loader']} | {r['precision']} | {r['images_per_s']['median']:.0f} | "
                         f"{100 * r['data_wait_fraction']:.1f}% |")
        chart = out / f"data-wait-{index}.png"
        bar_chart(chart, [f"{r['loader']} {r['precision']}" for r in end_to_end],
                  [100 * r["data_wait_fraction"] for r in end_to_end], ylabel="% of step time",
                  title="waiting for data, end to end", line=5.0)
        lines += ["", f"![data wait]({chart.name})", ""]
        mixed = [r for r in end_to_end if r["precision"] != "fp32"]
        if best := best_on_gpu(env, mixed, key=lambda r: r["data_wait_fraction"], lowest=True):
            goals.append(goal(f"data wait < 5% of step time, the best loader + AMP ({best['loader']}, "
                              f"{best['precision']}, {env.get('device')})",
                              best["data_wait_fraction"] * 100, 5.0, source, lower_is_better=True, unit="%"))
    lines += [f"Measured with: {environment_line(env)}", ""]
    return Section(lines, goals)


def text_table(result: dict) -> str:
    lines = [f"{'freeze':<13} {'precision':<9} {'layout':<7} {'step ms':>8} {'images/s':>9} {'vs fp32':>7} "
             f"{'peak MiB':>9}"]
    for r in speedups(result):
        memory = f"{r['peak_memory_mb']:.0f}" if r["peak_memory_mb"] is not None else "-"
        lines.append(f"{r['freeze']:<13} {r['precision']:<9} {'NHWC' if r['channels_last'] else 'NCHW':<7} "
                     f"{r['step_ms']['median']:>8.1f} {r['images_per_s']['median']:>9.0f} "
                     f"{r['speedup_vs_fp32']:>6.2f}x {memory:>9}")
    if result["end_to_end"]:
        lines += ["", f"{'loader':<12} {'precision':<9} {'images/s':>9} {'data wait':>9}"]
        for r in result["end_to_end"]:
            lines.append(f"{r['loader']:<12} {r['precision']:<9} {r['images_per_s']['median']:>9.0f} "
                         f"{100 * r['data_wait_fraction']:>8.0f}%")
    lines.append(f"settings: {settings_line(result)}")
    lines += [line.lstrip("> ") for line in left_out_lines(result)]
    if result["note"]:
        lines.append(f"note: {result['note']}")
    return "\n".join(lines)

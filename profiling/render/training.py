"""`profiling suite`'s end-to-end training section: each loader and precision trained for whole epochs."""

from __future__ import annotations

from pathlib import Path

from .common import Section, bar_chart, best_on_gpu, environment_line, goal, or_dash

KIND = "training"
END_TO_END_GOAL = 16000  # images/s, a candidate loader with AMP, on one GPU


def section(index: int, source: Path, result: dict, out: Path) -> Section:
    env, config, runs = result["environment"], result["config"], result["runs"]
    lines = [f"## End-to-end training ({source.name})", "",
             f"{config['file']} ({config['model']}), {config['epochs']} whole epochs per run, channels_last in "
             f"every run (only the precision varies), one process per run (its own GPU memory), no checkpoint "
             f"or test pass, {env.get('device')}. Images/s, data wait (host time blocked on the loader) and GPU "
             f"busy (time inside steps, CUDA events) of the last epoch; the first includes the warm-up.", ""]
    if config.get("note"):
        lines += [f"> {config['note']}", ""]
    lines += ["| loader | role | precision | images/s | first epoch | data wait | GPU busy | peak MiB (torch / GPU) "
              "| val acc after the last epoch* | status |",
              "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in runs:
        memory = f"{or_dash(r['peak_gpu_memory_mb'], '.0f')} / {or_dash(r['device_memory_mb'], '.0f')}"
        lines.append(f"| {r['loader']} | {r.get('role') or '-'} | {r['precision']} | "
                     f"{or_dash(r['images_per_s'], '.0f')} | {or_dash(r['first_epoch_images_per_s'], '.0f')} | "
                     f"{or_dash(r['data_wait_fraction'], '.1f', 100, '%')} | "
                     f"{or_dash(r['gpu_busy_fraction'], '.0f', 100, '%')} | {memory} | "
                     f"{or_dash(r['val_acc'], '.3f')} | {r['status']} |")
    lines += ["", f"\\* After {config['epochs']} epochs of a speed run, from each run's own random start: a sign "
                  f"that the run learns, not an accuracy comparison of loaders or precisions. For that, "
                  f"`python -m profiling accuracy` trains each arm to the end over several seeds and compares "
                  f"them paired by seed."]
    measured = [r for r in runs if r["images_per_s"] is not None]
    if measured:
        chart = out / f"training-{index}.png"
        bar_chart(chart, [f"{r['loader']} {r['precision']}" for r in measured], [r["images_per_s"] for r in measured],
                  ylabel="images/s", title=f"end-to-end training, {env.get('device')}",
                  line=END_TO_END_GOAL if env.get("device") != "cpu" else None)
        lines += ["", f"![end-to-end training]({chart.name})"]
    lines += ["", f"Measured with: {environment_line(env)}", ""]
    goals = []
    candidates = [r for r in measured if r.get("role") == "candidate" and r["precision"] != "fp32"]
    if best := best_on_gpu(env, candidates, key=lambda r: r["images_per_s"]):
        goals.append(goal(f"end to end, the fastest loader + AMP ({best['loader']}, {best['precision']}, "
                          f"{env.get('device')}): >= {END_TO_END_GOAL:,} images/s", best["images_per_s"],
                          END_TO_END_GOAL, source, unit=" img/s"))
        goals.append(goal(f"end to end, {best['loader']} + AMP: data wait < 5% ({best['precision']})",
                          100 * best["data_wait_fraction"], 5.0, source, lower_is_better=True, unit="%"))
    return Section(lines, goals)

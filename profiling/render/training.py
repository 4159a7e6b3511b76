"""`profiling suite`'s end-to-end training section: each loader and precision trained for whole epochs."""

from __future__ import annotations

from pathlib import Path

from .common import Section, bar_chart, best_on_gpu, environment_line, goal, on_gpu, or_dash

KIND = "training"
END_TO_END_GOAL = 16000  # images/s, a candidate loader with AMP, on one GPU
STUDY_GOAL_S = 10.0      # the study's 91 epochs, feature cache included, on one H100-class GPU


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
    study = result.get("study")
    goals = []
    if study:
        lines += ["", *study_lines(study)]
        if on_gpu(env) and study["epochs"] == study["study_epochs"] and study["total_seconds"]:
            goals.append(goal(f"the study's recipe, all {study['study_epochs']} epochs with the feature cache "
                              f"({env.get('device')}): under {STUDY_GOAL_S:g} s (the study: "
                              f"{study['study_seconds']:,} s on a V100)", study["total_seconds"], STUDY_GOAL_S,
                              source, lower_is_better=True, unit=" s"))
    lines += ["", f"Measured with: {environment_line(env)}", ""]
    candidates = [r for r in measured if r.get("role") == "candidate" and r["precision"] != "fp32"]
    if best := best_on_gpu(env, candidates, key=lambda r: r["images_per_s"]):
        goals.append(goal(f"end to end, the fastest loader + AMP ({best['loader']}, {best['precision']}, "
                          f"{env.get('device')}): >= {END_TO_END_GOAL:,} images/s", best["images_per_s"],
                          END_TO_END_GOAL, source, unit=" img/s"))
        goals.append(goal(f"end to end, {best['loader']} + AMP: data wait < 5% ({best['precision']})",
                          100 * best["data_wait_fraction"], 5.0, source, lower_is_better=True, unit="%"))
    return Section(lines, goals)


def study_lines(study: dict) -> list[str]:
    """The study's recipe end to end: the one pass of the feature cache, then the epochs on its output."""
    cache = study.get("feature_cache") or {}
    lines = ["### The study's recipe, end to end", ""]
    if study.get("note"):
        lines += [f"> {study['note']}", ""]
    if not study["epochs"]:
        return lines + [f"Not measured: {study['status']}.", ""]
    if cache.get("used"):
        how = (f"the feature cache computed {cache['values_per_image']:,} {cache['dtype']} values per image once "
               f"({cache['bytes'] / 2**20:.0f} MiB, {cache['source']}) in {study['pass_seconds']:.1f} s, then "
               f"{study['epochs']} epochs on them took {study['epochs_seconds']:.1f} s")
    else:
        how = f"{study['epochs']} epochs without the feature cache took {study['epochs_seconds']:.1f} s"
    return lines + [f"train/configs/study.yaml: {how}: {study['total_seconds']:.1f} s in all "
                    f"({study['process_seconds']:.0f} s with the process's start-up), "
                    f"{or_dash(study['mean_images_per_s'], ',.0f')} training images/s; the study's first version took "
                    f"{study['study_seconds']:,} s for {study['study_epochs']} epochs on one V100. Status: "
                    f"{study['status']}.", ""]

"""The predict benchmark's section: `train predict` against its loader alone and its model alone, per backend.

Goals: on a GPU, predict reaches 85% of the loader alone (the model, AlexNet
under AMP, is far faster than any decoder there, so the loader sets the pace
and predict must not lose it). On a CPU the model and the loader take turns
on the same cores, so each image costs both: the bound is
1 / (1/loader + 1/forward), and predict reaches 85% of it. Where one of the
two is much slower (AlexNet's forward on a CPU), that bound is the slower
one; where they are alike (tiny-cnn) it is half of either, and "85% of the
slower" could not be reached on any CPU.
"""

from __future__ import annotations

from pathlib import Path

from .common import Section, bar_chart, environment_line, goal, incomplete_note, on_gpu

KIND = "predict"
GPU_GOAL = 0.85  # predict / loader alone
CPU_GOAL = 0.85  # predict / the shared-cores bound, 1 / (1/loader + 1/forward)


def describe(result: dict) -> str:
    c = result["config"]
    return (f"{c['model']} ({c['precision']}), batch {c['batch_size']}, {c['image_count']:,} images in "
            f"{c['units']} unit(s) of {c['images']} ({c['rejected']} unreadable, left out), the run's evaluation "
            f"transform, {c['repeats']} round(s) of turns")


def section(index: int, source: Path, result: dict, out: Path) -> Section:
    env, rows = result["environment"], result["results"]
    lines = [f"## Classifying new images: predict against its parts ({source.name})", "", *incomplete_note(result),
             f"{describe(result)}. Loader alone: every batch waited for on the device; forward alone: the model "
             f"on one batch, as many times; predict: `train predict` end to end (header scan, batches, writer "
             f"thread, Parquet files). Images/s, median over the rounds.", "",
             "| backend | loader alone | forward alone | both on the same cores | predict | of the loader "
             "| of the slower | of both |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['backend']} | {r['loader_images_per_s']['median']:,.0f} | "
                     f"{r['forward_images_per_s']['median']:,.0f} | {r['shared_cores_bound_images_per_s']:,.0f} | "
                     f"{r['predict_images_per_s']['median']:,.0f} | {100 * r['predict_vs_loader']:.0f}% | "
                     f"{100 * r['predict_vs_slower']:.0f}% | {100 * r['predict_vs_shared_bound']:.0f}% |")
    lines += ["", "Both on the same cores: 1 / (1/loader + 1/forward), the most a CPU allows when every image "
                  "costs the loader's time and the model's on the same cores."]
    goals = []
    if rows:
        chart = out / f"predict-{index}.png"
        bar_chart(chart, [r["backend"] for r in rows], [r["predict_images_per_s"]["median"] for r in rows],
                  low=[r["predict_images_per_s"]["min"] for r in rows],
                  high=[r["predict_images_per_s"]["max"] for r in rows], ylabel="images/s",
                  title=f"train predict, {env.get('device')}")
        lines += ["", f"![predict images/s]({chart.name})"]
        gpu = on_gpu(env) and result["config"]["device"].startswith("cuda")
        for r in rows:
            if gpu:
                goals.append(goal(f"predict with {r['backend']} ({env.get('device')}): >= {GPU_GOAL:.0%} of the "
                                  f"loader alone", r["predict_vs_loader"], GPU_GOAL, source))
            else:
                goals.append(goal(f"predict with {r['backend']} (CPU): >= {CPU_GOAL:.0%} of loader and forward on "
                                  f"the same cores", r["predict_vs_shared_bound"], CPU_GOAL, source))
    lines += ["", f"Measured with: {environment_line(env)}", ""]
    return Section(lines, goals)


def text_table(result: dict) -> str:
    lines = [describe(result), f"{'backend':<12} {'loader':>9} {'forward':>9} {'both':>9} {'predict':>9} "
                               f"{'of loader':>10} {'of slower':>10} {'of both':>8}"]
    for r in result["results"]:
        lines.append(f"{r['backend']:<12} {r['loader_images_per_s']['median']:>9.0f} "
                     f"{r['forward_images_per_s']['median']:>9.0f} {r['shared_cores_bound_images_per_s']:>9.0f} "
                     f"{r['predict_images_per_s']['median']:>9.0f} {100 * r['predict_vs_loader']:>9.0f}% "
                     f"{100 * r['predict_vs_slower']:>9.0f}% {100 * r['predict_vs_shared_bound']:>7.0f}%")
    return "\n".join(lines)

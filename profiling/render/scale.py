"""The scale benchmark's section: each cost against the number of images, with its growth.

Goals (issue "instrument scale"): the seconds to the first batch with shards
grow no faster than N^0.2 and stay under 2 s at a million images; prepare's
images/s at the largest N within 20% of its rate at the smallest; prepare's
peak memory under 1 KB per image, and a training rank's under 200 bytes per
image, plus a constant (the slope between the smallest and largest N).
"""

from __future__ import annotations

from pathlib import Path

from .common import Section, environment_line, goal, incomplete_note, or_dash

KIND = "scale"
FIRST_BATCH_GROWTH = 0.2      # exponent, shards
FIRST_BATCH_SECONDS = 2.0     # at a million images, shards
PREPARE_RATE_KEPT = 0.8       # largest N's images/s over the smallest's
PREPARE_BYTES = 1024          # per image
RANK_BYTES = 200              # per image


def describe(result: dict) -> str:
    c = result["config"]
    return (f"synthetic sets of {', '.join(f'{n:,}' for n in c['sizes'])} JPEGs ({c['image_size']} px, "
            f"{c['classes']} classes, {c['split']}); loader {c['backend']}, batch {c['batch_size']}, "
            f"{c['workers']} workers, steady rate over {c['batches']} batches")


def _rows(result: dict) -> list[str]:
    lines = ["| images | prepare images/s | prepare peak MiB | pack images/s | first batch, loose (s) | "
             "first batch, shards (s) | rank peak MiB, shards | steady images/s, shards |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in result["results"]:
        lines.append(f"| {r['images']:,} | {r['prepare_images_per_s']:,.0f} | {r['prepare_peak_bytes'] / 2**20:,.0f} | "
                     f"{r['pack_images_per_s']:,.0f} | {r['loose']['first_batch_seconds']:.2f} | "
                     f"{r['shards']['first_batch_seconds']:.2f} | {r['shards']['peak_bytes'] / 2**20:,.0f} | "
                     f"{or_dash(r['shards']['steady_images_per_s'], ',.0f')} |")
    return lines


def _growth_lines(result: dict) -> list[str]:
    g, b = result["growth"], result["bytes_per_image"]
    return ["Growth, the exponent b of cost = a * N^b (0: flat, 1: linear): prepare's seconds "
            f"{or_dash(g['prepare_seconds'], '.2f')}, pack's {or_dash(g['pack_seconds'], '.2f')}, the first batch's "
            f"{or_dash(g['first_batch_seconds_loose'], '.2f')} (loose) and {or_dash(g['first_batch_seconds_shards'], '.2f')} "
            f"(shards), the steady images/s {or_dash(g['steady_images_per_s_shards'], '.2f')}. Peak memory per image "
            f"(the slope from the smallest to the largest set): prepare {or_dash(b['prepare'], ',.0f')} bytes, a "
            f"training rank {or_dash(b['training_rank_loose'], ',.0f')} (loose) and "
            f"{or_dash(b['training_rank_shards'], ',.0f')} bytes (shards)."]


def section(index: int, source: Path, result: dict, out: Path) -> Section:
    env, rows = result["environment"], result["results"]
    lines = [f"## How the costs grow with the number of images ({source.name})", "", *incomplete_note(result),
             f"{describe(result)}. Each cost in a process of its own.", "", *_rows(result), "",
             *_growth_lines(result), "", f"Measured with: {environment_line(env)}", ""]
    goals = []
    if len(rows) >= 2:
        g, b = result["growth"], result["bytes_per_image"]
        goals.append(goal("the first batch with shards grows no faster than N^0.2", g["first_batch_seconds_shards"],
                          FIRST_BATCH_GROWTH, source, lower_is_better=True, unit=""))
        goals.append(goal(f"prepare at {rows[-1]['images']:,} images keeps 80% of its images/s at "
                          f"{rows[0]['images']:,}", rows[-1]["prepare_images_per_s"] / rows[0]["prepare_images_per_s"],
                          PREPARE_RATE_KEPT, source))
        goals.append(goal("prepare's peak memory per image", b["prepare"], PREPARE_BYTES, source, lower_is_better=True,
                          unit=" B"))
        goals.append(goal("a training rank's peak memory per image (shards)", b["training_rank_shards"], RANK_BYTES,
                          source, lower_is_better=True, unit=" B"))
    million = [r for r in rows if r["images"] >= 1_000_000]
    if million:
        goals.append(goal(f"the first batch with shards at {million[0]['images']:,} images",
                          million[0]["shards"]["first_batch_seconds"], FIRST_BATCH_SECONDS, source,
                          lower_is_better=True, unit=" s"))
    return Section(lines, goals)


def text_table(result: dict) -> str:
    return "\n".join([describe(result), "", *_rows(result), "", *_growth_lines(result)])

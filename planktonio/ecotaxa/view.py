"""An export as the class folders `prepare` reads, with its metadata beside the manifests.

`prepare` takes a folder of class folders; an export becomes one under
OUT/ecotaxa/images/<class>/<sample>/<object>.<ext>: links to the images of an
unpacked export, the images themselves from a zip (a prepared set's images
must outlive the command: training reads them from there). Every rule of
prepare then applies as it is (bad files, duplicates, minimum counts).

Beside the manifests, in OUT/ecotaxa/:
    objects.csv      per kept object: its image in the view, class, EcoTaxa
                     category, object_id, sample_id, status and metadata
                     (sample_*, position, date, depth)
    categories.json  class folder -> EcoTaxa category (what predict writes back)
    left_out.csv     object_id, reason for every object not kept
    export.json      the export, the level and statuses asked, the counts
"""

from __future__ import annotations

import csv
import io
import json
import os
import random
import re
import shutil
from pathlib import Path

from ..errors import PlanktonioError
from ..files import write_atomic
from .export import Export
from .select import Level, Selection

FOLDER = "ecotaxa"
IMAGES = "images"
OBJECTS = "objects.csv"
CATEGORIES = "categories.json"
LEFT_OUT = "left_out.csv"
RECORD = "export.json"
SPLITS = ("train", "valid", "test")


def safe_part(text: str) -> str:
    """A file or folder name for an id: letters, digits, '.', '-', '_' kept, the rest '_'."""
    name = re.sub(r"[^A-Za-z0-9._-]", "_", text).strip(".") or "_"
    return name[:120]


def materialise(export: Export, selection: Selection, out: Path, level: Level,
                statuses: tuple[str, ...]) -> Path:
    """Write OUT/ecotaxa/ (the class folders and the metadata); return the class folders' root."""
    folder = Path(out) / FOLDER
    images = folder / IMAGES
    if images.exists():
        shutil.rmtree(images)  # a view of an earlier prepare: rebuilt whole, never mixed
    images.mkdir(parents=True)
    rows, names = [], set()
    archive = None
    if export.is_zip:
        import zipfile
        archive = zipfile.ZipFile(export.source)
    try:
        for obj, class_folder in selection.kept:
            ext = os.path.splitext(obj.image)[1].lower() or ".jpg"
            rel = f"{class_folder}/{safe_part(obj.sample_id or 'no_sample')}/{safe_part(obj.object_id)}"
            candidate, n = rel + ext, 1
            while candidate in names:  # two ids that read alike once made safe
                candidate, n = f"{rel}_{n}{ext}", n + 1
            names.add(candidate)
            target = images / candidate
            target.parent.mkdir(parents=True, exist_ok=True)
            if archive is not None:
                target.write_bytes(archive.read(obj.image))
            else:
                os.symlink(obj.image, target)
            rows.append({"path": candidate, "class": class_folder, "category": selection.categories[class_folder],
                         "object_id": obj.object_id, "sample_id": obj.sample_id, "status": obj.status,
                         "images": obj.images, **obj.metadata})
    finally:
        if archive is not None:
            archive.close()
    _write_csv(folder / OBJECTS, rows)
    _write_csv(folder / LEFT_OUT, [{"object_id": i, "reason": r} for i, r in selection.left_out_ids])
    write_atomic(folder / CATEGORIES, json.dumps(selection.categories, indent=2, ensure_ascii=False) + "\n")
    record = {"source": str(export.source.resolve()), "tsvs": export.tsvs, "objects": len(export.objects),
              "level": level.depth or list(level.names) or "category", "statuses": list(statuses),
              "kept": len(selection.kept), "left_out": selection.left_out}
    write_atomic(folder / RECORD, json.dumps(record, indent=2, ensure_ascii=False) + "\n")
    return images


def _write_csv(path: Path, rows: list[dict]) -> None:
    fields = list(dict.fromkeys(k for row in rows for k in row)) or ["object_id"]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_atomic(path, buffer.getvalue())


def read_objects(prepared: Path) -> list[dict]:
    """OUT/ecotaxa/objects.csv of a prepared set (empty when it was not prepared from an export)."""
    path = Path(prepared) / FOLDER / OBJECTS
    if not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def sample_splits(sizes: dict[str, int], fractions: tuple[float, float, float], seed: int) -> dict[str, str]:
    """Each sample's split: whole samples, the splits' object counts as near the fractions as samples allow.

    The largest samples are placed first (ties in a seeded order), each into the
    split furthest below its share; so with at least as many samples as
    non-empty splits, every such split gets one.
    """
    total = sum(sizes.values())
    order = sorted(sizes, key=lambda s: (-sizes[s], random.Random(f"{seed}:{s}").random(), s))
    have = dict.fromkeys(SPLITS, 0)
    placed = {}
    wanted = [s for s, f in zip(SPLITS, fractions) if f > 0]
    for number, sample in enumerate(order):
        empty = [s for s in wanted if have[s] == 0]
        if empty and len(order) - number <= len(empty):
            split = empty[0]  # as many samples left as splits still empty: one each
        else:
            split = max(wanted, key=lambda s: (fractions[SPLITS.index(s)] * total - have[s], -SPLITS.index(s)))
        placed[sample] = split
        have[split] += sizes[sample]
    return placed


def grouped_assigner(rows: list[dict], fractions: tuple[float, float, float], seed: int, key: str = "sample_id"):
    """A split function for prepare: a class's images go to their sample's split, so no sample is in two."""
    if rows and key not in rows[0]:
        raise PlanktonioError(f"--group-by {key}: the export has no {key} column")
    group_of = {row["path"]: row.get(key, "") for row in rows}
    sizes: dict[str, int] = {}
    for group in group_of.values():
        sizes[group] = sizes.get(group, 0) + 1
    split_of = sample_splits(sizes, fractions, seed)

    def assign(images: list[str], counts, seed_, class_name, copies=None) -> dict[str, list[str]]:
        copies = copies or {}
        parts = {s: [] for s in SPLITS}
        for first in images:
            parts[split_of[group_of[first]]].extend((first, *copies.get(first, ())))
        return {s: sorted(paths) for s, paths in parts.items()}
    return assign, split_of

"""All the units together: samples.csv (the abundance table), rejected.csv and provenance.json."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from planktonio.files import atomic_file, write_atomic
from planktonio.unlabelled import Catalog

from .. import calibration
from .options import UNITS


def merge(catalog: Catalog, out: Path, classes: list[str], provenance: dict) -> None:
    """samples.csv (counts per class per sample, top-1 and thresholded), rejected.csv and provenance.json from
    every unit's record."""
    counts, thresholded, rejected, images = {}, {}, [], {}
    for unit in catalog.units:
        done = json.loads((out / UNITS / f"{unit.name}.json").read_text())
        for table, into in ((done["counts"], counts), (done["counts_thresholded"], thresholded)):
            for sample, per_class in table.items():
                for name, n in per_class.items():
                    into.setdefault(sample, {}).setdefault(name, 0)
                    into[sample][name] += n
        rejected += done["rejected"]
    for sample in catalog.samples:
        images[sample] = images.get(sample, 0) + 1
    labels = [*classes, calibration.UNCLASSIFIED]
    with atomic_file(out / "samples.csv", "w") as f:
        writer = csv.writer(f)
        writer.writerow(["sample", "images", "rejected", *classes, *(f"label_{name}" for name in labels)])
        rejected_per_sample = {}
        for r in rejected:
            rejected_per_sample[r["sample"]] = rejected_per_sample.get(r["sample"], 0) + 1
        for sample in sorted(images):
            writer.writerow([sample, images[sample], rejected_per_sample.get(sample, 0),
                             *(counts.get(sample, {}).get(name, 0) for name in classes),
                             *(thresholded.get(sample, {}).get(name, 0) for name in labels)])
    with atomic_file(out / "rejected.csv", "w") as f:
        writer = csv.DictWriter(f, fieldnames=["path", "sample", "reason", "detail"])
        writer.writeheader()
        writer.writerows(rejected)
    write_atomic(out / "provenance.json", json.dumps(provenance, indent=2) + "\n")

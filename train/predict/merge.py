"""All the units together: samples.csv (the abundance table), rejected.csv and provenance.json."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from planktonio.errors import PlanktonioError
from planktonio.files import atomic_file, write_atomic
from planktonio.unlabelled import Catalog

from .. import calibration
from .folder import describe
from .options import UNITS
from .settings import owner_record


def merge(catalog: Catalog, out: Path, classes: list[str], provenance: dict) -> None:
    """samples.csv (per sample: its images, predicted or rejected, each once; counts per class, top-1 and
    thresholded), rejected.csv and provenance.json from every unit's record; refused where a unit was
    predicted with other settings (it would add up two runs)."""
    records = _records(catalog, out, owner_record(provenance))
    counts, thresholded, rejected = {}, {}, []
    for done in records:
        for table, into in ((done["counts"], counts), (done["counts_thresholded"], thresholded)):
            for sample, per_class in table.items():
                for name, n in per_class.items():
                    into.setdefault(sample, {}).setdefault(name, 0)
                    into[sample][name] += n
        rejected += done["rejected"]
    rejected_per_sample = {}
    for r in rejected:
        rejected_per_sample[r["sample"]] = rejected_per_sample.get(r["sample"], 0) + 1
    samples = sorted(set(counts) | set(rejected_per_sample))
    labels = [*classes, calibration.UNCLASSIFIED]
    with atomic_file(out / "samples.csv", "w") as f:
        writer = csv.writer(f)
        writer.writerow(["sample", "images", "rejected", *classes, *(f"label_{name}" for name in labels)])
        for sample in samples:
            predicted = sum(counts.get(sample, {}).values())
            writer.writerow([sample, predicted + rejected_per_sample.get(sample, 0),
                             rejected_per_sample.get(sample, 0),
                             *(counts.get(sample, {}).get(name, 0) for name in classes),
                             *(thresholded.get(sample, {}).get(name, 0) for name in labels)])
    with atomic_file(out / "rejected.csv", "w") as f:
        writer = csv.DictWriter(f, fieldnames=["path", "sample", "reason", "detail"])
        writer.writeheader()
        writer.writerows(rejected)
    write_atomic(out / "provenance.json", json.dumps(provenance, indent=2) + "\n")


def _records(catalog: Catalog, out: Path, owner: dict) -> list[dict]:
    """Every unit's record, each checked to be of the folder's settings."""
    records = []
    for unit in catalog.units:
        done = json.loads((out / UNITS / f"{unit.name}.json").read_text())
        if done.get("settings") != owner["settings"]:
            raise PlanktonioError(f"{out}: its unit {unit.name} holds the predictions of {describe(done)}, the "
                                  f"folder those of {describe(owner)}; samples.csv would add up two runs: predict "
                                  f"that unit again with these settings (--overwrite with the --shard that holds "
                                  f"it), or choose another --out")
        records.append(done)
    return records

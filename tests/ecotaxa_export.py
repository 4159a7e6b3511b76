"""A synthetic EcoTaxa export, written by the tests from the synthetic set (planktonio/synth.py).

As EcoTaxa's general export lays it out (ecotaxa_back, exports/ForProject.py):
one TSV at the root (`ecotaxa_export.tsv`, text values quoted, optionally the
type row), images under `<sample>/<name>`, img_file_name relative to the TSV.
Rows: validated, predicted and dubious objects over several samples, a
hierarchy (copepods as two genera under Copepoda), and one object with two
images (two rows, img_rank 0 and 1).
"""

from __future__ import annotations

import csv
import io
import zipfile
from dataclasses import dataclass
from pathlib import Path

from planktonio.synth import CLASS_NAMES, render

EUK = "living>Eukaryota"
# synthetic body plan -> EcoTaxa (category, hierarchy) of its objects, in turn
TAXA = {
    "copepod": [("Calanus", f"{EUK}>Opisthokonta>Metazoa>Arthropoda>Crustacea>Copepoda>Calanoida>Calanus"),
                ("Oithona", f"{EUK}>Opisthokonta>Metazoa>Arthropoda>Crustacea>Copepoda>Cyclopoida>Oithona")],
    "chaetognath": [("Chaetognatha", f"{EUK}>Opisthokonta>Metazoa>Chaetognatha")],
    "radiolarian": [("Acantharea", f"{EUK}>Harosa>Rhizaria>Radiozoa>Acantharea")],
    "diatom_chain": [("Bacillariophyta", f"{EUK}>Harosa>Stramenopiles>Ochrophyta>Bacillariophyta")],
}


@dataclass
class Row:
    object_id: str
    sample_id: str
    status: str
    category: str
    hierarchy: str
    image: str
    rank: int
    synth: tuple[int, int]  # (class index, image index) it was rendered from


def status_of(index: int) -> str:
    """Every 5th object predicted, every 7th (not 5th) dubious, the rest validated."""
    return "predicted" if index % 5 == 4 else "dubious" if index % 7 == 6 else "validated"


def export_rows(classes=("copepod", "chaetognath", "radiolarian"), per_class: int = 30,
                samples=("stn01", "stn02", "stn03", "stn04", "stn05"), status=status_of,
                id_prefix: str = "obj") -> list[Row]:
    rows = []
    for name in classes:
        c = CLASS_NAMES.index(name)
        for i in range(per_class):
            category, hierarchy = TAXA[name][i % len(TAXA[name])]
            sample = samples[i % len(samples)]
            oid = f"{id_prefix}_{name}_{i:03d}"
            rows.append(Row(oid, sample, status(i), category, hierarchy, f"{sample}/{oid}.jpg", 0, (c, i)))
    first = rows[0]  # one object with a second image: its second rank, rendered from another index
    rows.insert(1, Row(first.object_id, first.sample_id, first.status, first.category, first.hierarchy,
                       f"{first.sample_id}/{first.object_id}_b.jpg", 1, (first.synth[0], 900)))
    return rows


def write_export(path: Path, rows: list[Row], *, size: int = 64, types: bool = False, zipped: bool = True) -> Path:
    """The export as a .zip (or its unpacked folder) at `path`."""
    header = ["object_id", "sample_id", "img_file_name", "img_rank", "object_annotation_status",
              "object_annotation_category", "object_annotation_hierarchy", "object_lat", "object_lon",
              "object_date", "object_depth_min", "object_depth_max", "sample_cruise", "acq_id"]
    buffer = io.StringIO()
    writer = csv.writer(buffer, delimiter="\t", lineterminator="\n", quoting=csv.QUOTE_NONNUMERIC)
    writer.writerow(header)
    if types:
        writer.writerow(["[t]", "[t]", "[t]", "[f]", "[t]", "[t]", "[t]", "[f]", "[f]", "[t]", "[f]", "[f]",
                         "[t]", "[t]"])
    for n, r in enumerate(rows):
        writer.writerow([r.object_id, r.sample_id, r.image, r.rank, r.status, r.category, r.hierarchy,
                         43.5 + n / 1000, 7.3, "20260601", 0.0, 10.0 + n % 3, "cruise-1", f"acq_{r.sample_id}"])
    files = {"ecotaxa_export.tsv": ("\ufeff" + buffer.getvalue()).encode("utf-8")}
    for r in rows:
        out = io.BytesIO()
        render(r.synth[0], r.synth[1], size=size).save(out, "JPEG", quality=90)
        files[r.image] = out.getvalue()
    path = Path(path)
    if zipped:
        with zipfile.ZipFile(path, "w") as archive:
            for name, data in files.items():
                archive.writestr(name, data)
    else:
        for name, data in files.items():
            (path / name).parent.mkdir(parents=True, exist_ok=True)
            (path / name).write_bytes(data)
    return path

"""Writing an EcoTaxa import: zip(s) of a typed TSV and the images, predictions for people to validate.

The TSV (format rules checked against ecotaxa/ecotaxa_back py/BO/TSVFile.py
and py/BO/Bundle.py, pyecotaxa's archive.py and MorphoCut's
morphocut/contrib/ecotaxa.py; docs/ecotaxa.md says which rule came from where):
- named ecotaxa_*.tsv (EcoTaxa imports only ecotaxa*.tsv / ecotaxa*.txt);
- the header, then a type row: `[f]` for a number column, `[t]` for text;
- every column `<prefix>_<name>` with prefix object, sample, acq, process or
  img; a sample_/acq_/process_ column needs its `<prefix>_id`;
- `img_file_name` relative to the TSV's folder, the file in the zip (images
  stored, not deflated: they are compressed already); `object_id` on every
  row, one row per (object_id, img_file_name);
- `object_annotation_category` (EcoTaxa's name for the class: a mapping file
  where class folders and EcoTaxa names differ) with
  `object_annotation_status` `predicted`; an image the calibrated thresholds
  leave "unclassified" gets neither, for a person to classify;
- the top-k categories and scores as object_top<N> (text) and
  object_top<N>_score (number) columns, which EcoTaxa keeps as the project's
  own object fields; the sample metadata (sample_id, sample_*) and object
  position, date and depth when the images came from an export.

Objects that must keep their annotation (validated ones, predicted only when
asked) go into a TSV of their own with no annotation columns at all: an
update import cannot touch what is not there. Large outputs are cut into
several zips of at most `zip_bytes` each.
"""

from __future__ import annotations

import csv
import io
import os
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import PlanktonioError
from ..files import atomic_file
from .view import safe_part

# The upload limit is the platform's configuration (ecotaxa_back helpers/AppConfig.py: MAX_UPLOAD_SIZE, its
# unit not stated there); 500 MiB stays under every reading of it that a web upload plausibly allows.
DEFAULT_ZIP_BYTES = 500 * 2**20
PREFIX = "ecotaxa_import"
# What a zip entry costs beyond its bytes: local header, central directory, data descriptor, plus its name twice.
ENTRY_OVERHEAD = 200
NUMBER = re.compile(r"^\s*[-+]?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?\s*$")


@dataclass
class ImportRow:
    """One object image for the import."""

    object_id: str
    image: Path | None             # the file to store in the zip; None: the TSV names it, the zip leaves it out
    category: str                  # EcoTaxa category; "" = left for a person (unclassified)
    top: list[tuple[str, float]]   # the top-k (category, score)
    sample_id: str = ""
    rank: int = 0
    annotate: bool = True          # False: scores only, the object's annotation is not written
    metadata: dict[str, str] = field(default_factory=dict)
    types: dict[str, str] = field(default_factory=dict)
    image_name: str = ""           # set by write_import: img_file_name in the TSV


def _type_of(column: str, values: list[str], declared: dict[str, str]) -> str:
    if column in declared:
        return declared[column]
    if column.startswith("sample_") or column in ("acq_id", "object_date", "object_time"):
        return "[t]"  # EcoTaxa keeps parent tables' columns as text whatever the type row says
    return "[f]" if values and all(v == "" or NUMBER.match(v) for v in values) else "[t]"


def _columns(rows: list[ImportRow], top_k: int) -> tuple[list[str], dict[str, str]]:
    meta = list(dict.fromkeys(k for row in rows for k in row.metadata))
    object_meta = [c for c in meta if c.startswith("object_")]
    parent_meta = [c for c in meta if not c.startswith("object_") and c != "sample_id"]
    columns = ["img_file_name", "img_rank", "object_id"]
    if rows and rows[0].annotate:
        columns += ["object_annotation_category", "object_annotation_status"]
    for n in range(1, top_k + 1):
        columns += [f"object_top{n}", f"object_top{n}_score"]
    columns += object_meta
    if any(row.sample_id for row in rows):
        columns += ["sample_id"]
    columns += parent_meta
    declared = {k: v for row in rows for k, v in row.types.items()}
    types = {}
    for c in columns:
        if c in ("img_rank",) or (c.startswith("object_top") and c.endswith("_score")):
            types[c] = "[f]"
        elif c in ("img_file_name", "object_id", "object_annotation_category", "object_annotation_status",
                   "sample_id") or c.startswith("object_top"):
            types[c] = "[t]"
        else:
            types[c] = _type_of(c, [row.metadata.get(c, "") for row in rows], declared)
    return columns, types


def _values(row: ImportRow, columns: list[str]) -> list[str]:
    values = {"img_file_name": row.image_name, "img_rank": str(row.rank), "object_id": row.object_id,
              "object_annotation_category": row.category,
              "object_annotation_status": "predicted" if row.category else "", "sample_id": row.sample_id}
    for n, (name, score) in enumerate(row.top, start=1):
        values[f"object_top{n}"] = name
        values[f"object_top{n}_score"] = f"{score:.6g}"
    return [values.get(c, row.metadata.get(c, "")) for c in columns]


def tsv_text(rows: list[ImportRow], top_k: int) -> str:
    """The TSV of these rows: header, type row, one line per row (UTF-8, no BOM: EcoTaxa's import reads the
    header as it is, a BOM would become part of the first column's name)."""
    columns, types = _columns(rows, top_k)
    buffer = io.StringIO()
    writer = csv.writer(buffer, delimiter="\t", lineterminator="\n", quotechar='"')
    writer.writerow(columns)
    writer.writerow([types[c] for c in columns])
    for row in rows:
        writer.writerow(_values(row, columns))
    return buffer.getvalue()


def _name_images(rows: list[ImportRow]) -> None:
    used = set()
    for row in rows:
        ext = os.path.splitext(str(row.image or row.object_id))[1].lower() or ".jpg"
        base = f"images/{safe_part(row.sample_id or 'no_sample')}/{safe_part(row.object_id)}"
        name, n = base + ext, 1
        while name in used:
            name, n = f"{base}_{n}{ext}", n + 1
        used.add(name)
        row.image_name = name


def _cost(row: ImportRow) -> int:
    size = os.path.getsize(row.image) if row.image is not None else 0
    return size + ENTRY_OVERHEAD + 2 * len(row.image_name) + 64 * (len(row.top) + len(row.metadata) + 6)


def _parts(rows: list[ImportRow], zip_bytes: int) -> list[list[ImportRow]]:
    parts, current, used = [], [], 0
    for row in rows:
        cost = _cost(row)
        if cost > zip_bytes:
            raise PlanktonioError(f"--ecotaxa-zip-size {zip_bytes} bytes: the image of object {row.object_id} "
                                  f"alone takes {cost}; raise the size")
        if current and used + cost > zip_bytes:
            parts.append(current)
            current, used = [], 0
        current.append(row)
        used += cost
    return [*parts, current] if current else parts


def write_import(rows: list[ImportRow], out: Path, *, top_k: int, zip_bytes: int = DEFAULT_ZIP_BYTES,
                 prefix: str = PREFIX) -> list[Path]:
    """OUT/<prefix>_001.zip, ...: each a TSV (and one for scores only, where some objects keep their
    annotation) and its images; earlier parts of the same prefix that are not written again are removed."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ids = [row.object_id for row in rows]
    if len(set(ids)) != len(ids):
        raise PlanktonioError("EcoTaxa import: an object_id appears twice; each object is predicted once")
    _name_images(rows)
    written = []
    for number, part in enumerate(_parts(rows, zip_bytes) or [[]], start=1):
        path = out / f"{prefix}_{number:03d}.zip"
        with atomic_file(path, "wb") as f, zipfile.ZipFile(f, "w") as archive:
            for annotate, suffix in ((True, ""), (False, "_scores_only")):
                chosen = [row for row in part if row.annotate == annotate]
                if chosen or (annotate and not part):
                    archive.writestr(f"{prefix}_{number:03d}{suffix}.tsv", tsv_text(chosen, top_k),
                                     compress_type=zipfile.ZIP_DEFLATED)
            for row in part:
                if row.image is not None:
                    archive.write(row.image, row.image_name, compress_type=zipfile.ZIP_STORED)
        written.append(path)
    for stale in out.glob(f"{prefix}_[0-9][0-9][0-9].zip"):
        if stale not in written:
            stale.unlink()
    return written

"""From `train predict`'s output to an EcoTaxa import, and from an export to predict's input.

Predicting an export: `stage_export` writes OUT/ecotaxa/images.txt (the
images of the objects to predict: by default only those not validated, so
that no validated object is ever sent back as a prediction) and
OUT/ecotaxa/to_predict.csv (each image's object and metadata); predict
reads the list as it reads any list of paths. `import_predictions` then turns
OUT/units/*.parquet (or .csv) into the import zip(s): the objects' own ids and
metadata for an export, ids made from the image paths for any other folder.
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

from ..errors import PlanktonioError
from ..files import write_atomic
from .export import read_export
from .importer import DEFAULT_ZIP_BYTES, ImportRow, write_import
from .view import FOLDER, safe_part

LISTING = "images.txt"
TO_PREDICT = "to_predict.csv"
UNCLASSIFIED = "unclassified"  # train/calibration.py's label below a class's threshold


def stage_export(export_path: Path, out: Path, include_validated: bool = False) -> tuple[Path, dict]:
    """Write the list of images to predict and their objects; return the list and counts by status."""
    export = read_export(export_path)
    folder = Path(out) / FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    staged = folder / "export_images"
    rows, counts = [], {}
    archive = None
    if export.is_zip:
        import zipfile
        archive = zipfile.ZipFile(export.source)
    try:
        for obj in export.objects:
            key = obj.status or "unclassified"
            if not obj.image:
                key = "image missing"
            elif obj.status == "validated" and not include_validated:
                key = "validated (kept as they are)"
            else:
                rows.append(_stage(obj, archive, staged))
            counts[key] = counts.get(key, 0) + 1
    finally:
        if archive is not None:
            archive.close()
    write_atomic(folder / LISTING, "".join(f"{row['image']}\n" for row in rows))
    _write_rows(folder / TO_PREDICT, rows)
    return folder / LISTING, counts


def _stage(obj, archive, staged: Path) -> dict:
    if archive is not None:  # predict reads files: a zip's images are unpacked once, beside the list
        ext = os.path.splitext(obj.image)[1].lower() or ".jpg"  # (a member's own name may hold '..')
        target = staged / safe_part(obj.sample_id or "no_sample") / f"{safe_part(obj.object_id)}{ext}"
        if not target.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(archive.read(obj.image))
        image = str(target.resolve())
    else:
        image = obj.image
    return {"image": image, "object_id": obj.object_id, "sample_id": obj.sample_id, "status": obj.status,
            "rank": "" if obj.rank == float("inf") else int(obj.rank), "types": json.dumps(obj.types),
            **obj.metadata}


def _write_rows(path: Path, rows: list[dict]) -> None:
    fields = list(dict.fromkeys(k for row in rows for k in row)) or ["image", "object_id"]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_atomic(path, buffer.getvalue())


def read_predictions(predictions: Path):
    """predict's per-unit tables (units/*.parquet or units/*.csv) as one pandas DataFrame."""
    import pandas as pd
    units = Path(predictions) / "units"
    parquet, text = sorted(units.glob("*.parquet")), sorted(units.glob("*.csv"))
    if not parquet and not text:
        raise PlanktonioError(f"--predictions {predictions}: no units/*.parquet or units/*.csv (the output "
                              f"folder of `python -m train predict`)")
    frames = [pd.read_parquet(p) for p in parquet] or [pd.read_csv(p, comment="#", dtype=str,
                                                                   keep_default_na=False) for p in text]
    return pd.concat(frames, ignore_index=True)


def read_categories(path: Path | None) -> dict[str, str]:
    """A class-to-category mapping file: JSON {"class folder": "EcoTaxa category"}; classes not named keep
    their name."""
    if path is None:
        return {}
    try:
        mapping = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise PlanktonioError(f"--ecotaxa-categories {path}: cannot be read as JSON ({error})") from None
    if not isinstance(mapping, dict) or not all(isinstance(v, str) for v in mapping.values()):
        raise PlanktonioError(f"--ecotaxa-categories {path}: expected an object of class name -> EcoTaxa "
                              f"category, e.g. {{\"copepod\": \"Copepoda\"}}")
    return mapping


def _path_ids(paths: list[str]) -> list[str]:
    """Object ids for images that are not an export's: the relative path without its extension, '/' as '_'
    (made unique in order where two paths read alike)."""
    ids, used = [], set()
    for path in paths:
        base = os.path.splitext(path.lstrip("/"))[0].replace("/", "_")
        name, n = base, 1
        while name in used:
            name, n = f"{base}_{n}", n + 1
        used.add(name)
        ids.append(name)
    return ids


def import_rows(frame, images_root: Path | None, categories: dict[str, str], staged: list[dict] | None,
                top_k: int, images: bool = True) -> list[ImportRow]:
    """One ImportRow per predicted image; an export's objects keep their ids and metadata."""
    k = min(top_k, sum(1 for c in frame.columns if c.startswith("top") and c[3:].isdigit()))
    by_image = {row["image"]: row for row in staged or []}
    paths = [str(p) for p in frame["path"]]
    absolute = [Path(p) if os.path.isabs(p) else Path(images_root or ".") / p for p in paths]
    ids = _path_ids(paths)
    rows = []
    for i, record in enumerate(frame.to_dict("records")):
        label = str(record.get("label", record["top1"]))
        category = "" if label == UNCLASSIFIED else categories.get(label, label)
        top = [(categories.get(str(record[f"top{n}"]), str(record[f"top{n}"])), float(record[f"top{n}_prob"]))
               for n in range(1, k + 1)]
        image = absolute[i] if images else None
        if images and not absolute[i].is_file():
            raise PlanktonioError(f"EcoTaxa import: image {absolute[i]} not found (predict read it from "
                                  f"there; tar shards: use --ecotaxa-no-images)")
        known = by_image.get(str(absolute[i])) if staged is not None else None
        if staged is not None and known is None:
            raise PlanktonioError(f"EcoTaxa import: {absolute[i]} is not an image of the staged export")
        if known is not None:
            meta = {c: v for c, v in known.items()
                    if c not in ("image", "object_id", "sample_id", "status", "rank", "types")}
            rows.append(ImportRow(known["object_id"], image, category, top, known["sample_id"],
                                  int(known["rank"] or 0), annotate=known["status"] != "validated",
                                  metadata=meta, types=json.loads(known["types"] or "{}")))
        else:
            rows.append(ImportRow(ids[i], image, category, top, str(record.get("sample", "")),
                                  annotate=True))
    return rows


def import_predictions(predictions: Path, out: Path, *, images_root: Path | None = None,
                       categories: dict[str, str] | None = None, top_k: int = 3,
                       zip_bytes: int = DEFAULT_ZIP_BYTES, images: bool = True) -> list[Path]:
    """The import zip(s) in OUT from predict's output folder PREDICTIONS (and its staged export, if any)."""
    frame = read_predictions(predictions)
    classes = [c[2:] for c in frame.columns if c.startswith("p_")]
    unknown = sorted(set(categories or {}) - set(classes))
    if classes and unknown:
        raise PlanktonioError(f"--ecotaxa-categories: {', '.join(unknown)} is not a class of the run (its "
                              f"classes: {', '.join(classes)})")
    staged_file = Path(predictions) / FOLDER / TO_PREDICT
    staged = None
    if staged_file.is_file():
        with open(staged_file, newline="", encoding="utf-8") as f:
            staged = list(csv.DictReader(f))
    rows = import_rows(frame, images_root, categories or {}, staged, top_k, images)
    return write_import(rows, out, top_k=top_k, zip_bytes=zip_bytes)

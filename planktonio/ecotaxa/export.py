"""Reading an EcoTaxa export (a .zip, or its unpacked folder) into objects.

What an export holds (checked against ecotaxa/ecotaxa_back,
py/API_operations/exports/ForProject.py): one TSV per project, or per sample,
acquisition or taxon when split (`ecotaxa_<name>.tsv`, at the root, or in a
folder of its own in a backup export), one row per object *image*: an object
with several images has several rows, told apart by `img_rank`. Text values
are quoted (csv.QUOTE_NONNUMERIC); the file is UTF-8 with a BOM, or Latin-1
when asked; the `[t]`/`[f]` type row is written only in a backup or when asked,
so it is optional here (a second row made only of `[t]`/`[f]` is the type
row, as pyecotaxa's read_tsv decides). Column names are read trimmed and in
lower case, as EcoTaxa's own import does (py/BO/TSVFile.py).

`img_file_name` is relative to the TSV's folder (EcoTaxa's import rule,
TSVFile.path_for_image; a general export writes `<sample>/<name>` beside a
root TSV, a backup writes the TSV into the sample's folder); a name not found
there is looked up from the export's root.
"""

from __future__ import annotations

import csv
import io
import posixpath
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import PlanktonioError

TYPE_MARKS = {"[t]", "[f]"}
STATUSES = ("validated", "predicted", "dubious")   # EcoTaxa's classif_qual labels (newer ones add "discarded")
REQUIRED = ("object_id", "img_file_name", "object_annotation_status", "object_annotation_category")
HIERARCHY = "object_annotation_hierarchy"
# Object-level metadata kept with every object (EcoTaxa's predefined object fields); every sample_* column too.
OBJECT_METADATA = ("object_lat", "object_lon", "object_date", "object_time", "object_depth_min",
                   "object_depth_max")


@dataclass
class EcoObject:
    """One EcoTaxa object: its annotation, its first image, and the metadata that travels with it."""

    object_id: str
    sample_id: str
    status: str            # validated / predicted / dubious / "" (not classified) / anything newer
    category: str          # EcoTaxa's display name
    hierarchy: str         # living>Eukaryota>...>category, or "" when the export has no such column
    image: str             # the first-rank image: a member name (zip) or a path (folder)
    rank: float
    images: int = 1
    metadata: dict[str, str] = field(default_factory=dict)
    types: dict[str, str] = field(default_factory=dict)   # metadata column -> "[t]"/"[f]" when the TSV says


@dataclass
class Export:
    """Every object of an export, in the order the TSVs first name them."""

    source: Path
    tsvs: list[str]
    objects: list[EcoObject]
    columns: set[str]
    missing_images: list[str]      # object ids whose first image is not in the export

    @property
    def is_zip(self) -> bool:
        return self.source.is_file()

    def read_image(self, obj: EcoObject) -> bytes:
        if self.is_zip:
            with zipfile.ZipFile(self.source) as archive:
                return archive.read(obj.image)
        return Path(obj.image).read_bytes()


def is_export(path: str | Path) -> bool:
    """A .zip, or a folder with a TSV (at its top or one folder down) whose header names object_id."""
    path = Path(path)
    if path.is_file():
        return path.suffix.lower() == ".zip"
    if not path.is_dir():
        return False
    return any(_header_has_object_id(tsv) for tsv in [*path.glob("*.tsv"), *path.glob("*/*.tsv")])


def _header_has_object_id(tsv: Path) -> bool:
    try:
        with open(tsv, "rb") as f:
            first = f.readline(1 << 20).decode("utf-8-sig", errors="replace").lower()
    except OSError:
        return False
    return "object_id" in [name.strip(' \t"\r\n') for name in first.split("\t")]


def read_export(source: str | Path) -> Export:
    """Read every TSV of an export; one EcoObject per object_id (its rows merged, the lowest img_rank's image)."""
    source = Path(source)
    if not source.exists():
        raise PlanktonioError(f"EcoTaxa export {source}: no such file or folder")
    if source.is_file():
        try:
            with zipfile.ZipFile(source) as archive:
                members = set(archive.namelist())
                tables = [(name, archive.read(name)) for name in sorted(members) if name.lower().endswith(".tsv")]
        except zipfile.BadZipFile:
            raise PlanktonioError(f"EcoTaxa export {source}: not a zip file (pass the .zip EcoTaxa wrote, or "
                                  f"its unpacked folder)") from None
        locate = _zip_locator(members)
    else:
        paths = sorted(p for p in source.rglob("*.tsv") if p.is_file())
        tables = [(p.relative_to(source).as_posix(), p.read_bytes()) for p in paths]
        locate = _folder_locator(source)
    objects: dict[str, EcoObject] = {}
    used, columns = [], set()
    for name, data in tables:
        header, rows, types = _parse_tsv(source, name, data)
        if "object_id" not in header:
            continue  # another table (a summary, a taxonomy): not objects
        missing = [c for c in REQUIRED if c not in header]
        if missing:
            raise PlanktonioError(f"EcoTaxa export {source}: {name} has no column {', '.join(missing)} (an "
                                  f"export of objects with their annotation has them; export again with them)")
        used.append(name)
        columns.update(header)
        for line, row in rows:
            _add_row(objects, dict(zip(header, row)), types, name, line, locate)
    if not used:
        raise PlanktonioError(f"EcoTaxa export {source}: no TSV with an object_id column (expected "
                              f"ecotaxa_*.tsv files as EcoTaxa exports them)")
    found = list(objects.values())
    missing = [o.object_id for o in found if o.image == ""]
    return Export(source, used, found, columns, missing)


def _parse_tsv(source: Path, name: str, data: bytes) -> tuple[list[str], list[tuple[int, list[str]]], dict]:
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        text = data.decode("latin-1")  # EcoTaxa's other export encoding
    lines = list(csv.reader(io.StringIO(text, newline=""), delimiter="\t", quotechar='"'))
    if not lines:
        raise PlanktonioError(f"EcoTaxa export {source}: {name} is empty")
    header = [h.strip(" \t").lower() for h in lines[0]]
    start, types = 1, {}
    if len(lines) > 1 and lines[1] and all(v.strip() in TYPE_MARKS for v in lines[1]):
        types = dict(zip(header, (v.strip() for v in lines[1])))
        start = 2
    rows = []
    for number, row in enumerate(lines[start:], start=start + 1):
        if not row or row == [""]:
            continue
        if len(row) != len(header):
            raise PlanktonioError(f"EcoTaxa export {source}: {name} line {number} has {len(row)} fields, the "
                                  f"header {len(header)} (a tab inside a value, or a cut file?)")
        rows.append((number, row))
    return header, rows, types


def _rank(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return float("inf")  # no rank: after every ranked image


def _add_row(objects: dict[str, EcoObject], row: dict[str, str], types: dict, name: str, line: int,
             locate) -> None:
    object_id = row["object_id"].strip()
    if not object_id:
        raise PlanktonioError(f"EcoTaxa export: {name} line {line} has an empty object_id")
    image = locate(name, row["img_file_name"].strip()) if row["img_file_name"].strip() else ""
    rank = _rank(row.get("img_rank", "").strip())
    known = objects.get(object_id)
    if known is not None:  # another image of the same object (or the object again in another TSV)
        known.images += 1
        if rank < known.rank and image:
            known.image, known.rank = image, rank
        return
    metadata = {k: v for k, v in row.items() if k.startswith("sample_") or k in OBJECT_METADATA or k == "acq_id"}
    objects[object_id] = EcoObject(
        object_id=object_id, sample_id=row.get("sample_id", "").strip(),
        status=row["object_annotation_status"].strip().lower(), category=row["object_annotation_category"].strip(),
        hierarchy=row.get(HIERARCHY, "").strip(), image=image, rank=rank, metadata=metadata,
        types={k: types[k] for k in metadata if k in types})


def _zip_locator(members: set[str]):
    def locate(tsv: str, image: str) -> str:
        for candidate in (posixpath.normpath(posixpath.join(posixpath.dirname(tsv), image)), image.lstrip("/")):
            if candidate in members:
                return candidate
        return ""
    return locate


def _folder_locator(root: Path):
    def locate(tsv: str, image: str) -> str:
        for candidate in (root / posixpath.dirname(tsv) / image, root / image):
            if candidate.is_file():
                return str(candidate.resolve())
        return ""
    return locate

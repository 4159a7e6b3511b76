"""Checks an EcoTaxa import zip against the format's rules, as far as they can be checked without the platform.

The rules and their sources (docs/ecotaxa.md): TSV names (Bundle.py FILTERS),
header and type row, column prefixes and the `<prefix>_id` a prefix needs
(TSVFile.validate_structure), object_id on every row, one row per
(object_id, img_file_name), annotation statuses, `[f]` values that are
numbers, and each image present beside its TSV (TSVFile.validate_content);
object ids unique across every TSV and zip of one import (planktonio's own
rule: an object predicted once).
"""

from __future__ import annotations

import csv
import fnmatch
import io
import posixpath
import zipfile
from pathlib import Path

from .export import TYPE_MARKS
from .importer import NUMBER

PREFIXES = ("object", "sample", "acq", "process", "img")
STATUSES = ("predicted", "validated", "dubious", "")
TSV_NAMES = ("ecotaxa*.tsv", "ecotaxa*.txt")
REQUIRED = ("img_file_name", "object_id")


def check_import(zips: list[Path], images: bool = True) -> list[str]:
    """Every problem found, one line each (empty: the import follows the rules). images=False: the TSVs name
    images the zips leave out (an update of objects already on the platform)."""
    problems, seen = [], {}
    for path in zips:
        with zipfile.ZipFile(path) as archive:
            members = set(archive.namelist())
            tables = [m for m in sorted(members) if any(fnmatch.fnmatch(posixpath.basename(m), p)
                                                        for p in TSV_NAMES)]
            if not tables:
                problems.append(f"{path.name}: no ecotaxa*.tsv (EcoTaxa imports only files named so)")
            for name in tables:
                where = f"{path.name}:{name}"
                problems += _check_tsv(where, archive.read(name), members if images else None,
                                       posixpath.dirname(name), seen)
    return problems


def _check_tsv(where: str, data: bytes, members: set[str] | None, folder: str, seen: dict) -> list[str]:
    if data.startswith(b"\xef\xbb\xbf"):
        return [f"{where}: starts with a BOM (it would become part of the first column's name)"]
    try:
        lines = list(csv.reader(io.StringIO(data.decode("utf-8"), newline=""), delimiter="\t"))
    except UnicodeDecodeError:
        return [f"{where}: not UTF-8"]
    if len(lines) < 2:
        return [f"{where}: needs a header and a type row"]
    header, types = lines[0], lines[1]
    problems = _check_header(where, header, types)
    if problems:
        return problems
    column = {name: i for i, name in enumerate(header)}
    pairs = set()
    for number, row in enumerate(lines[2:], start=3):
        if len(row) != len(header):
            problems.append(f"{where} line {number}: {len(row)} fields, the header has {len(header)}")
            continue
        object_id, image = row[column["object_id"]].strip(), row[column["img_file_name"]].strip()
        if not object_id:
            problems.append(f"{where} line {number}: empty object_id")
        if (object_id, image) in pairs:
            problems.append(f"{where} line {number}: object {object_id} image {image} twice")
        pairs.add((object_id, image))
        if object_id in seen and seen[object_id] != where:
            problems.append(f"{where} line {number}: object {object_id} also in {seen[object_id]}")
        seen.setdefault(object_id, where)
        if members is not None and posixpath.normpath(posixpath.join(folder, image)) not in members:
            problems.append(f"{where} line {number}: image {image} is not in the zip")
        problems += _check_values(where, number, header, types, row)
    return problems


def _check_header(where: str, header: list[str], types: list[str]) -> list[str]:
    problems = []
    if len(types) != len(header) or not all(t in TYPE_MARKS for t in types):
        problems.append(f"{where}: the second row must type every column, [t] or [f]")
    if len(set(header)) != len(header):
        problems.append(f"{where}: a column name appears twice")
    for name in header:
        if name != name.strip().lower():
            problems.append(f"{where}: column {name!r} is not trimmed lower case")
        prefix = name.split("_", 1)[0] if "_" in name else None
        if prefix not in PREFIXES:
            problems.append(f"{where}: column {name!r} is not <prefix>_<name> with a prefix of "
                            f"{', '.join(PREFIXES)}")
    for prefix in ("sample", "acq", "process"):
        if any(h.startswith(prefix + "_") for h in header) and f"{prefix}_id" not in header:
            problems.append(f"{where}: {prefix}_ columns need {prefix}_id")
    problems += [f"{where}: no {c} column" for c in REQUIRED if c not in header]
    return problems


def _check_values(where: str, number: int, header: list[str], types: list[str], row: list[str]) -> list[str]:
    problems = []
    for name, kind, value in zip(header, types, row):
        if kind == "[f]" and value.strip() and not NUMBER.match(value):
            problems.append(f"{where} line {number}: {name} is typed [f] but holds {value!r}")
    values = dict(zip(header, row))
    status = values.get("object_annotation_status", "").strip()
    if status.lower() not in STATUSES:
        problems.append(f"{where} line {number}: object_annotation_status {status!r} is not one of "
                        f"{', '.join(s for s in STATUSES if s)}")
    if status and not values.get("object_annotation_category", "").strip():
        problems.append(f"{where} line {number}: status {status!r} without a category")
    return problems


def tsv_rows(zips: list[Path]) -> list[dict[str, str]]:
    """Every data row of every TSV of the zips, as dicts (for tests and people): the type row left out."""
    rows = []
    for path in zips:
        with zipfile.ZipFile(path) as archive:
            for name in sorted(archive.namelist()):
                if name.endswith(".tsv"):
                    lines = list(csv.reader(io.StringIO(archive.read(name).decode("utf-8"), newline=""),
                                            delimiter="\t"))
                    rows += [{**dict(zip(lines[0], row)), "_tsv": name} for row in lines[2:]]
    return rows

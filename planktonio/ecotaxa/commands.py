"""The two commands' EcoTaxa paths, thin over prepare and predict.

    python -m planktonio prepare --source EXPORT --out OUT [--ecotaxa-level L] [--ecotaxa-status S]
        [--group-by sample_id] ...
    python -m train predict --run RUN --images SRC --out OUT --format ecotaxa [--ecotaxa-categories FILE]
        [--ecotaxa-zip-size 500MB] [--ecotaxa-include-validated] [--ecotaxa-no-images] ...
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import PlanktonioError
from ..files import write_atomic
from .export import read_export
from .select import Level, parse_statuses, select
from .view import (
    CATEGORIES,
    FOLDER,
    RECORD,
    grouped_assigner,
    materialise,
    read_objects,
)

GROUP_KEYS = ("sample_id",)


def prepare_export(source: Path, out: Path, *, level: str | None = None, statuses: str | None = None,
                   group_by: str | None = None, plan=None, **prepare_options):
    """prepare from an EcoTaxa export: its chosen objects as class folders under OUT/ecotaxa/images, then
    every rule of prepare; with group_by, whole samples per split. Returns (prepare's result, the selection)."""
    from .. import preparation
    if group_by is not None and group_by not in GROUP_KEYS:
        raise PlanktonioError(f"--group-by {group_by}: expected one of {', '.join(GROUP_KEYS)}")
    plan = plan or preparation.SplitPlan()
    if group_by is not None and plan.per_class is not None:
        raise PlanktonioError("--group-by keeps whole samples together, so it splits by --fractions, not "
                              "--per-class counts")
    chosen_level, chosen_statuses = Level.parse(level), parse_statuses(statuses)
    export = read_export(source)
    selection = select(export, chosen_level, chosen_statuses)
    if not selection.kept:
        raise PlanktonioError(f"EcoTaxa export {source}: no object kept ({selection.summary()}); "
                              f"--ecotaxa-status chooses which statuses train")
    images = materialise(export, selection, out, chosen_level, chosen_statuses)
    assign = None
    if group_by is not None:
        assign, split_of = grouped_assigner(read_objects(out), plan.fractions, prepare_options.get("seed", 0),
                                            group_by)
        record_path = Path(out) / FOLDER / RECORD
        record = json.loads(record_path.read_text(encoding="utf-8"))
        record.update(group_by=group_by, splits_of_groups=split_of)
        write_atomic(record_path, json.dumps(record, indent=2, ensure_ascii=False) + "\n")
    result = preparation.prepare(images, out, plan=plan, splitter=assign, **prepare_options)
    return result, selection


def _data_of_run(run: Path) -> Path | None:
    try:
        return Path(json.loads((Path(run) / "run.json").read_text())["data"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def categories_of_run(run: Path) -> dict[str, str]:
    """The class-to-category mapping of the data a run was trained on, when it was prepared from an export."""
    data = _data_of_run(run)
    path = data / FOLDER / CATEGORIES if data is not None else None
    return json.loads(path.read_text(encoding="utf-8")) if path is not None and path.is_file() else {}


def _check_mapping(categories: dict[str, str], run: Path, what: Path) -> None:
    """Before any image is predicted: every class the mapping names is a class of the run (when its data says)."""
    data = _data_of_run(run)
    try:
        classes = json.loads((data / "classes.json").read_text())["classes"] if data is not None else None
    except (OSError, ValueError, KeyError):
        classes = None
    unknown = sorted(set(categories) - set(classes)) if classes is not None else []
    if unknown:
        raise PlanktonioError(f"--ecotaxa-categories {what}: {', '.join(unknown)} is not a class of the run "
                              f"(its classes: {', '.join(classes)})")


def predict_ecotaxa(run_predict, *, run: Path, images: Path, out: Path, categories_file: Path | None = None,
                    top_k: int = 3, zip_bytes: int | None = None, include_validated: bool = False,
                    with_images: bool = True) -> int:
    """predict --format ecotaxa: predict's own tables (run_predict(images) -> exit code), then the import zip(s)
    in OUT, checked against the format's rules. An export as input: only its objects that are not validated
    (unless include_validated: then those too, in a TSV that leaves their annotation alone)."""
    from .check import check_import
    from .export import is_export
    from .importer import DEFAULT_ZIP_BYTES
    from .predictions import import_predictions, read_categories, stage_export
    categories = read_categories(categories_file) if categories_file else categories_of_run(run)
    if categories_file:
        _check_mapping(categories, run, categories_file)
    source, root = Path(images), Path(images)
    if is_export(source):
        listing, counts = stage_export(source, out, include_validated)
        print("EcoTaxa export: " + ", ".join(f"{n} {what}" for what, n in sorted(counts.items())), flush=True)
        if not listing.read_text().strip():
            print("EcoTaxa export: no object to predict (every one is validated; --ecotaxa-include-validated "
                  "predicts those too, without touching their annotation)")
            return 0
        source, root = listing, None
    code = run_predict(source)
    if code != 0:
        return code
    if not (Path(out) / "samples.csv").is_file():  # predict merges once every unit (of every --shard) is done
        print("EcoTaxa import: written by the task that finishes the last unit")
        return 0
    zips = import_predictions(out, out, images_root=root if root is not None and root.is_dir() else None,
                              categories=categories, top_k=top_k, zip_bytes=zip_bytes or DEFAULT_ZIP_BYTES,
                              images=with_images)
    problems = check_import(zips, images=with_images)
    if problems:  # a bug of ours, not the user's input: say so loudly
        raise RuntimeError("the EcoTaxa import breaks the format's rules:\n" + "\n".join(problems[:20]))
    print(f"EcoTaxa import: {', '.join(str(z) for z in zips)} (import into the project, or update it)")
    return 0

"""`python -m train predict`: which units this task does, the predictor over them, the merge at the end."""

from __future__ import annotations

import json
from pathlib import Path

from planktonio.errors import PlanktonioError
from planktonio.unlabelled import Catalog, Unit

from ..signals import EXIT_OK
from .folder import PredictionsFolder
from .merge import merge
from .options import UNITS, PredictOptions
from .predictor import Predictor
from .settings import owner_record, settings_key


def predict(options: PredictOptions) -> int:
    o = options
    predictor = Predictor(o)
    catalog = predictor.catalog
    with PredictionsFolder(o.out, owner_record(predictor.provenance), o.overwrite):
        mine = [u for number, u in enumerate(catalog.units) if number % o.shard[1] == o.shard[0]]
        todo = [u for u in mine if o.overwrite or not _done(o.out, u, catalog, predictor.provenance)]
        print(f"predict: {len(catalog)} images in {len(catalog.units)} units under {o.images}; this task's "
              f"{len(mine)} units, {len(todo)} to do", flush=True)
        code = EXIT_OK
        if todo:
            with predictor:
                code = predictor.classify(todo)
        if code == EXIT_OK and all((Path(o.out) / UNITS / f"{u.name}.json").is_file() for u in catalog.units):
            merge(catalog, Path(o.out), predictor.classes, predictor.provenance)
            print(f"predict: all {len(catalog.units)} units done: {Path(o.out) / 'samples.csv'}, "
                  f"{Path(o.out) / 'rejected.csv'}")
    return code


def _done(out: Path, unit: Unit, catalog: Catalog, provenance: dict) -> bool:
    """Whether the unit was written already, for the same images and settings; another checkpoint's or
    settings' result in the same OUT is a one-line error (mixing them would make one table of two runs)."""
    record = Path(out) / UNITS / f"{unit.name}.json"
    if not record.is_file():
        return False
    try:
        done = json.loads(record.read_text())
    except ValueError:
        return False  # cut short: done again
    if done.get("settings") != settings_key(provenance):
        raise PlanktonioError(f"{out}: its unit {unit.name} was predicted with other settings or another "
                              f"checkpoint; choose another --out, or --overwrite to redo every unit")
    return done.get("digest") == catalog.digest(unit)

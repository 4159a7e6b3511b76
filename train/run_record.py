"""run.json: which data a run was trained on, so that resume and evaluate never mix data sets.

The record holds the prepared folder's path and a fingerprint of what it
says (class names and the three manifests, PreparedDataset.fingerprint).
Rerunning `prepare` into the same folder with other images or another split
changes the fingerprint: a resumed run would train on other data, and
`evaluate` could score test images the run trained on. Both refuse, saying
what differs; `evaluate --other-data` scores a run on another prepared set
on purpose.
"""

from __future__ import annotations

import json
from pathlib import Path

from planktonio import PreparedDataset
from planktonio.errors import PlanktonioError
from planktonio.files import write_atomic

RUN_RECORD = "run.json"


def write(out: Path, data: Path) -> None:
    record = {"data": str(Path(data).resolve()), "data_fingerprint": PreparedDataset.load(data).fingerprint()}
    write_atomic(out / RUN_RECORD, json.dumps(record, indent=2) + "\n")


def read(run: Path) -> dict:
    path = Path(run) / RUN_RECORD
    try:
        record = json.loads(path.read_text())
        Path(record["data"])
        return record
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as error:
        raise PlanktonioError(f"{path}: cannot be read ({error}); is {run} a run folder of `python -m train fit`? "
                              f"Pass --data to name its data") from None


def check_same_data(run: Path, data: Path, action: str) -> None:
    """Refuse `data` if its fingerprint differs from the one the run recorded (older runs: no check)."""
    if not (Path(run) / RUN_RECORD).exists():
        return  # a run from before run records: nothing to compare with
    recorded = read(run).get("data_fingerprint")
    current = PreparedDataset.load(data).fingerprint()
    if recorded is not None and recorded != current:
        raise PlanktonioError(
            f"{action}: {data} is not the data {run} was trained on (its class names or manifests differ: "
            f"fingerprint {current[:12]}, the run's {recorded[:12]}; was prepare rerun into it?); use the run's "
            f"own prepared data, or start a new run with another --out")

"""A unit's table and its files: Parquet or CSV, each carrying its provenance; read back for people and tests."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from planktonio.files import atomic_file
from planktonio.unlabelled import Catalog

from .. import calibration
from .options import UNITS


def table_of(catalog: Catalog, predicted: list[int], probabilities: np.ndarray, classes: list[str],
             thresholds: list[float] | None, top_k: int, float16: bool) -> dict:
    """The columns of a unit's predictions: path, sample, top-k, label, p_<class>."""
    k = min(top_k, len(classes))
    order = np.argsort(-probabilities, axis=1, kind="stable")[:, :k] if len(predicted) else \
        np.zeros((0, k), dtype=np.int64)
    columns = {"path": [catalog.paths[p] for p in predicted], "sample": [catalog.samples[p] for p in predicted]}
    for rank in range(k):
        columns[f"top{rank + 1}"] = [classes[c] for c in order[:, rank]]
        columns[f"top{rank + 1}_prob"] = probabilities[np.arange(len(predicted)), order[:, rank]].astype(np.float32)
    top1 = order[:, 0] if k else np.zeros(0, dtype=np.int64)
    if thresholds is None:
        columns["label"] = [classes[c] for c in top1]
    else:
        limits = np.asarray(thresholds)[top1]
        confident = probabilities[np.arange(len(predicted)), top1] >= limits
        columns["label"] = [classes[c] if ok else calibration.UNCLASSIFIED for c, ok in zip(top1, confident)]
    dtype = np.float16 if float16 else np.float32
    for c, name in enumerate(classes):
        columns[f"p_{name}"] = probabilities[:, c].astype(dtype)
    return columns


def write_parquet(path: Path, table: dict, provenance: dict) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq
    arrays = {name: pa.array(values) for name, values in table.items()}
    schema = pa.schema([pa.field(name, array.type) for name, array in arrays.items()],
                       metadata={"planktonio": json.dumps(provenance)})
    with atomic_file(path, "wb") as f:
        pq.write_table(pa.Table.from_pydict(arrays, schema=schema), f)


def write_csv(path: Path, table: dict, provenance: dict) -> None:
    with atomic_file(path, "w") as f:
        f.write(f"# {json.dumps(provenance)}\n")
        writer = csv.writer(f)
        writer.writerow(list(table))
        for row in zip(*table.values()):
            writer.writerow([repr(float(v)) if isinstance(v, (np.floating, float)) else v for v in row])


def read_predictions(out: Path) -> pandas.DataFrame:  # noqa: F821 (pandas is imported here only)
    """Every unit's predictions of OUT as one table, in catalog order (for people and tests)."""
    import pandas as pd
    frames = []
    for path in sorted((Path(out) / UNITS).glob("*.parquet")) or sorted((Path(out) / UNITS).glob("*.csv")):
        frames.append(pd.read_parquet(path) if path.suffix == ".parquet" else _read_csv(path))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def provenance_of(path: Path) -> dict:
    """The provenance a unit's file carries."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq
        return json.loads(pq.read_schema(path).metadata[b"planktonio"])
    with open(path) as f:
        return json.loads(f.readline().removeprefix("# "))


def _read_csv(path: Path):
    """A unit's CSV: its first line is the provenance; every other cell as written (a `#` in a file name is
    no comment, and a file named NA is no missing value)."""
    import pandas as pd
    table = pd.read_csv(path, skiprows=1, na_filter=False, dtype=str)
    for column in table.columns:
        if column.startswith("p_") or column.endswith("_prob"):
            table[column] = table[column].astype(float)
    return table

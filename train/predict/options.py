"""What `train predict` is asked to do: its options, as the command line gives them."""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path

from planktonio.errors import PlanktonioError

UNITS = "units"
FORMATS = ("parquet", "csv")


@dataclass
class PredictOptions:
    run: Path
    images: Path
    out: Path
    checkpoint: str = "best"
    calibrated: bool = False
    backend: str | None = None
    batch_size: int | None = None
    device: str | None = None
    precision: str | None = None
    workers: int | None = None
    format: str = "parquet"
    top_k: int = 3
    float16: bool = False
    embeddings: bool = False
    shard: tuple[int, int] = (0, 1)
    overwrite: bool = False
    command: list[str] = field(default_factory=lambda: list(sys.argv))


def parse_shard(text: str) -> tuple[int, int]:
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise PlanktonioError(f"--shard {text}: expected I/N, e.g. 0/4") from None
    if not (count >= 1 and 0 <= index < count):
        raise PlanktonioError(f"--shard {text}: I must be in [0, N)")
    return index, count


def predict_options(args: argparse.Namespace, command: list[str]) -> PredictOptions:
    """The options from `train predict`'s parsed command line: each field from the argument of its name."""
    given = {f.name: getattr(args, f.name) for f in fields(PredictOptions) if hasattr(args, f.name)}
    return PredictOptions(**{**given, "shard": parse_shard(args.shard), "command": command})

"""Command line: `python -m profiling loaders ...` (run from the repository root)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from planktonio.errors import PlanktonioError

from .environment import describe_environment


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m profiling", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    loaders = commands.add_parser("loaders", help="images/s and latency of each loader backend")
    loaders.add_argument("--data", required=True, help="a folder written by `python -m planktonio prepare`")
    loaders.add_argument("--split", default="train")
    loaders.add_argument("--backends", default="dali-cpu,torchvision",
                         help="comma-separated: dali-gpu, dali-cpu, torchvision, memory (upper bound)")
    loaders.add_argument("--batch-size", type=int, default=64)
    loaders.add_argument("--batches", type=int, default=20, help="timed batches per repeat")
    loaders.add_argument("--warmup", type=int, default=5, help="untimed batches first")
    loaders.add_argument("--repeats", type=int, default=3)
    loaders.add_argument("--workers", type=int, default=None, help="threads/processes (default: all cores)")
    loaders.add_argument("--device", default="auto")
    loaders.add_argument("--dtype", default="float32", choices=["float32", "float16"])
    loaders.add_argument("--layout", default="NCHW", choices=["NCHW", "NHWC"])
    loaders.add_argument("--eval-transform", action="store_true",
                         help="time the resize/centre-crop transform instead of the training augmentation")
    loaders.add_argument("--json", type=Path, help="write the result here")
    return parser


def run(args: argparse.Namespace) -> None:
    if args.command == "loaders":
        from .loaders import LoaderBenchmark, format_table, run as run_loaders
        bench = LoaderBenchmark(
            data=args.data, split=args.split, backends=tuple(args.backends.split(",")),
            batch_size=args.batch_size, batches=args.batches, warmup=args.warmup, repeats=args.repeats,
            workers=args.workers, device=args.device, dtype=args.dtype, layout=args.layout,
            augment=not args.eval_transform)
        result = {"environment": describe_environment(), **run_loaders(bench)}
        env = result["environment"]
        print(f"{env['device']}, {env['cpu_count']} cores, {result['config']['workers']} workers, "
              f"batch {bench.batch_size}, {bench.repeats} x {bench.batches} batches, split {bench.split}")
        print(format_table(result))
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(result, indent=2) + "\n")
            print(f"wrote {args.json}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except PlanktonioError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Command line: `python -m planktonio {synth,prepare,square} ...`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .errors import PlanktonioError


def _int_triple(text: str) -> tuple[int, int, int]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 3 or min(values) < 0:
        raise argparse.ArgumentTypeError(f"expected TRAIN,VALID,TEST as three integers >= 0, got {text!r}")
    return values


def _fraction_triple(text: str) -> tuple[float, float, float]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 3 or min(values) < 0 or abs(sum(values) - 1) > 1e-6:
        raise argparse.ArgumentTypeError(f"expected TRAIN,VALID,TEST fractions summing to 1, got {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m planktonio", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    synth = commands.add_parser("synth", help="write the synthetic zooplankton-like data set")
    synth.add_argument("--out", type=Path, required=True)
    synth.add_argument("--classes", default="6",
                       help="how many classes (1-8, default 6), or a comma-separated list of names")
    synth.add_argument("--per-class", type=int, default=120, help="images per class (default 120)")
    synth.add_argument("--size", type=int, default=255, help="image side in pixels (default 255)")
    synth.add_argument("--seed", type=int, default=0)

    prep = commands.add_parser("prepare", help="validate images, split, write manifests")
    prep.add_argument("--source", type=Path, required=True, help="folder with one sub-folder per class")
    prep.add_argument("--out", type=Path, required=True)
    prep.add_argument("--min-images", type=int, default=1,
                      help="keep classes with at least this many usable images (the study: 1000)")
    split = prep.add_mutually_exclusive_group()
    split.add_argument("--per-class", type=_int_triple, metavar="TRAIN,VALID,TEST",
                       help="images per class in each split (the study: 500,100,100)")
    split.add_argument("--fractions", type=_fraction_triple, metavar="TRAIN,VALID,TEST",
                       help="share of each class's images per split (default 0.8,0.1,0.1)")
    prep.add_argument("--seed", type=int, default=0)
    prep.add_argument("--workers", type=int, default=None, help="decode-check processes (default: all cores)")

    square = commands.add_parser("square", help="pad every image to a square and resize (e.g. 255 x 255)")
    square.add_argument("--source", type=Path, required=True)
    square.add_argument("--out", type=Path, required=True)
    square.add_argument("--size", type=int, default=255)
    square.add_argument("--workers", type=int, default=None)
    return parser


def run(args: argparse.Namespace) -> None:
    if args.command == "synth":
        from .synth import synthesize
        paths = synthesize(args.out, classes=args.classes, per_class=args.per_class,
                           size=args.size, seed=args.seed)
        print(f"wrote {len(paths)} images ({len(paths) // args.per_class} classes x {args.per_class}, "
              f"{args.size} x {args.size} px) to {args.out}")
    elif args.command == "prepare":
        from .dataset import DEFAULT_FRACTIONS, SplitPlan, prepare
        plan = SplitPlan(per_class=args.per_class, fractions=args.fractions or DEFAULT_FRACTIONS)
        result = prepare(args.source, args.out, min_images=args.min_images, plan=plan,
                         seed=args.seed, workers=args.workers)
        print(result.summary())
        print(f"manifests in {args.out}")
    elif args.command == "square":
        from .square import square_tree
        written, failures = square_tree(args.source, args.out, args.size, workers=args.workers)
        for failure in failures:
            print(f"skipped {failure}", file=sys.stderr)
        print(f"wrote {written} images of {args.size} x {args.size} px to {args.out}")


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

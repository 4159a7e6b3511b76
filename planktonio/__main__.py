"""Command line: `python -m planktonio {synth,prepare,square,pack,doctor} ...`."""

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
    # not (0 <= v): also refuses nan, which compares false with everything
    if len(values) != 3 or not all(0 <= v <= 1 for v in values) or abs(sum(values) - 1) > 1e-6:
        raise argparse.ArgumentTypeError(f"expected TRAIN,VALID,TEST fractions in [0, 1] summing to 1, got {text!r}")
    return values


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m planktonio", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    synth = commands.add_parser("synth", help="write the synthetic zooplankton-like data set")
    synth.add_argument("--out", type=Path, required=True)
    synth.add_argument("--classes", default="6",
                       help="how many classes (1-8, default 6), or a comma-separated list of names")
    synth.add_argument("--per-class", type=_positive_int, default=120, help="images per class (default 120)")
    synth.add_argument("--size", type=int, default=255, help="image side in pixels (default 255)")
    synth.add_argument("--seed", type=int, default=0)

    prep = commands.add_parser("prepare", help="validate images, split, write manifests")
    prep.add_argument("--source", type=Path, required=True,
                      help="folder with one sub-folder per class, or an EcoTaxa export (.zip or its folder)")
    prep.add_argument("--out", type=Path, required=True)
    prep.add_argument("--min-images", type=_positive_int, default=1,
                      help="keep classes with at least this many usable images (the study: 1000)")
    split = prep.add_mutually_exclusive_group()
    split.add_argument("--per-class", type=_int_triple, metavar="TRAIN,VALID,TEST",
                       help="images per class in each split (the study: 500,100,100)")
    split.add_argument("--fractions", type=_fraction_triple, metavar="TRAIN,VALID,TEST",
                       help="share of each class's images per split (default 0.8,0.1,0.1)")
    prep.add_argument("--seed", type=int, default=0)
    prep.add_argument("--workers", type=_positive_int, default=None, help="decode-check processes (default: all cores)")
    prep.add_argument("--exclude-classes-of", type=Path, metavar="PREPARED",
                      help="leave out the classes of another prepared set (e.g. pretrain on the others)")
    eco = prep.add_argument_group("EcoTaxa export (docs/ecotaxa.md)")
    eco.add_argument("--ecotaxa-level", metavar="LEVEL",
                     help="classes from: category (default), a depth of object_annotation_hierarchy (1 = living), "
                          "or names of it, e.g. Copepoda (every copepod genus becomes Copepoda)")
    eco.add_argument("--ecotaxa-status", metavar="S,S",
                     help="statuses that train (default: validated; also predicted, dubious)")
    eco.add_argument("--group-by", choices=["sample_id"],
                     help="whole samples per split (new images come from new samples); with --fractions")

    square = commands.add_parser("square", help="pad every image to a square and resize (e.g. 255 x 255)")
    square.add_argument("--source", type=Path, required=True)
    square.add_argument("--out", type=Path, required=True)
    square.add_argument("--size", type=_positive_int, default=255)
    square.add_argument("--workers", type=_positive_int, default=None)

    pack = commands.add_parser("pack", help="pack each split of a prepared folder into tar shards plus an index "
                                            "(webdataset layout; restartable; loose files untouched)")
    pack.add_argument("--data", type=Path, required=True, help="a folder written by prepare")
    pack.add_argument("--shard-size", default="256MB", help="bytes per shard, e.g. 256MB (default), 1GB")

    doctor = commands.add_parser(
        "doctor", help="what this machine can run: versions, CUDA builds, GPUs, CPUs, NCCL; exit 1 if it cannot work")
    doctor.add_argument("--json", type=Path, default=None, metavar="FILE", help="also write the report as JSON")
    doctor.add_argument("--require-gpu", action="store_true", help="fail when no GPU is visible")
    return parser


def run(args: argparse.Namespace) -> int | None:
    if args.command == "doctor":
        from .doctor import run_doctor
        return run_doctor(args.json, require_gpu=args.require_gpu)
    if args.command == "synth":
        from .synth import synthesize
        paths = synthesize(args.out, classes=args.classes, per_class=args.per_class,
                           size=args.size, seed=args.seed)
        print(f"wrote {len(paths)} images ({len(paths) // args.per_class} classes x {args.per_class}, "
              f"{args.size} x {args.size} px) to {args.out}")
    elif args.command == "prepare":
        from .dataset import PreparedDataset
        from .preparation import DEFAULT_FRACTIONS, SplitPlan, prepare
        plan = SplitPlan(per_class=args.per_class, fractions=args.fractions or DEFAULT_FRACTIONS)
        exclude = PreparedDataset.load(args.exclude_classes_of).classes if args.exclude_classes_of else ()
        options = {"min_images": args.min_images, "seed": args.seed, "workers": args.workers, "exclude": exclude}
        from .ecotaxa.export import is_export
        if is_export(args.source):
            from .ecotaxa.commands import prepare_export
            result, selection = prepare_export(args.source, args.out, level=args.ecotaxa_level,
                                               statuses=args.ecotaxa_status, group_by=args.group_by, plan=plan,
                                               **options)
            print(selection.summary())
        elif args.ecotaxa_level or args.ecotaxa_status or args.group_by:
            raise PlanktonioError(f"--source {args.source}: --ecotaxa-level, --ecotaxa-status and --group-by "
                                  f"need an EcoTaxa export (a .zip, or a folder with its ecotaxa_*.tsv)")
        else:
            result = prepare(args.source, args.out, plan=plan, **options)
        print(result.summary())
        print(f"manifests in {args.out}")
    elif args.command == "pack":
        from .declared import parse_size
        from .shards import SHARDS_DIR, pack
        shard_size = parse_size(args.shard_size, "--shard-size")
        if shard_size <= 0:
            raise PlanktonioError(f"--shard-size {args.shard_size}: must be more than 0 bytes")
        for r in pack(args.data, shard_size):
            print(f"{r.split}: {r.images} images in {r.shards} shard(s), {r.bytes / 2**20:.1f} MiB"
                  + (f" ({r.reused} kept from an interrupted pack)" if r.reused else ""))
        print(f"shards and index in {args.data / SHARDS_DIR}; every loader now reads them")
    elif args.command == "square":
        from .square import square_tree
        written, failures = square_tree(args.source, args.out, args.size, workers=args.workers)
        for failure in failures:
            print(f"skipped {failure}", file=sys.stderr)
        print(f"wrote {written} images of {args.size} x {args.size} px to {args.out}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        status = run(args)
    except PlanktonioError as error:  # one line; exit 2, or 74 for a disk that cannot take a file
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    return status or 0


if __name__ == "__main__":
    sys.exit(main())

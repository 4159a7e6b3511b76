"""Command line: `python -m train fit ...` and `python -m train evaluate ...`.

Exit codes (train/signals.py): 0 done; 2 bad input (config, data, weights,
a run folder another process is writing); 3 the loss or the weights became
NaN/inf (no checkpoint holds them); 75 stopped by SIGTERM, SIGUSR1, SIGINT or
SIGHUP, last.pt written (continue with --resume); 76 another rank left or
hung (restart from last.pt; the Slurm job scripts do); 130 a second Ctrl-C.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from planktonio.errors import PlanktonioError

from .signals import EXIT_ABORTED


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    fit = commands.add_parser("fit", help="train a model on a prepared data set")
    fit.add_argument("--config", type=Path, help="YAML file, e.g. train/configs/study.yaml")
    fit.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config key, e.g. --set training.epochs=5 (repeatable)")
    fit.add_argument("--data", type=Path, required=True, help="a folder written by `python -m planktonio prepare`")
    fit.add_argument("--out", type=Path, required=True, help="the run folder (checkpoints, metrics)")
    fit.add_argument("--resume", action="store_true",
                     help="continue from OUT/last.pt if it exists (else start); with --set "
                          "training.epochs=N (or training.patience) a finished run continues too")

    ev = commands.add_parser("evaluate", help="score a run's checkpoint on a split")
    ev.add_argument("--run", type=Path, required=True)
    ev.add_argument("--split", default="test", choices=["train", "valid", "test"])
    ev.add_argument("--checkpoint", default="best", choices=["best", "last"])
    ev.add_argument("--data", type=Path, help="default: the data the run was trained on")
    ev.add_argument("--backend", help="loader backend (default: the run's)")
    ev.add_argument("--other-data", action="store_true",
                    help="score the run on --data although it is not the data the run was trained on")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "fit":
            from . import config as config_module
            from .loop import fit
            if args.config is None and args.resume and not (args.out / "config.yaml").is_file():
                raise PlanktonioError(f"--resume: {args.out} holds no run (no config.yaml) and no --config was "
                                      f"given; check --out, or pass --config to start a run there")
            if args.resume and (args.out / "config.yaml").exists() and args.config is None:
                config = config_module.load(args.out / "config.yaml", args.overrides)
            else:
                config = config_module.load(args.config, args.overrides)
            return fit(config, args.data, args.out, resume=args.resume)
        from .evaluate import evaluate_run
        result = evaluate_run(args.run, args.split, args.data, args.checkpoint, args.backend, args.other_data)
        print(f"{args.split}: accuracy {result['acc']:.4f}, top-5 {result['top5']:.4f}, "
              f"loss {result['loss']:.4f} over {result['images']} images")
        width = max(len(name) for name in result["per_class"])
        print(f"{'class':<{width}}  precision  recall     f1  support")
        for name, s in result["per_class"].items():
            print(f"{name:<{width}}  {s['precision']:9.3f}  {s['recall']:6.3f}  {s['f1']:5.3f}  {s['support']:7d}")
        print(f"wrote {args.run}/eval-{args.split}.json, confusion-{args.split}.csv and .png")
        return 0
    except PlanktonioError as error:  # DiskError included: 74, the others 2
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:  # Ctrl-C before the run's own handler is in place (start-up, the feature cache's pass)
        print("\ninterrupted before training started: nothing to save (a feature cache file is written only "
              "once complete)", file=sys.stderr)
        return EXIT_ABORTED


if __name__ == "__main__":
    sys.exit(main())

"""Command line: `python -m train fit | evaluate | calibrate | predict ...` (exit codes: train/signals.py,
and `--help`). Run from the checkout (train is not installed). docs/training.md."""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

from planktonio.cli import add_arguments, settings_from
from planktonio.declared import setting
from planktonio.errors import PlanktonioError

from .signals import EXIT_ABORTED, EXIT_CODES


@dataclass
class EvaluateOptions:
    run: Path = setting(help="a run folder of `python -m train fit`")
    split: str = setting("test", choices=("train", "valid", "test"))
    checkpoint: str = setting("best", choices=("best", "last"))
    data: Path | None = setting(None, help="default: the data the run was trained on")
    backend: str | None = setting(None, help="loader backend (default: the run's)")
    other_data: bool = setting(False, help="score the run on --data although it is not the data the run was "
                                           "trained on")


@dataclass
class CalibrateOptions:
    run: Path = setting(help="a run folder of `python -m train fit`")
    checkpoint: str = setting("best", choices=("best", "last"),
                              help="the weights to calibrate: best.pt (RUN/calibration.json) or last.pt "
                                   "(RUN/calibration-last.json)")
    target: float = setting(0.9, help="the validation precision each class's threshold must reach")
    backend: str | None = setting(None, help="loader backend (default: the run's)")


def build_parser() -> argparse.ArgumentParser:
    codes = "\n".join(f"  {code:>3}  {meaning}" for code, meaning in EXIT_CODES.items())
    parser = argparse.ArgumentParser(prog="python -m train", description=__doc__,
                                     epilog=f"exit codes:\n{codes}",
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

    add_arguments(commands.add_parser("evaluate", help="score a run's checkpoint on a split"), EvaluateOptions)
    add_arguments(commands.add_parser("calibrate", help="fit a temperature and per-class thresholds on the "
                                                        "validation split"), CalibrateOptions)

    pr = commands.add_parser("predict", help="classify new images (a folder, a list of paths, tar shards)")
    pr.add_argument("--run", type=Path, required=True, help="a run folder of `python -m train fit`")
    pr.add_argument("--images", type=Path, required=True,
                    help="a folder of images (each folder holding images is a sample), a file listing image "
                         "paths, or a folder of tar shards")
    pr.add_argument("--out", type=Path, required=True, help="where the predictions go (units/, samples.csv)")
    pr.add_argument("--checkpoint", default="best", choices=["best", "last"])
    pr.add_argument("--calibrated", action="store_true",
                    help="use the checkpoint's calibration (RUN/calibration.json; calibration-last.json with "
                         "--checkpoint last): its temperature, and its thresholds for the label column")
    pr.add_argument("--backend", help="loader backend (default: the run's)")
    pr.add_argument("--batch-size", type=int, help="default: the run's evaluation batch size")
    pr.add_argument("--device", help="auto | cpu | cuda | cuda:N (default: the run's)")
    pr.add_argument("--precision", help="fp32 | amp-fp16 | amp-bf16 | amp (default: the run's)")
    pr.add_argument("--workers", type=int, help="DataLoader processes / DALI threads (default: the run's)")
    pr.add_argument("--format", default="parquet", choices=["parquet", "csv", "ecotaxa"],
                    help="ecotaxa: also the EcoTaxa import zip(s) in OUT (docs/ecotaxa.md); --images may be an "
                         "EcoTaxa export: its objects that are not validated are predicted")
    pr.add_argument("--top-k", type=int, default=3)
    pr.add_argument("--float16", action="store_true", help="the probability columns in float16")
    pr.add_argument("--embeddings", action="store_true", help="also the head's input, float16, per unit (.npy)")
    pr.add_argument("--shard", default="0/1", help="I/N: this task's share of the units (a job array's index)")
    pr.add_argument("--overwrite", action="store_true", help="predict the units already done again")
    _ecotaxa_options(pr.add_argument_group("--format ecotaxa (docs/ecotaxa.md)"))
    return parser


def _fit(args: argparse.Namespace, argv: list[str] | None) -> int:
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


def _calibrate(args: argparse.Namespace, argv: list[str] | None) -> int:
    from .evaluate import calibrate_run
    o = settings_from(CalibrateOptions, args)
    fitted = calibrate_run(o.run, o.checkpoint, o.target, o.backend)
    v = fitted["validation"]
    print(f"calibrated {o.run} on {fitted['fitted_on']['images']} validation images: temperature "
          f"{fitted['temperature']:.3f}, NLL {v['nll_before']:.4f} -> {v['nll_after']:.4f}, ECE "
          f"{v['ece_before']:.4f} -> {v['ece_after']:.4f}; at precision {fitted['target_precision']}: "
          f"coverage {v['coverage']:.3f}, accuracy of the classified {_share(v['accuracy_of_classified'])}")
    for name, note in fitted["notes"].items():
        print(f"  {name}: {note}")
    for warning in fitted["warnings"]:
        print(f"  warning: {warning}")
    from .calibration import path_of
    print(f"wrote {path_of(o.run, o.run / f'{o.checkpoint}.pt')}")
    return 0


def _evaluate(args: argparse.Namespace, argv: list[str] | None) -> int:
    from .evaluate import evaluate_run
    o = settings_from(EvaluateOptions, args)
    result = evaluate_run(o.run, o.split, o.data, o.checkpoint, o.backend, o.other_data)
    print(f"{o.split}: accuracy {result['acc']:.4f}, top-5 {result['top5']:.4f}, "
          f"loss {result['loss']:.4f} over {result['images']} images")
    width = max(len(name) for name in result["per_class"])
    print(f"{'class':<{width}}  precision  recall     f1  support")
    for name, s in result["per_class"].items():
        print(f"{name:<{width}}  {s['precision']:9.3f}  {s['recall']:6.3f}  {s['f1']:5.3f}  {s['support']:7d}")
    if "calibration" in result:
        c = result["calibration"]
        if "not_used" in c:
            print(f"calibration not used: {c['not_used']}")
        else:
            print(f"calibrated: ECE {c['ece_before']:.4f} -> {c['ece_after']:.4f}; at the thresholds "
                  f"coverage {c['coverage']:.3f}, accuracy of the classified "
                  f"{_share(c['accuracy_of_classified'])}")
    print(f"wrote {o.run}/eval-{o.split}.json, confusion-{o.split}.csv and .png")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args, argv)
    except PlanktonioError as error:  # DiskError included: 74, the others 2
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:  # Ctrl-C before the run's own handler is in place (start-up, the feature cache's pass)
        print("\ninterrupted before training started: nothing to save (a feature cache file is written only "
              "once complete)", file=sys.stderr)
        return EXIT_ABORTED


def _ecotaxa_options(eco) -> None:
    eco.add_argument("--ecotaxa-categories", type=Path, metavar="FILE",
                     help="JSON {class: EcoTaxa category} where names differ (default: the categories of the "
                          "export the run's data was prepared from, else the class names)")
    eco.add_argument("--ecotaxa-zip-size", default="500MB", help="the most bytes per zip (default 500MB)")
    eco.add_argument("--ecotaxa-include-validated", action="store_true",
                     help="also predict an export's validated objects (scores only: their annotation is kept)")
    eco.add_argument("--ecotaxa-no-images", action="store_true",
                     help="the TSV names the images, the zip leaves them out (updating objects already there)")


def _predict(args: argparse.Namespace, argv: list[str] | None) -> int:
    """predict's tables; with --format ecotaxa, Parquet tables and then the EcoTaxa import (planktonio/ecotaxa)."""
    from planktonio.cores import let_idle_threads_sleep
    let_idle_threads_sleep()  # before torch loads (planktonio/cores.py says why)
    from dataclasses import replace

    from .predict import predict, predict_options
    options = predict_options(args, ["python", "-m", "train", *(argv or sys.argv[1:])])
    if args.format != "ecotaxa":
        return predict(options)
    from planktonio.declared import parse_size
    from planktonio.ecotaxa.commands import predict_ecotaxa
    return predict_ecotaxa(lambda images: predict(replace(options, images=images, format="parquet")),
                           run=args.run, images=args.images, out=args.out, categories_file=args.ecotaxa_categories,
                           top_k=args.top_k, zip_bytes=parse_size(args.ecotaxa_zip_size, "--ecotaxa-zip-size"),
                           include_validated=args.ecotaxa_include_validated,
                           with_images=not args.ecotaxa_no_images)


def _share(value: float | None) -> str:
    """A fraction to three places; none where no image was classified."""
    return "- (none classified)" if value is None else f"{value:.3f}"


COMMANDS = {"fit": _fit, "predict": _predict, "calibrate": _calibrate, "evaluate": _evaluate}


if __name__ == "__main__":
    sys.exit(main())

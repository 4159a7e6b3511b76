"""Command line, run from the repository root:

    python -m profiling smoke --data PREPARED           every GPU path tried once, in under a minute
    python -m profiling loaders --data PREPARED ...     loader throughput, side by side
    python -m profiling amp [--data PREPARED] ...       AMP against FP32, compute only and end to end
    python -m profiling predict --run RUN --images SRC  train predict against its loader alone and its model alone
    python -m profiling trace --config FILE --data PREPARED --out DIR
    python -m profiling inspect TRACE | DIR [--json OUT]   one trace, or every rank of a run
    python -m profiling inspect A B [--json OUT]           two traces or folders compared
    python -m profiling report RESULTS... --out DIR
    python -m profiling suite --data PREPARED --out DIR [--minutes 7]   all of it, within a time budget
    python -m profiling accuracy --config FILE --data PREPARED --out DIR [--arm NAME KEY=VALUE ...] --seeds K
    python -m profiling scale --out DIR [--sizes 10000,100000,1000000]   how the costs grow with the images

The options of smoke, loaders, amp, predict, trace, suite and scale, and their defaults, are the
fields of their settings dataclasses in profiling/settings.py; `python -m profiling COMMAND --help`
lists them. docs/measuring.md.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

from planktonio.cli import add_arguments, settings_from
from planktonio.errors import PlanktonioError
from planktonio.files import check_folder_writable, check_writable, write_atomic

# The benchmarks whose options are their settings dataclass's fields (profiling/settings.py): the command,
# the class's name there, its help, and what its --json holds (None: no --json).
BENCHMARKS = (
    ("smoke", "Smoke", "every GPU path tried once (loaders, AMP steps, NCCL): what fails", "write the checks here"),
    ("loaders", "LoaderBenchmark", "images/s and latency of each loader backend", "write the result here"),
    ("amp", "AmpBenchmark", "training step time for fp32 / amp-fp16 / amp-bf16", "write the result here"),
    ("predict", "PredictBenchmark", "train predict's images/s against the same loader alone and the model "
                                    "alone, on the same images", "write the result here"),
    ("suite", "Suite", "everything, within a time budget: doctor, smoke, GPU tests, loaders, AMP, end-to-end "
                       "training, a trace, the report", None),
    ("scale", "ScaleBenchmark", "synthetic sets of growing size: prepare, pack, the first batch (loose files and "
                                "shards), peak memory, against the number of images", "default: OUT/scale.json"),
)


def build_parser() -> argparse.ArgumentParser:
    from . import settings
    parser = argparse.ArgumentParser(prog="python -m profiling", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    for name, cls, help_text, json_help in BENCHMARKS:
        command = commands.add_parser(name, help=help_text)
        add_arguments(command, getattr(settings, cls))
        if json_help is not None:
            command.add_argument("--json", type=Path, help=json_help)

    trace = commands.add_parser("trace", help="a short training run under torch.profiler")
    trace.add_argument("--config", type=Path, help="a training config (train/configs/*.yaml)")
    trace.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    trace.add_argument("--data", type=Path, required=True)
    trace.add_argument("--out", type=Path, required=True)
    add_arguments(trace, settings.TraceOptions)

    inspect = commands.add_parser("inspect", help="read traces back: a trace, a run's rank traces, or two runs "
                                                  "compared; time per step, data wait, device idle, verdict")
    inspect.add_argument("traces", type=Path, nargs="+", metavar="TRACE_OR_DIR",
                         help="a trace-rank<R>.json.gz, a folder of them (every rank), or two of either (A B)")
    inspect.add_argument("--top", type=int, default=10)
    inspect.add_argument("--json", type=Path)
    _add_accuracy(commands)

    report = commands.add_parser("report", help="markdown report with plots from result JSON files")
    report.add_argument("results", type=Path, nargs="+")
    report.add_argument("--out", type=Path, required=True)
    report.add_argument("--title", default="planktonio measurements")
    return parser


def _add_accuracy(commands) -> None:
    accuracy = commands.add_parser("accuracy", help="test accuracy per arm (config overrides) over seeds, "
                                                    "paired differences to a reference arm")
    accuracy.add_argument("--config", type=Path, help="the training config every arm starts from")
    accuracy.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                          help="override a config key in every arm (repeatable)")
    accuracy.add_argument("--data", type=Path, required=True)
    accuracy.add_argument("--out", type=Path, required=True, help="runs go to OUT/<arm>/seed<k>/, the report to OUT/")
    accuracy.add_argument("--arm", dest="arms", action="append", nargs="+", metavar="NAME [KEY=VALUE",
                          help="an arm: its name, then config overrides (repeatable; default: the loader "
                               "backends x fp32 and AMP this machine can run)")
    accuracy.add_argument("--seeds", type=int, default=3)
    accuracy.add_argument("--reference", help="the arm the others are compared with (default: the first)")
    accuracy.add_argument("--margin", type=float, default=1.0, help="percentage points (default 1)")


def _wrote(path: Path | None) -> None:
    if path:
        print(f"wrote {path}")


def _environment(args: argparse.Namespace) -> dict:
    from .environment import describe_environment
    return describe_environment(argv=args.argv)


def _smoke(args: argparse.Namespace) -> int:
    from .settings import Smoke
    from .smoke import run as run_smoke
    result = run_smoke(settings_from(Smoke, args), args.json, _environment(args))
    _wrote(args.json)
    return 0 if all(c["ok"] for c in result["checks"]) else 1


def _loaders(args: argparse.Namespace) -> int:
    from .loader_bench import run as run_loaders
    from .render.loaders import text_table
    from .settings import LoaderBenchmark
    bench, environment = settings_from(LoaderBenchmark, args), _environment(args)
    result = run_loaders(bench, args.json, environment)
    c = result["config"]
    print(f"{environment['device']}, {environment['cpu_count']} cores, {c['workers']} workers, {c['threads']} "
          f"DALI threads, batch {bench.batch_size}, {bench.repeats} x {bench.epochs} epoch(s) of "
          f"{c['batches_per_epoch']} batches, split {bench.split}")
    print(text_table(result))
    _wrote(args.json)
    return 0


def _tabled(program: str, render: str, settings: str):
    """A benchmark whose result prints as its render module's text table: `program`'s run(settings, json,
    environment), the options of profiling/settings.py's `settings`."""
    def command(args: argparse.Namespace) -> int:
        from . import settings as settings_module
        run = importlib.import_module(f".{program}", __package__).run
        text_table = importlib.import_module(f".render.{render}", __package__).text_table
        bench = settings_from(getattr(settings_module, settings), args)
        print(text_table(run(bench, args.json, _environment(args))))
        _wrote(args.json)
        return 0
    return command


_amp = _tabled("amp_bench", "amp", "AmpBenchmark")
_predict = _tabled("predict_bench", "predict", "PredictBenchmark")
_scale = _tabled("scale", "scale", "ScaleBenchmark")


def _trace(args: argparse.Namespace) -> int:
    from .settings import TraceOptions
    from .trace import run_trace
    return run_trace(args.config, args.overrides, args.data, args.out, settings_from(TraceOptions, args))


def _accuracy(args: argparse.Namespace) -> int:
    from .accuracy import Sweep, arms_for, run as run_accuracy
    sweep = Sweep(args.config, args.data, args.out, arms_for(args.arms), seeds=args.seeds,
                  reference=args.reference, margin=args.margin, overrides=tuple(args.overrides))
    print(f"wrote {run_accuracy(sweep, _environment(args))}")
    return 0


def _suite(args: argparse.Namespace) -> int:
    from .settings import Suite
    from .suite import run as run_suite
    print(f"wrote {run_suite(settings_from(Suite, args))}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from .report import write_report
    print(f"wrote {write_report(args.results, args.out, args.title)}")
    return 0


def run(args: argparse.Namespace) -> int:
    # Where results go, before the work, not after it: a place that cannot be written costs nothing.
    if getattr(args, "json", None) is not None:
        check_writable(args.json, "--json", make_parent=True)
    if args.command in ("accuracy", "suite", "report"):
        check_folder_writable(Path(args.out), "--out", make=False)
    if args.command == "scale":
        check_folder_writable(Path(args.out), "--out", make=True)
        args.json = args.json or Path(args.out) / "scale.json"
    if args.command == "predict":  # as `train predict` runs: before torch loads (planktonio/cores.py says why)
        from planktonio.cores import let_idle_threads_sleep
        let_idle_threads_sleep()
    return COMMANDS[args.command](args)


def _inspect(args: argparse.Namespace) -> int:
    from .inspect_compare import compare, format_comparison
    from .inspect_ranks import analyse_ranks, format_ranks
    from .inspect_trace import analyse, format_report, load_events
    if len(args.traces) > 2:
        raise PlanktonioError(f"inspect: {len(args.traces)} paths given; give one trace or folder, or two to compare")
    if args.top < 1:
        raise PlanktonioError(f"inspect --top {args.top}: must be at least 1")
    from .environment import describe_environment
    environment = describe_environment(devices=False, argv=args.argv)
    if len(args.traces) == 2:
        result = compare(*args.traces, args.top)
        print(format_comparison(result))
        written = {"kind": "inspect-compare", "environment": environment, **result}
    elif args.traces[0].is_dir():
        result = analyse_ranks(args.traces[0], args.top)
        print(format_ranks(result))
        written = {"kind": "inspect-ranks", "environment": environment, **result}
    else:
        trace = args.traces[0]
        result = analyse(load_events(trace), args.top)
        print(format_report(trace, result))
        written = {"kind": "inspect", "environment": environment, "trace": str(trace), "result": result}
    if args.json:
        write_atomic(args.json, json.dumps(written, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


COMMANDS = {"smoke": _smoke, "loaders": _loaders, "amp": _amp, "predict": _predict, "scale": _scale, "trace": _trace,
            "inspect": _inspect, "accuracy": _accuracy, "suite": _suite, "report": _report}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else [str(a) for a in argv]  # what results record as their command
    try:
        return run(args)
    except PlanktonioError as error:  # one line; exit 2, or 74 for a disk that cannot take a file
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code


if __name__ == "__main__":
    sys.exit(main())

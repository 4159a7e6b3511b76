"""Command line, run from the repository root:

    python -m profiling loaders --data PREPARED ...   loader throughput, side by side
    python -m profiling amp [--data PREPARED] ...     AMP against FP32, compute only and end to end
    python -m profiling trace --config FILE --data PREPARED --out DIR
    python -m profiling inspect TRACE | DIR [--json OUT]   one trace, or every rank of a run
    python -m profiling inspect A B [--json OUT]           two traces or folders compared
    python -m profiling report RESULTS... --out DIR
    python -m profiling suite --data PREPARED --out DIR [--minutes 9]   all of it, within a time budget
    python -m profiling accuracy --config FILE --data PREPARED --out DIR [--arm NAME KEY=VALUE ...] --seeds K
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from planktonio.errors import PlanktonioError
from planktonio.loaders import BACKENDS

from .environment import describe_environment


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m profiling", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    loaders = commands.add_parser("loaders", help="images/s and latency of each loader backend")
    loaders.add_argument("--data", required=True, help="a folder written by `python -m planktonio prepare`")
    loaders.add_argument("--split", default="train")
    loaders.add_argument("--backends", default="auto",
                         help=f"comma-separated, from {', '.join(BACKENDS)} and memory (the upper bound); "
                              "default auto: all that this machine can run, and the bound")
    loaders.add_argument("--batch-size", type=int, default=64)
    loaders.add_argument("--epochs", type=int, default=1, help="whole epochs timed per turn (default 1)")
    loaders.add_argument("--warmup", type=int, default=5, help="untimed batches first")
    loaders.add_argument("--repeats", type=int, default=3)
    loaders.add_argument("--workers", type=int, default=None,
                         help="DataLoader processes, and DALI threads unless --threads (default: the CPUs this "
                              "process may use)")
    loaders.add_argument("--threads", type=int, default=None, help="DALI threads (default: --workers)")
    loaders.add_argument("--device", default="auto")
    loaders.add_argument("--dtype", default="float32", choices=["float32", "float16"])
    loaders.add_argument("--layout", default="NCHW", choices=["NCHW", "NHWC"])
    loaders.add_argument("--eval-transform", action="store_true",
                         help="time the resize/centre-crop transform instead of the training augmentation")
    loaders.add_argument("--json", type=Path, help="write the result here")

    amp = commands.add_parser("amp", help="training step time for fp32 / amp-fp16 / amp-bf16")
    amp.add_argument("--model", default="alexnet")
    amp.add_argument("--batch-size", type=int, default=128)
    amp.add_argument("--steps", type=int, default=20, help="timed steps per repeat")
    amp.add_argument("--warmup", type=int, default=5)
    amp.add_argument("--repeats", type=int, default=3)
    amp.add_argument("--image-size", type=int, default=224)
    amp.add_argument("--precisions", default="fp32,amp-fp16,amp-bf16")
    amp.add_argument("--layouts", default="NCHW,NHWC", help="NCHW, NHWC (channels_last) or both")
    amp.add_argument("--freeze", default="all-but-head,none", help="freezing modes to compare")
    amp.add_argument("--data", help="a prepared set: also measure end to end with each loader")
    amp.add_argument("--loaders", default="dali,torchvision")
    amp.add_argument("--workers", type=int, default=None)
    amp.add_argument("--device", default="auto")
    amp.add_argument("--cudnn-benchmark", action=argparse.BooleanOptionalAction, default=True,
                     help="let cuDNN time its algorithms for the batch shape (default on)")
    amp.add_argument("--tf32", default="default", choices=["default", "on", "off"],
                     help="TF32 for FP32 convolutions and matmuls: torch's default, on, or off (true FP32)")
    amp.add_argument("--json", type=Path)

    trace = commands.add_parser("trace", help="a short training run under torch.profiler")
    trace.add_argument("--config", type=Path, help="a training config (train/configs/*.yaml)")
    trace.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    trace.add_argument("--data", type=Path, required=True)
    trace.add_argument("--out", type=Path, required=True)
    trace.add_argument("--wait", type=int, default=1)
    trace.add_argument("--warmup", type=int, default=2)
    trace.add_argument("--active", type=int, default=5)
    trace.add_argument("--memory", action="store_true", help="also write a memory timeline")

    inspect = commands.add_parser("inspect", help="read traces back: a trace, a run's rank traces, or two runs "
                                                  "compared; time per step, data wait, device idle, verdict")
    inspect.add_argument("traces", type=Path, nargs="+", metavar="TRACE_OR_DIR",
                         help="a trace-rank<R>.json.gz, a folder of them (every rank), or two of either (A B)")
    inspect.add_argument("--top", type=int, default=10)
    inspect.add_argument("--json", type=Path)

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

    suite = commands.add_parser("suite", help="everything, within a time budget: doctor, GPU tests, loaders, "
                                              "AMP, end-to-end training, a trace, the report")
    suite.add_argument("--data", type=Path, required=True, help="a folder written by `python -m planktonio prepare`")
    suite.add_argument("--out", type=Path, required=True, help="results, logs and OUT/report/report.md")
    suite.add_argument("--minutes", type=float, default=9.0, help="the whole budget, report included (default 9)")
    suite.add_argument("--backends", default="auto",
                       help="loader backends for the benchmarks and training (default auto: all this machine runs)")

    report = commands.add_parser("report", help="markdown report with plots from result JSON files")
    report.add_argument("results", type=Path, nargs="+")
    report.add_argument("--out", type=Path, required=True)
    report.add_argument("--title", default="planktonio measurements")
    return parser


def _write_json(path: Path | None, result: dict) -> None:
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {path}")


def run(args: argparse.Namespace) -> None:
    if args.command == "loaders":
        from .loaders import LoaderBenchmark, format_table, run as run_loaders
        bench = LoaderBenchmark(
            data=args.data, split=args.split, backends=tuple(args.backends.split(",")),
            batch_size=args.batch_size, epochs=args.epochs, warmup=args.warmup, repeats=args.repeats,
            workers=args.workers, threads=args.threads, device=args.device, dtype=args.dtype, layout=args.layout,
            augment=not args.eval_transform)
        result = {"environment": describe_environment(), **run_loaders(bench)}
        env = result["environment"]
        c = result["config"]
        print(f"{env['device']}, {env['cpu_count']} cores, {c['workers']} workers, {c['threads']} DALI threads, "
              f"batch {bench.batch_size}, {bench.repeats} x {bench.epochs} epoch(s) of {c['batches_per_epoch']} "
              f"batches, split {bench.split}")
        print(format_table(result))
        _write_json(args.json, result)
    elif args.command == "amp":
        from .amp import AmpBenchmark, format_table, run as run_amp
        layouts = args.layouts.split(",")
        bench = AmpBenchmark(
            model=args.model, batch_size=args.batch_size, steps=args.steps, warmup=args.warmup,
            repeats=args.repeats, image_size=args.image_size, precisions=tuple(args.precisions.split(",")),
            channels_last=tuple(layout == "NHWC" for layout in layouts), freeze=tuple(args.freeze.split(",")),
            data=args.data, loaders=tuple(args.loaders.split(",")), workers=args.workers, device=args.device,
            cudnn_benchmark=args.cudnn_benchmark, tf32=args.tf32)
        result = {"environment": describe_environment(), **run_amp(bench)}
        print(format_table(result))
        _write_json(args.json, result)
    elif args.command == "trace":
        from .trace import TraceOptions, run_trace
        written = run_trace(args.config, args.overrides, args.data, args.out,
                            TraceOptions(args.wait, args.warmup, args.active, args.memory))
        for path in written:
            print(f"wrote {path}")
    elif args.command == "inspect":
        from .inspect_compare import compare, format_comparison
        from .inspect_ranks import analyse_ranks, format_ranks
        from .inspect_trace import analyse, format_report, load_events
        if len(args.traces) > 2:
            raise PlanktonioError(f"inspect: {len(args.traces)} paths given; give one trace or folder, "
                                  f"or two to compare")
        if args.top < 1:
            raise PlanktonioError(f"inspect --top {args.top}: must be at least 1")
        environment = describe_environment()
        if len(args.traces) == 2:
            result = compare(*args.traces, args.top)
            print(format_comparison(result))
            _write_json(args.json, {"kind": "inspect-compare", "environment": environment, **result})
        elif args.traces[0].is_dir():
            result = analyse_ranks(args.traces[0], args.top)
            print(format_ranks(result))
            _write_json(args.json, {"kind": "inspect-ranks", "environment": environment, **result})
        else:
            trace = args.traces[0]
            result = analyse(load_events(trace), args.top)
            print(format_report(trace, result))
            _write_json(args.json, {"kind": "inspect", "environment": environment, "trace": str(trace),
                                    "result": result})
    elif args.command == "accuracy":
        from .accuracy import Sweep, arms_for, run as run_accuracy
        sweep = Sweep(args.config, args.data, args.out, arms_for(args.arms), seeds=args.seeds,
                      reference=args.reference, margin=args.margin, overrides=tuple(args.overrides))
        print(f"wrote {run_accuracy(sweep, describe_environment())}")
    elif args.command == "suite":
        from .suite import Suite, run as run_suite
        report = run_suite(Suite(data=args.data, out=args.out, minutes=args.minutes,
                                 backends=tuple(args.backends.split(","))))
        print(f"wrote {report}")
    elif args.command == "report":
        from .report import write_report
        print(f"wrote {write_report(args.results, args.out, args.title)}")


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

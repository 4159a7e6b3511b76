"""Command line, run from the repository root:

    python -m profiling loaders --data PREPARED ...   loader throughput, side by side
    python -m profiling amp [--data PREPARED] ...     AMP against FP32, compute only and end to end
    python -m profiling trace --config FILE --data PREPARED --out DIR
    python -m profiling inspect TRACE [--json OUT]
    python -m profiling report RESULTS... --out DIR
"""

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
    loaders.add_argument("--backends", default="auto",
                         help="comma-separated: dali-gpu, dali-cpu, torchvision, memory (upper bound); "
                              "default auto: all that this machine can run")
    loaders.add_argument("--batch-size", type=int, default=64)
    loaders.add_argument("--batches", type=int, default=20, help="timed batches per repeat")
    loaders.add_argument("--warmup", type=int, default=5, help="untimed batches first")
    loaders.add_argument("--repeats", type=int, default=3)
    loaders.add_argument("--workers", type=int, default=None, help="threads/processes (default: the CPUs this process may use)")
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

    inspect = commands.add_parser("inspect", help="read a trace back: top ops, busy/idle, data wait, verdict")
    inspect.add_argument("trace", type=Path)
    inspect.add_argument("--top", type=int, default=10)
    inspect.add_argument("--json", type=Path)

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
            batch_size=args.batch_size, batches=args.batches, warmup=args.warmup, repeats=args.repeats,
            workers=args.workers, device=args.device, dtype=args.dtype, layout=args.layout,
            augment=not args.eval_transform)
        result = {"environment": describe_environment(), **run_loaders(bench)}
        env = result["environment"]
        print(f"{env['device']}, {env['cpu_count']} cores, {result['config']['workers']} workers, "
              f"batch {bench.batch_size}, {bench.repeats} x {bench.batches} batches, split {bench.split}")
        print(format_table(result))
        _write_json(args.json, result)
    elif args.command == "amp":
        from .amp import AmpBenchmark, format_table, run as run_amp
        layouts = args.layouts.split(",")
        bench = AmpBenchmark(
            model=args.model, batch_size=args.batch_size, steps=args.steps, warmup=args.warmup,
            repeats=args.repeats, image_size=args.image_size, precisions=tuple(args.precisions.split(",")),
            channels_last=tuple(layout == "NHWC" for layout in layouts), freeze=tuple(args.freeze.split(",")),
            data=args.data, loaders=tuple(args.loaders.split(",")), workers=args.workers, device=args.device)
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
        from .inspect_trace import analyse, format_report, load_events
        result = analyse(load_events(args.trace), args.top)
        print(format_report(args.trace, result))
        _write_json(args.json, {"kind": "inspect", "environment": describe_environment(),
                                "trace": str(args.trace), "result": result})
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

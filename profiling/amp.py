"""AMP against FP32: training step time, images/s and peak memory.

Two parts:
- compute only: batches already on the device (random data, the loader's
  dtype and layout), so the numbers are the model's alone; every precision,
  with and without channels_last, frozen features vs full fine-tuning;
- end to end: the same step fed by each loader, with the share of step time
  spent waiting for data.

On a CPU it still runs (useful to check the program), but CPUs have no
tensor cores: AMP numbers measured there say little about a GPU.

Two settings change the FP32 baseline on a GPU, so the result states both:
cudnn.benchmark (on by default here, as in training: cuDNN times its
algorithms for the fixed batch shape) and TF32 (`--tf32 off` is true FP32,
the study's V100 has no TF32; torch's default lets cuDNN convolutions use
TF32 on Ampere and later but not matrix multiplications; `on` allows both).
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from dataclasses import dataclass

import torch

from planktonio import PreparedDataset, make_loader
from planktonio.errors import PlanktonioError
from planktonio.loaders import resolve_device
from planktonio.transforms import TRAIN_AUGMENT
from train.model import build_model
from train.step import AMP_DTYPES, make_optimizer, make_scaler, model_input, resolve_precision, train_step
from train.timing import TimedBatches

from .loaders import endless, synchronize
from .stats import summary

CPU_NOTE = ("measured on a CPU: no tensor cores, so AMP speed-ups here say little about a GPU; "
            "run on a GPU for numbers that matter")


@dataclass
class AmpBenchmark:
    model: str = "alexnet"
    batch_size: int = 128
    steps: int = 20
    warmup: int = 5
    repeats: int = 3
    image_size: int = 224
    num_classes: int = 17
    precisions: tuple[str, ...] = ("fp32", "amp-fp16", "amp-bf16")
    channels_last: tuple[bool, ...] = (False, True)
    freeze: tuple[str, ...] = ("all-but-head", "none")
    device: str = "auto"
    data: str | None = None                       # a prepared set: also measure end to end
    loaders: tuple[str, ...] = ("dali", "torchvision")
    workers: int | None = None
    cudnn_benchmark: bool = True
    tf32: str = "default"                         # default (torch's) | on | off


TF32_CHOICES = ("default", "on", "off")


def apply_settings(bench: AmpBenchmark) -> dict:
    """Set cudnn.benchmark and TF32 for this process; returns what is in force."""
    if bench.tf32 not in TF32_CHOICES:
        raise PlanktonioError(f"--tf32 {bench.tf32}: choose one of {', '.join(TF32_CHOICES)}")
    torch.backends.cudnn.benchmark = bench.cudnn_benchmark
    if bench.tf32 != "default":
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = bench.tf32 == "on"
    return {"cudnn_benchmark": torch.backends.cudnn.benchmark, "tf32": bench.tf32,
            "tf32_convolutions": torch.backends.cudnn.allow_tf32,
            "tf32_matmul": torch.backends.cuda.matmul.allow_tf32}


class Setup:
    """A model, its optimizer and scaler, in one precision / layout / freezing mode."""

    def __init__(self, bench: AmpBenchmark, device, precision, channels_last, freeze):
        self.device, self.precision = device, resolve_precision(precision, device)
        self.amp_dtype = AMP_DTYPES[self.precision]
        torch.manual_seed(0)
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.model = build_model(bench.model, bench.num_classes, freeze_mode=freeze).to(device)
        self.model = self.model.to(memory_format=memory_format).train()
        # The training loop's optimizer (fused on a GPU) and loss scaling: the same step.
        self.optimizer = make_optimizer("sgd", self.model, device, lr=1e-4, momentum=0.9)
        self.scaler = make_scaler(self.precision, device)
        self.output = model_input(self.precision, device, channels_last)

    def step(self, images, labels):
        return train_step(self.model, self.optimizer, self.scaler, images, labels, self.device, self.amp_dtype)

    def random_batch(self, bench: AmpBenchmark):
        generator = torch.Generator(device=self.device).manual_seed(1)
        size = (bench.batch_size, 3, bench.image_size, bench.image_size)
        images = torch.randn(size, generator=generator, device=self.device).to(self.output.torch_dtype)
        labels = torch.randint(0, bench.num_classes, (bench.batch_size,), generator=generator, device=self.device)
        return images.contiguous(memory_format=self.output.memory_format), labels


def _peak_memory_mb(device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def measure_compute(bench: AmpBenchmark, device, precision, channels_last, freeze) -> dict:
    setup = Setup(bench, device, precision, channels_last, freeze)
    images, labels = setup.random_batch(bench)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(bench.warmup):
        setup.step(images, labels)
    step_ms = []
    for _ in range(bench.repeats):
        synchronize(device)
        start = time.perf_counter()
        for _ in range(bench.steps):
            setup.step(images, labels)
        synchronize(device)
        step_ms.append(1000 * (time.perf_counter() - start) / bench.steps)
    return {
        "precision": setup.precision, "channels_last": channels_last, "freeze": freeze,
        "step_ms": summary(step_ms),
        "images_per_s": summary([1000 * bench.batch_size / ms for ms in step_ms]),
        "peak_memory_mb": _peak_memory_mb(device),
    }


def measure_end_to_end(bench: AmpBenchmark, device, loader_name, precision) -> dict:
    """The step fed by a real loader: images/s and the share of time spent waiting for data."""
    channels_last = precision != "fp32"
    setup = Setup(bench, device, precision, channels_last, bench.freeze[0])
    transform = dataclasses.replace(TRAIN_AUGMENT, size=bench.image_size,
                                    resize=max(bench.image_size, TRAIN_AUGMENT.resize))
    loader = make_loader(loader_name, PreparedDataset.load(bench.data), "train", batch_size=bench.batch_size,
                         transform=transform, output=setup.output, device=device, workers=bench.workers)
    batches = endless(loader)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(bench.warmup):
        setup.step(*next(batches))
    synchronize(device)
    rates, waits = [], []
    for _ in range(bench.repeats):
        # As in the training loop: no synchronisation between steps, one at the end.
        start = time.perf_counter()
        timed = TimedBatches(itertools.islice(batches, bench.steps), device)
        for images, labels in timed:
            setup.step(images, labels)
        timed.step_seconds()  # waits for the last step
        elapsed = time.perf_counter() - start
        rates.append(bench.steps * bench.batch_size / elapsed)
        waits.append(timed.data_seconds / elapsed)
    loader.close()
    return {"loader": loader.backend, "precision": setup.precision, "channels_last": channels_last,
            "freeze": bench.freeze[0], "images_per_s": summary(rates),
            "data_wait_fraction": summary(waits)["median"], "peak_memory_mb": _peak_memory_mb(device)}


def run(bench: AmpBenchmark) -> dict:
    device = resolve_device(bench.device)
    settings = apply_settings(bench)
    compute = [measure_compute(bench, device, p, cl, f)
               for f, p, cl in itertools.product(bench.freeze, bench.precisions, bench.channels_last)]
    end_to_end = []
    if bench.data:
        end_to_end = [measure_end_to_end(bench, device, loader, p)
                      for loader, p in itertools.product(bench.loaders, bench.precisions)]
    return {
        "kind": "amp",
        "config": {**vars(bench), "device": str(device)},
        "settings": settings,
        "note": CPU_NOTE if device.type == "cpu" else None,
        "compute": compute,
        "end_to_end": end_to_end,
    }


def speedups(result: dict) -> list[dict]:
    """Each compute row's images/s over the fp32 (no channels_last) row of the same freezing mode."""
    base = {r["freeze"]: r["images_per_s"]["median"] for r in result["compute"]
            if r["precision"] == "fp32" and not r["channels_last"]}
    return [{**r, "speedup_vs_fp32": r["images_per_s"]["median"] / base[r["freeze"]]}
            for r in result["compute"] if r["freeze"] in base]


def format_table(result: dict) -> str:
    lines = [f"{'freeze':<13} {'precision':<9} {'layout':<7} {'step ms':>8} {'images/s':>9} {'vs fp32':>7} {'peak MiB':>9}"]
    for r in speedups(result):
        memory = f"{r['peak_memory_mb']:.0f}" if r["peak_memory_mb"] is not None else "-"
        lines.append(f"{r['freeze']:<13} {r['precision']:<9} {'NHWC' if r['channels_last'] else 'NCHW':<7} "
                     f"{r['step_ms']['median']:>8.1f} {r['images_per_s']['median']:>9.0f} "
                     f"{r['speedup_vs_fp32']:>6.2f}x {memory:>9}")
    if result["end_to_end"]:
        lines.append("")
        lines.append(f"{'loader':<12} {'precision':<9} {'images/s':>9} {'data wait':>9}")
        for r in result["end_to_end"]:
            lines.append(f"{r['loader']:<12} {r['precision']:<9} {r['images_per_s']['median']:>9.0f} "
                         f"{100 * r['data_wait_fraction']:>8.0f}%")
    lines.append(f"settings: {settings_line(result)}")
    if result["note"]:
        lines.append(f"note: {result['note']}")
    return "\n".join(lines)


def settings_line(result: dict) -> str:
    """cudnn.benchmark and TF32, which both move the FP32 baseline (results before them: unknown)."""
    s = result.get("settings")
    if not s:
        return "cudnn.benchmark and TF32 not recorded"
    return (f"cudnn.benchmark {'on' if s['cudnn_benchmark'] else 'off'}; TF32 {s['tf32']} (convolutions "
            f"{'TF32' if s['tf32_convolutions'] else 'FP32'}, matrix multiplications "
            f"{'TF32' if s['tf32_matmul'] else 'FP32'})")

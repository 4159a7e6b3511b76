"""`python -m profiling amp`: AMP against FP32, training step time, images/s and peak memory.

Two parts:
- compute only: batches already on the device (random data, the loader's
  dtype and layout), so the numbers are the model's alone; every precision,
  with and without channels_last, frozen features vs full fine-tuning;
- end to end: the same step fed by each loader, with the share of step time
  spent waiting for data.
Both time their steps with train/timing.py's TimedBatches, as the training
loop does (no synchronisation between steps, one at the end).

A precision the GPU has no hardware for is left out, and the result says
why (bf16 below compute capability 8.0, e.g. the group's V100s: autocast
would emulate it, cuDNN has no bf16 convolutions there, and the stage would
crawl). On a CPU it still runs (useful to check the program), but CPUs have
no tensor cores: AMP numbers measured there say little about a GPU.

Two settings change the FP32 baseline on a GPU, so the result states both:
cudnn.benchmark (on by default here, as in training: cuDNN times its
algorithms for the fixed batch shape) and TF32 (`--tf32 off` is true FP32,
the study's V100 has no TF32; torch's default lets cuDNN convolutions use
TF32 on Ampere and later but not matrix multiplications; `on` allows both).
Every row is on disk as soon as it is measured (measure.ResultFile). docs/measuring.md.
"""

from __future__ import annotations

import dataclasses
import itertools

import torch

from planktonio import PreparedDataset, make_loader
from planktonio.errors import PlanktonioError
from planktonio.loaders import default_backend, reference_backend, resolve_device
from planktonio.transforms import TRAIN_AUGMENT
from train.model import build_model
from train.step import (
    AMP_DTYPES,
    loader_output,
    make_optimizer,
    make_scaler,
    precisions_for,
    resolve_precision,
    train_step,
)
from train.timing import TimedBatches

from .measure import ResultFile, endless, peak_memory_mb, reset_peak_memory, synchronize
from .settings import TF32_CHOICES, AmpBenchmark
from .stats import summary

CPU_NOTE = ("measured on a CPU: no tensor cores, so AMP speed-ups here say little about a GPU; "
            "run on a GPU for numbers that matter")


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
        self.output = loader_output(self.precision, device, channels_last)

    def step(self, images, labels):
        return train_step(self.model, self.optimizer, self.scaler, images, labels, self.device, self.amp_dtype)

    def random_batch(self, bench: AmpBenchmark):
        generator = torch.Generator(device=self.device).manual_seed(1)
        size = (bench.batch_size, 3, bench.image_size, bench.image_size)
        images = torch.randn(size, generator=generator, device=self.device).to(self.output.torch_dtype)
        labels = torch.randint(0, bench.num_classes, (bench.batch_size,), generator=generator, device=self.device)
        return images.contiguous(memory_format=self.output.memory_format), labels

    def timed_steps(self, batches, count: int):
        """`count` steps over `batches`, as the training loop takes them; their Timing."""
        timer = TimedBatches(itertools.islice(batches, count), self.device)
        for images, labels in timer:
            self.step(images, labels)
        return timer.finish()


def measure_compute(bench: AmpBenchmark, device, precision, channels_last, freeze) -> dict:
    setup = Setup(bench, device, precision, channels_last, freeze)
    batch = setup.random_batch(bench)
    reset_peak_memory(device)
    setup.timed_steps(itertools.repeat(batch), bench.warmup)
    step_ms = []
    for _ in range(bench.repeats):
        synchronize(device)
        timing = setup.timed_steps(itertools.repeat(batch), bench.steps)
        step_ms.append(1000 * timing.wall_seconds / bench.steps)
    return {
        "precision": setup.precision, "channels_last": channels_last, "freeze": freeze,
        "step_ms": summary(step_ms),
        "images_per_s": summary([1000 * bench.batch_size / ms for ms in step_ms]),
        "peak_memory_mb": peak_memory_mb(device),
    }


def measure_end_to_end(bench: AmpBenchmark, device, loader_name, precision) -> dict:
    """The step fed by a real loader: images/s and the share of time spent waiting for data."""
    channels_last = precision != "fp32"
    setup = Setup(bench, device, precision, channels_last, bench.freeze[0])
    transform = dataclasses.replace(TRAIN_AUGMENT, size=bench.image_size,
                                    resize=max(bench.image_size, TRAIN_AUGMENT.resize))
    loader = make_loader(loader_name, PreparedDataset.load(bench.data), "train", batch_size=bench.batch_size,
                         transform=transform, output=setup.output, device=device, workers=bench.workers)
    try:
        batches = endless(loader)
        reset_peak_memory(device)
        setup.timed_steps(batches, bench.warmup)
        synchronize(device)
        rates, waits = [], []
        for _ in range(bench.repeats):
            timing = setup.timed_steps(batches, bench.steps)
            rates.append(bench.steps * bench.batch_size / timing.wall_seconds)
            waits.append(timing.data_seconds / timing.wall_seconds)
    finally:
        loader.close()
    return {"loader": loader.backend, "precision": setup.precision, "channels_last": channels_last,
            "freeze": bench.freeze[0], "images_per_s": summary(rates),
            "data_wait_fraction": summary(waits)["median"], "peak_memory_mb": peak_memory_mb(device)}


def run(bench: AmpBenchmark, json_path=None, environment: dict | None = None) -> dict:
    device = resolve_device(bench.device)
    settings = apply_settings(bench)
    precisions, left_out = precisions_for(device, bench.precisions)
    result = ResultFile(json_path, "amp", environment=environment or {},
                        config={**vars(bench), "device": str(device), "precisions": list(precisions)},
                        settings=settings, note=CPU_NOTE if device.type == "cpu" else None,
                        precisions_left_out=left_out, compute=[], end_to_end=[])
    for freeze, precision, layout in itertools.product(bench.freeze, precisions, bench.layouts):
        result.add("compute", measure_compute(bench, device, precision, layout == "NHWC", freeze))
    if bench.data:
        loaders = bench.loaders
        if loaders == ("auto",):
            loaders = tuple(dict.fromkeys(filter(None, (default_backend(), reference_backend(device)))))
        for loader, precision in itertools.product(loaders, precisions):
            result.add("end_to_end", measure_end_to_end(bench, device, loader, precision))
    return result.finish()

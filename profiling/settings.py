"""The settings of each measuring program, declared once: their fields are the command-line options.

`python -m profiling` builds each command's options from these dataclasses
(planktonio/cli.py): a default is written here and nowhere else. No torch
here: parsing a command line, or rendering a report, does not import it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from planktonio.declared import setting
from planktonio.errors import PlanktonioError

TF32_CHOICES = ("default", "on", "off")


@dataclass
class Smoke:
    data: str = setting(help="a folder written by `python -m planktonio prepare`")
    device: str = setting("auto")
    batch_size: int = setting(32)
    model: str = setting("alexnet", help="the model of the training steps")
    image_size: int = setting(224)
    steps: int = setting(3, help="training steps per precision")


@dataclass
class LoaderBenchmark:
    data: str = setting(help="a folder written by `python -m planktonio prepare`")
    split: str = setting("train")
    backends: tuple[str, ...] = setting(("auto",), help="comma-separated backends of the registry, or auto: "
                                                        "every one this machine runs (the upper bound included)")
    batch_size: int = setting(64)
    epochs: int = setting(1, help="whole epochs timed per turn")
    warmup: int = setting(5, help="untimed batches first")
    repeats: int = setting(3)
    workers: int | None = setting(None, help="DataLoader processes, and DALI threads unless --threads "
                                             "(default: the CPUs this process may use)")
    threads: int | None = setting(None, help="DALI threads (default: --workers)")
    device: str = setting("auto")
    dtype: str = setting("float32", choices=("float32", "float16"))
    layout: str = setting("NCHW", choices=("NCHW", "NHWC"))
    eval_transform: bool = setting(False, help="time the resize/centre-crop transform instead of the training "
                                               "augmentation")

    def __post_init__(self):
        if self.epochs < 1 or self.repeats < 1 or self.warmup < 0 or self.batch_size < 1:
            raise PlanktonioError("loader benchmark: --epochs, --repeats and --batch-size must be >= 1, "
                                  "--warmup >= 0")


@dataclass
class AmpBenchmark:
    model: str = setting("alexnet")
    batch_size: int = setting(128)
    steps: int = setting(20, help="timed steps per repeat")
    warmup: int = setting(5)
    repeats: int = setting(3)
    image_size: int = setting(224)
    num_classes: int = setting(17)
    precisions: tuple[str, ...] = setting(("fp32", "amp-fp16", "amp-bf16"))
    layouts: tuple[str, ...] = setting(("NCHW", "NHWC"), help="NCHW, NHWC (channels_last) or both")
    freeze: tuple[str, ...] = setting(("all-but-head", "none"), help="freezing modes to compare")
    device: str = setting("auto")
    data: str | None = setting(None, help="a prepared set: also measure end to end with each loader")
    loaders: tuple[str, ...] = setting(("auto",), help="loader backends for end to end; auto: the default "
                                                       "backend and the reference (planktonio.loaders)")
    workers: int | None = setting(None)
    cudnn_benchmark: bool = setting(True, help="let cuDNN time its algorithms for the batch shape")
    tf32: str = setting("default", choices=TF32_CHOICES,
                        help="TF32 for FP32 convolutions and matmuls: torch's default, on, or off (true FP32)")


@dataclass
class PredictBenchmark:
    run: str = setting(help="a run folder written by `python -m train fit`")
    images: str = setting(help="what `train predict` reads: a folder of images, a file listing them, or tar shards")
    backends: tuple[str, ...] = setting(("auto",), help="comma-separated loader backends, or auto: every one "
                                                        "predict may use on this machine")
    checkpoint: str = setting("best", choices=("best", "last"))
    batch_size: int | None = setting(None, help="default: the run's evaluation batch size")
    device: str | None = setting(None, help="default: the run's")
    precision: str | None = setting(None, help="default: the run's")
    workers: int | None = setting(None, help="default: the run's")
    repeats: int = setting(3, help="rounds of turns (loader alone, forward alone, predict) per backend")

    def __post_init__(self):
        if self.repeats < 1:
            raise PlanktonioError("predict benchmark: --repeats must be >= 1")


@dataclass
class TraceOptions:
    wait: int = setting(1, help="steps before the profiler starts")
    warmup: int = setting(2, help="steps recorded and thrown away (the profiler's start-up)")
    active: int = setting(5, help="steps recorded into the trace")
    memory: bool = setting(False, help="also record shapes and memory, and write a memory timeline")


@dataclass
class Suite:
    data: str = setting(help="a folder written by `python -m planktonio prepare`")
    out: str = setting(help="results, logs and OUT/report/report.md")
    minutes: float = setting(7.0, help="the whole budget, report included")
    backends: tuple[str, ...] = setting(("auto",), help="loader backends for the benchmarks and training "
                                                        "(auto: all this machine runs)")
    device: str = setting("auto")


@dataclass
class ScaleBenchmark:
    out: str = setting(help="the synthetic sets (kept for the next run), their prepared folders and the result")
    sizes: tuple[int, ...] = setting((10_000, 100_000, 1_000_000), help="comma-separated numbers of images")
    image_size: int = setting(32, help="the synthetic JPEGs' side in pixels (small: a million fit a laptop's disk)")
    backend: str | None = setting(None, help="the loader backend of the first-batch and steady-rate measurements, "
                                             "on the CPU (default: the registry's baseline, the torchvision one)")
    batch_size: int = setting(256)
    batches: int = setting(20, help="batches timed after the first (the steady rate)")
    workers: int | None = setting(None, help="prepare's decode processes and the loader's workers (default: the "
                                             "CPUs this process may use)")
    keep: bool = setting(False, help="keep each size's prepared folder (default: removed once measured)")

    def __post_init__(self):
        if self.batch_size < 1 or self.batches < 1 or self.image_size < 8:
            raise PlanktonioError("scale benchmark: --batch-size and --batches must be >= 1, --image-size >= 8")
        # the training split (80% of a set) must hold a full first batch
        if not self.sizes or len(set(self.sizes)) != len(self.sizes) or 0.8 * min(self.sizes) < self.batch_size:
            raise PlanktonioError(f"scale benchmark: --sizes {','.join(map(str, self.sizes))}: give distinct sizes "
                                  f"of at least {math.ceil(self.batch_size / 0.8)} images each (a full training "
                                  f"batch of --batch-size {self.batch_size} in the 80% that trains)")

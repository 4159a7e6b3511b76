"""The pil backend: the study's own pipeline (PIL decode and transforms, ToTensor and Normalize in the
workers), registered as the reference every speed-up is taken over. Its agreement with the other
backends, its epochs, shards and errors are the registry's contract tests (test_loaders.py, test_ndsb.py)."""

from __future__ import annotations

import torch

from planktonio import TRAIN_AUGMENT, make_loader
from planktonio.loaders import BACKENDS, default_backend, reference_backend


def test_the_study_pipeline_is_the_reference_but_not_the_default():
    cpu = torch.device("cpu")
    assert reference_backend(cpu) == "pil" and BACKENDS["pil"].role == "reference"
    assert default_backend() != "pil" and BACKENDS["pil"].trains


def test_its_workers_decode_transform_and_normalise_in_float32(synthetic):
    """As the classic pipeline: what a worker returns is already a normalised float32 image."""
    loader = make_loader("pil", synthetic, "train", batch_size=4, device="cpu", workers=0, transform=TRAIN_AUGMENT)
    dataset = loader.dataloader.dataset
    plan = loader.batch_plan(0, 0)
    image, label = dataset[(int(plan.positions[0]), plan.plan.box(0))]
    assert image.dtype == torch.float32 and image.shape == (3, 224, 224)
    assert image.min() < 0 < image.max()  # normalised, not 0..1
    assert label == loader.spec.entries[int(plan.positions[0])][1]


def test_the_loader_benchmark_takes_its_ratios_over_the_study_pipeline(synthetic):
    from profiling.loader_bench import run
    from profiling.render.loaders import reference_row
    from profiling.settings import LoaderBenchmark
    result = run(LoaderBenchmark(data=str(synthetic), backends=("dali-cpu", "pil"), batch_size=16, epochs=1,
                                 warmup=1, repeats=1, workers=0, eval_transform=True))
    assert reference_row(result["results"])["backend"] == "pil"
    assert {r["backend"] for r in result["results"]} == {"dali-cpu", "pil"}

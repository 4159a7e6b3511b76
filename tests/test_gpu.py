"""The GPU path: DALI's mixed decoder against the CPU pipeline. Needs CUDA; skipped elsewhere."""

from __future__ import annotations

import pytest
import torch

from planktonio import EVAL_TRANSFORM, TRAIN_AUGMENT, Output, make_loader
from planktonio.loaders import runnable_backends

pytestmark = pytest.mark.gpu


def test_mixed_decoder_matches_cpu_pipeline(synthetic):
    """Bound: mean difference < 1 grey level, 99.9% of values within 8.

    Both resize the same way (the same DALI kernels); the difference is the
    decoder: nvJPEG's CUDA IDCT and chroma upsampling (or the hardware
    decoder on A100/H100/H200) against libjpeg-turbo's.
    """
    gpu = make_loader("dali-gpu", synthetic, "valid", batch_size=8, device="cuda", workers=2)
    cpu = make_loader("dali-cpu", synthetic, "valid", batch_size=8, device="cpu", workers=2)
    std = torch.tensor(EVAL_TRANSFORM.std).view(1, 3, 1, 1)
    diffs = []
    for (x_gpu, y_gpu), (x_cpu, y_cpu) in zip(gpu, cpu, strict=True):
        assert x_gpu.is_cuda and y_gpu.is_cuda
        assert torch.equal(y_gpu.cpu(), y_cpu)
        diffs.append(((x_gpu.cpu() - x_cpu).abs() * std * 255).flatten())
    diff = torch.cat(diffs)
    assert diff.mean() < 1.0
    assert torch.quantile(diff[:: max(1, diff.numel() // 1_000_000)], 0.999) < 8


@pytest.mark.parametrize("backend", runnable_backends(torch.device("cuda")))
def test_every_backend_delivers_to_the_gpu(synthetic, backend):
    out = Output("float16", "NHWC")
    loader = make_loader(backend, synthetic, "train", batch_size=8, device="cuda", workers=2,
                         output=out, transform=TRAIN_AUGMENT)
    batches = list(loader)
    assert len(batches) == 64 // 8
    for images, labels in batches:
        assert images.is_cuda and labels.is_cuda and images.dtype == torch.float16
        assert images.shape == (8, 3, 224, 224) and images.is_contiguous(memory_format=torch.channels_last)

"""One training step, shared by the training loop and the profiling programs.

The named ranges (train/ranges.py: "forward", "backward", "optimizer", and
"data" from timing.py) show up in torch.profiler traces (record_function)
and, on a GPU, in Nsight Systems (NVTX); `python -m profiling inspect` reads
them back to split a step's time into waiting for data and computing.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F

from planktonio.errors import PlanktonioError
from planktonio.transforms import Output

from . import ranges

AMP_DTYPES = {"fp32": None, "amp-fp16": torch.float16, "amp-bf16": torch.bfloat16}


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision == "amp":  # fp16 tensor cores on GPUs (V100 has no bf16); bf16 on CPUs
        return "amp-fp16" if device.type == "cuda" else "amp-bf16"
    return precision


def has_bf16_hardware(capability: tuple[int, int]) -> bool:
    """Whether a GPU of this compute capability computes in bf16 natively.

    Ampere (8.0) and later. On a V100 (7.0) torch.cuda.is_bf16_supported()
    still says True (its default counts emulation: a bf16 tensor can be made),
    and autocast runs, but cuDNN's bf16 convolutions need sm_80
    (supportsBFloat16ConvolutionWithCuDNNv8: major >= 8), so convolutions fall
    back to slow native kernels: a bf16 measurement there says nothing useful.
    """
    return capability >= (8, 0)


def precisions_for(device: torch.device, wanted: tuple[str, ...]) -> tuple[tuple[str, ...], dict[str, str]]:
    """The precisions of `wanted` this device has hardware for, and why each left out was left out."""
    if device.type != "cuda":
        return tuple(wanted), {}
    capability = torch.cuda.get_device_capability(device)
    kept, left_out = [], {}
    for precision in wanted:
        if resolve_precision(precision, device) == "amp-bf16" and not has_bf16_hardware(capability):
            left_out[precision] = (f"compute capability {capability[0]}.{capability[1]} has no bf16 hardware "
                                   f"(needs 8.0): autocast would emulate it")
        else:
            kept.append(precision)
    return tuple(kept), left_out


def loader_output(precision: str, device: torch.device, channels_last: bool) -> Output:
    """What the loader should emit for this model: fp16 for fp16 autocast on a GPU (half the
    bytes), channels-last when the model is."""
    fp16 = precision == "amp-fp16" and device.type == "cuda"
    return Output("float16" if fp16 else "float32", "NHWC" if channels_last else "NCHW")


@contextmanager
def annotate(name: str, nvtx: bool = False):
    """A named range for torch.profiler, and for NVTX tools when nvtx=True (GPU runs)."""
    with torch.profiler.record_function(name):
        if nvtx:
            torch.cuda.nvtx.range_push(name)
        try:
            yield
        finally:
            if nvtx:
                torch.cuda.nvtx.range_pop()


def autocast(device: torch.device, amp_dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None)


def make_optimizer(name: str, model: torch.nn.Module, device: torch.device, lr: float,
                   momentum: float = 0.9, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """SGD or AdamW over the trainable parameters; fused kernels on a GPU.

    Fused, because GradScaler then hands the overflow check to the optimizer
    kernel (found_inf stays on the GPU); with the plain optimizers it reads
    found_inf on the host, a synchronisation every step.
    """
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise PlanktonioError("every parameter is frozen: nothing to train")
    fused = {"fused": True} if device.type == "cuda" else {}
    if name == "sgd":
        return torch.optim.SGD(trainable, lr=lr, momentum=momentum, weight_decay=weight_decay, **fused)
    return torch.optim.AdamW(trainable, lr=lr, weight_decay=weight_decay, **fused)


def make_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler:
    """Loss scaling for fp16 only (bf16 and fp32 have fp32's range)."""
    return torch.amp.GradScaler(device.type, enabled=precision == "amp-fp16")


def train_step(net, optimizer, scaler, images, labels, device: torch.device,
               amp_dtype: torch.dtype | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward, backward and optimizer step; returns (loss, logits), never waits for the GPU."""
    nvtx = device.type == "cuda"
    with annotate(ranges.FORWARD, nvtx), autocast(device, amp_dtype):
        logits = net(images)
        loss = F.cross_entropy(logits.float(), labels)
    with annotate(ranges.BACKWARD, nvtx):
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
    with annotate(ranges.OPTIMIZER, nvtx):
        scaler.step(optimizer)  # skips the update if fp16 gradients overflowed
        scaler.update()
    return loss, logits

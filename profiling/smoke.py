"""`python -m profiling smoke`: in under a minute, does every GPU path of this project work on this machine?

Run it first on a new machine or in a new job, before `profiling suite`: each
check is tried on its own and reported (ok, or the first line of what
failed), so one broken piece names itself instead of sinking the suite:
- every loader backend of the registry that runs on the device (not the peers:
  another project's loader is only measured): built, and a
  few batches taken (on a GPU: that they are cuda tensors of the right shape);
- a few mixed-precision training steps of the model (AlexNet; fp16 with loss
  scaling on a GPU, bf16 on a CPU) and fp32 ones: finite losses;
- where there are two GPUs or more, a 2-process NCCL all-reduce (gloo on a CPU).
Exits 1 when a check failed. `--json` writes the checks (kind "smoke").
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from planktonio import Output, make_loader
from planktonio.loaders import ROLES, resolve_device, runnable_backends
from planktonio.transforms import TRAIN_AUGMENT

from .measure import ResultFile, synchronize
from .settings import Smoke

BATCHES = 3
REPO = Path(__file__).resolve().parents[1]


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:300]


def check(name: str, work) -> dict:
    """Run one check; ok with what it found, or the first line of its error."""
    started = time.perf_counter()
    try:
        detail = work()
        ok = True
    except Exception as error:  # a check reports, it does not stop the others
        detail, ok = f"{type(error).__name__}: {_first_line(error)}", False
    return {"name": name, "ok": ok, "detail": detail, "seconds": time.perf_counter() - started}


def loader_check(bench: Smoke, backend: str, device: torch.device):
    def work() -> str:
        output = Output("float16" if device.type == "cuda" else "float32", "NHWC")
        with make_loader(backend, bench.data, "train", batch_size=bench.batch_size, device=device,
                         transform=TRAIN_AUGMENT, output=output, workers=min(4, os.cpu_count() or 1)) as loader:
            shapes = set()
            for index, (images, labels) in zip(range(BATCHES), loader):
                if images.device.type != device.type or labels.device.type != device.type:
                    raise RuntimeError(f"batch {index} is on {images.device}, not {device}")
                if not torch.isfinite(images.float()).all():
                    raise RuntimeError(f"batch {index} holds NaN or infinite values")
                shapes.add(tuple(images.shape))
            synchronize(device)
        return f"{BATCHES} batches of {sorted(shapes)}"
    return work


def training_check(bench: Smoke, precision: str, device: torch.device):
    def work() -> str:
        from train.model import build_model
        from train.step import AMP_DTYPES, loader_output, make_optimizer, make_scaler, resolve_precision, train_step
        resolved = resolve_precision(precision, device)
        model = build_model(bench.model, 17).to(device).train()
        optimizer = make_optimizer("sgd", model, device, lr=1e-3)
        scaler = make_scaler(resolved, device)
        out = loader_output(resolved, device, channels_last=False)
        images = torch.randn(8, 3, bench.image_size, bench.image_size, device=device).to(out.torch_dtype)
        labels = torch.randint(0, 17, (8,), device=device)
        losses = [train_step(model, optimizer, scaler, images, labels, device, AMP_DTYPES[resolved])[0]
                  for _ in range(bench.steps)]
        values = torch.stack(losses).float().tolist()
        if not all(torch.isfinite(torch.tensor(values))):
            raise RuntimeError(f"losses {values}")
        return f"{resolved}: {bench.steps} steps, losses {', '.join(f'{v:.3f}' for v in values)}"
    return work


# The training program's own path (train/distributed.py): the rank's device bound before the process group,
# given to it, then collectives on it; not a copy of that path that could pass while training fails.
ALL_REDUCE = """
import os, torch
from train import distributed
device = torch.device("cuda" if os.environ["SMOKE_BACKEND"] == "nccl" else "cpu")
with distributed.Session(device, 60) as ctx:
    total = distributed.all_sum([float(ctx.rank + 1)] * 4, ctx.device)
    peers = [peer[0] for peer in ctx.peers]
    assert total == [3.0] * 4 and peers == [0, 1], (total, peers)
"""


def all_reduce_check(backend: str):
    def work() -> str:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                   "--no-python", sys.executable, "-c", ALL_REDUCE]
        done = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=REPO,
                              env={**os.environ, "SMOKE_BACKEND": backend, "OMP_NUM_THREADS": "1",
                                   "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO),
                                                                               os.environ.get("PYTHONPATH")]))})
        if done.returncode != 0:
            raise RuntimeError((done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1])
        return f"2 processes, {backend}, the training program's start: 1 + 2 = 3 on every rank's own device"
    return work


def run(bench: Smoke, json_path=None, environment: dict | None = None) -> dict:
    device = resolve_device(bench.device)
    result = ResultFile(json_path, "smoke", environment=environment or {},
                        config={**vars(bench), "device": str(device)}, checks=[])
    # Another project's loader (a peer: FFCV) is measured, never run by a training or predicting job: its
    # set-up (a .beton, compiled code) is the loaders benchmark's cost, not the smoke test's.
    ours = tuple(role for role in ROLES if role != "peer")
    checks = [(f"loader {name}", loader_check(bench, name, device)) for name in runnable_backends(device, ours)]
    checks += [(f"training {precision}", training_check(bench, precision, device)) for precision in ("fp32", "amp")]
    if device.type == "cuda" and torch.cuda.device_count() >= 2:
        checks.append(("all-reduce nccl", all_reduce_check("nccl")))
    elif device.type == "cpu":
        checks.append(("all-reduce gloo", all_reduce_check("gloo")))
    for name, work in checks:
        outcome = check(name, work)
        print(f"smoke: {name}: {'ok' if outcome['ok'] else 'FAILED'} ({outcome['detail']})", flush=True)
        result.add("checks", outcome)
    return result.finish()

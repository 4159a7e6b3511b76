"""What every result carries: the machine and the software it was measured with."""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import shlex
import sys


def installed(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def command_line(argv: list | None = None) -> str:
    """`python -m profiling ARGS...` as typed: argv as given to main(argv) (the process's own by default)."""
    words = sys.argv[1:] if argv is None else argv
    return " ".join(shlex.quote(str(a)) for a in [os.path.basename(sys.executable), "-m", "profiling", *words])


def describe_environment(devices: bool = True, argv: list | None = None) -> dict:
    """The date, the command (argv: the arguments main() was given), the machine and the versions a result
    was measured with. devices=False: the versions as installed, without importing torch or asking for GPUs
    (reading traces needs neither, and importing torch costs most of a gigabyte of memory)."""
    if not devices:
        return {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": command_line(argv),
            "hostname": platform.node(), "cpu": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "python": platform.python_version(), "torch": installed("torch"),
            "torchvision": installed("torchvision"), "dali": installed("nvidia-dali-cuda120") or installed(
                "nvidia-dali-cuda130"), "device": None}
    import torch
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command_line(argv),
        "hostname": platform.node(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": "cpu",
    }
    try:
        import torchvision
        env["torchvision"] = torchvision.__version__
    except ImportError:
        env["torchvision"] = None
    try:
        import nvidia.dali
        env["dali"] = nvidia.dali.__version__
    except ImportError:
        env["dali"] = None
    if torch.cuda.is_available():
        env["device"] = torch.cuda.get_device_name(0)
        env["gpu_count"] = torch.cuda.device_count()
        try:
            import subprocess
            env["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=10).stdout.strip().splitlines()[0]
        except (OSError, IndexError, subprocess.SubprocessError):
            env["driver"] = None
    return env

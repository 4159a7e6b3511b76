"""`python -m planktonio doctor`: what this machine and this environment can run.

Run it on a login node after `make venv`, read it at the top of every Slurm
job log (slurm/common.sh runs it), and run it first when something is slow
or fails. It reports Python, torch, torchvision and DALI (versions and the
CUDA version each was built for), the GPU architectures torch carries
kernels for, every visible GPU and whether torch and DALI can run on it,
whether DALI can decode JPEGs in hardware there, the CPUs this process may
use, and NCCL. It ends with one line starting "doctor verdict:" and exits 1
when something cannot work:
- a GPU that torch has no kernels for (e.g. a V100 with a CUDA 13 torch);
- a GPU older than the DALI build supports;
- torch, torchvision and DALI built for different CUDA major versions (two
  CUDA runtimes in one process, exchanging tensors and streams);
- torchvision or DALI installed but failing to import;
- a JPEG decoder a loader needs failing on a small probe JPEG: DALI's CPU
  decoder, its mixed (GPU) decoder where a GPU is visible, torchvision.io's
  decode_jpeg. DALI 2.4 loads nvImageCodec only when a decoder operator is
  built, so an import that works says nothing about whether DALI can decode;
- two DALI builds visible for different CUDA major versions (e.g. a staged
  DALI first on PYTHONPATH beside the .venv's wheel); for one CUDA major
  version, a warning that names both folders;
- --require-gpu and no GPU visible.

This module judges and reports: the rules are pure functions in
planktonio/cuda_compatibility.py (tested on known GPUs), the facts are
gathered by planktonio/stack_probes.py. Without a GPU nothing creates a
CUDA context. docs/gpu.md.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path

from . import stack_probes as probes
from .cuda_compatibility import cuda_major
from .errors import PlanktonioError
from .files import write_atomic

VERDICT = "doctor verdict:"


# ------------------------------------------------------------------ the report


def diagnose(require_gpu: bool = False) -> dict:
    """Every fact, the problems (each one a reason the stack cannot work here), notes, and the verdict."""
    report, torch_said, cuda_failure = gather_facts()
    problems, notes, warned = [], list(torch_said), []
    if cuda_failure:
        problems.append(f"torch cannot start CUDA: {cuda_failure}")
    problems += _gpu_problems(report)  # the GPUs first: they are what a job came for
    _judge_libraries(report, problems, notes)
    problems += _decoder_problems(report)
    _judge_dali_builds(report["dali"], problems, warned)
    if report["gpus"] and not report["nccl"]["available"]:
        notes.append("NCCL is not available: multi-GPU training (torch.distributed on GPUs) cannot run")
    if not report["gpus"]:
        why = _no_gpu_reason(report)
        if require_gpu:
            problems.append(f"a GPU is required (--require-gpu) but none is visible: {why}")
        else:
            notes.append(f"no GPU visible ({why}): CPU only")
    report["problems"], report["notes"], report["warnings"], report["ok"] = problems, notes, warned, not problems
    report["verdict"] = _verdict(report)
    return report


def gather_facts() -> tuple[dict, list[str], str | None]:
    """The report's facts; torch's own warnings about the GPUs; why CUDA failed to start (None: it did not)."""
    torch_info = probes.torch_facts()
    dali = probes.dali_facts()
    gpus, torch_said, cuda_failure = probes.gpu_facts(torch_info["arch_list"], dali["cuda_major"])
    vision = probes.torchvision_facts()
    report = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "host": socket.gethostname(),
        "python": probes.python_facts(), "torch": torch_info, "torchvision": vision, "dali": dali,
        "nccl": probes.nccl_facts(), "cpus": probes.cpu_facts(), "driver": probes.driver_version(),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"), "gpus": gpus,
        "decoders": probes.decoder_facts(dali, vision, gpus),
    }
    return report, torch_said, cuda_failure


def _gpu_problems(report: dict) -> list[str]:
    """What torch or DALI cannot run on: one line per GPU model, not per GPU."""
    problems = []
    for same in _by_model(report["gpus"]):
        indices = ",".join(str(g["index"]) for g in same)
        label = (f"GPU{'s' if len(same) > 1 else ''} {indices} "
                 f"({same[0]['name']}, compute capability {same[0]['capability']})")
        if same[0]["torch"]["ok"] is False:
            problems.append(f"{label}: torch {report['torch']['version']} has {same[0]['torch']['reason']}")
        if same[0]["dali"]["ok"] is False:
            problems.append(f"{label}: {same[0]['dali']['reason']}")
    return problems


def _judge_libraries(report: dict, problems: list[str], notes: list[str]) -> None:
    """torchvision and DALI importable, and torch, torchvision and DALI built for one CUDA major version."""
    torch_info, tv, dali = report["torch"], report["torchvision"], report["dali"]
    for name, facts in (("torchvision", tv), ("DALI", dali)):
        if facts["error"]:
            problems.append(f"{name}: {facts['error']}")
        elif facts["version"] is None:
            notes.append(f"{name} is not installed: its loaders are unavailable (make venv installs it)")
    torch_major, dali_major, tv_major = cuda_major(torch_info["cuda"]), dali["cuda_major"], cuda_major(tv["cuda"])
    if torch_major is None:
        notes.append(f"torch {torch_info['version']} is a CPU-only build: it cannot use a GPU")
    if torch_major and dali_major and torch_major != dali_major:
        problems.append(f"torch is built for CUDA {torch_info['cuda']} but DALI for CUDA {dali_major} "
                        f"({dali['distribution']}), two CUDA runtimes in one process: install builds for one "
                        "CUDA major version (make venv: the CUDA 12 stack of constraints.txt)")
    if torch_major and tv_major and torch_major != tv_major:
        problems.append(f"torch is built for CUDA {torch_info['cuda']} but torchvision for CUDA {tv['cuda']}: "
                        "install them as a matching pair (constraints.txt)")


def _decoder_problems(report: dict) -> list[str]:
    problems = []
    for name, result in report["decoders"].items():
        if result["ok"] is False:
            what, who = probes.DECODERS[name]
            problems.append(f"{what} cannot decode a JPEG ({who}): {result['detail']}")
    return problems


def _judge_dali_builds(dali: dict, problems: list[str], warned: list[str]) -> None:
    """A DALI build besides the one imported: a warning, and a problem when it is for another CUDA major."""
    for other in dali["other_builds"]:
        here = f"{dali['location']} (CUDA {dali['cuda_major']})"
        there = f"{other['location']} ({other['name']} {other['version']}, CUDA {other['cuda_major']})"
        warned.append(f"two DALI builds visible: nvidia.dali is imported from {here}, and another is "
                      f"installed in {there}; which one a process imports depends on sys.path (PYTHONPATH)")
        if dali["cuda_major"] and other["cuda_major"] and dali["cuda_major"] != other["cuda_major"]:
            problems.append(f"two DALI builds for different CUDA major versions are visible, {here} and {there}: "
                            "uninstall one or take it off PYTHONPATH, so that every process imports the same")


def _by_model(gpus: list[dict]) -> list[list[dict]]:
    """The GPUs grouped by model (name and compute capability), in index order."""
    models: dict[tuple[str, str], list[dict]] = {}
    for gpu in gpus:
        models.setdefault((gpu["name"], gpu["capability"]), []).append(gpu)
    return list(models.values())


def _no_gpu_reason(report: dict) -> str:
    visible = report["cuda_visible_devices"]
    if visible is not None and visible.strip() in ("", "-1", "NoDevFiles"):
        return f"CUDA_VISIBLE_DEVICES={visible!r} hides every GPU"
    if report["torch"]["cuda"] is None:
        return "torch is a CPU-only build"
    if report["driver"] is None:
        return "no NVIDIA driver loaded on this machine"
    return f"NVIDIA driver {report['driver']} is loaded but torch sees no GPU (CUDA_VISIBLE_DEVICES={visible!r})"


def _verdict(report: dict) -> str:
    if report["problems"]:
        return f"{VERDICT} FAILED - " + "; ".join(report["problems"])
    torch_v, dali = report["torch"]["version"], report["dali"]["version"]
    libraries = f"torch {torch_v}" + (f" and DALI {dali}" if dali else "")
    gpus = report["gpus"]
    if not gpus:
        return f"{VERDICT} ok - no GPU visible: CPU only ({libraries})"
    names = sorted({g["name"] for g in gpus})
    return f"{VERDICT} ok - {len(gpus)} GPU(s) ({', '.join(names)}) usable by {libraries}"


def format_report(report: dict) -> str:
    tv, dali, nccl, cpus = report["torchvision"], report["dali"], report["nccl"], report["cpus"]

    def version(facts: dict, extra: str = "") -> str:
        if facts["version"] is None:
            return facts["error"] or "not installed"
        built = f", built for CUDA {facts['cuda']}" if facts["cuda"] else ", CPU-only build"
        return f"{facts['version']}{extra}{built}"

    torch_info = report["torch"]
    rows = [
        ("python", f"{report['python']['version']} ({report['python']['executable']})"),
        ("torch", version(torch_info) + f"; kernels: {' '.join(torch_info['arch_list']) or 'none'}"),
        ("torchvision", version(tv)),
        ("DALI", version(dali, f" ({dali['distribution']})" if dali["distribution"] else "")),
        ("NCCL", nccl["version"] if nccl["available"] else "not available"),
        ("CPUs", f"{cpus['usable']} usable by this process, of {cpus['node']} on the node"
                 + (f"; Slurm: {_slurm_summary(cpus['slurm'])}" if cpus["slurm"] else "")),
        ("driver", report["driver"] or "no NVIDIA driver loaded"),
    ]
    if not report["gpus"]:
        rows.append(("GPUs", "none visible to torch"))
    for same in _by_model(report["gpus"]):
        gpu = same[0]
        jpeg = ("hardware JPEG decoder (NVJPG)" if gpu["hardware_jpeg_decoder"]
                else "no hardware JPEG decoder: nvJPEG on CUDA cores")
        rows.append((f"GPU{'s' if len(same) > 1 else ''} {','.join(str(g['index']) for g in same)}",
                     f"{gpu['name']}, compute capability {gpu['capability']}, "
                     f"{gpu['memory_bytes'] / 2**30:.1f} GiB; torch: {_yes_no(gpu['torch'])}; "
                     f"DALI: {_yes_no(gpu['dali'])}; {jpeg}"))
    rows.append(("JPEG decode", "; ".join(_decoded(name, result) for name, result in report["decoders"].items())))
    lines = [f"planktonio doctor on {report['host']} at {report['time']}"]
    lines += [f"  {name:<12} {text}" for name, text in rows]
    lines += [f"  warning: {warning}" for warning in report["warnings"]]
    lines += [f"  note: {note}" for note in report["notes"]]  # the problems are in the verdict line
    return "\n".join(lines)


def _decoded(name: str, result: dict) -> str:
    label = {"dali:cpu": "DALI cpu", "dali:mixed": "DALI mixed", "torchvision.io": "torchvision.io"}[name]
    if result["ok"] is None:
        return f"{label} {result['detail']}"
    return f"{label} {'ok' if result['ok'] else 'FAILED'} ({result['detail']})"


def _yes_no(compatibility: dict) -> str:
    word = {True: "yes", False: "NO", None: "unknown"}[compatibility["ok"]]
    return f"{word} ({compatibility['reason']})"


def _slurm_summary(slurm: dict) -> str:
    parts = [f"job {slurm.get('SLURM_JOB_ID', '?')}"]
    if "SLURM_CPUS_PER_TASK" in slurm:
        parts.append(f"{slurm['SLURM_CPUS_PER_TASK']} CPUs per task")
    if "SLURM_CPUS_ON_NODE" in slurm:
        parts.append(f"{slurm['SLURM_CPUS_ON_NODE']} CPUs on this node")
    if slurm.get("SLURM_JOB_GPUS"):
        parts.append(f"GPUs {slurm['SLURM_JOB_GPUS']}")
    return ", ".join(parts)


def run_doctor(json_path: Path | None = None, require_gpu: bool = False) -> int:
    """Print the report (and write it as JSON); 0 when the stack can work here, 1 when it cannot."""
    report = diagnose(require_gpu=require_gpu)
    print(format_report(report))
    if json_path is not None:
        try:
            json_path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(json_path, json.dumps(report, indent=2) + "\n")
        except OSError as error:
            raise PlanktonioError(f"cannot write the doctor's report to {json_path}: {error.strerror}") from None
    print(report["verdict"], file=sys.stdout if report["ok"] else sys.stderr)
    return 0 if report["ok"] else 1

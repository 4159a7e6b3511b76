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

The rules are pure functions at the top (tested on known GPUs); the facts
are gathered below them. Without a GPU nothing here creates a CUDA context. docs/gpu.md.
"""

from __future__ import annotations

import functools
import importlib.metadata
import io
import json
import os
import platform
import re
import socket
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import PlanktonioError
from .files import write_atomic

VERDICT = "doctor verdict:"

# ------------------------------------------------------------------ the rules


@dataclass(frozen=True)
class Compatibility:
    ok: bool | None  # None: cannot tell (the library is not installed)
    reason: str


_ARCH = re.compile(r"^(sm|compute)_(\d+)([af]?)$")


def _parse_arch(entry: str) -> tuple[str, tuple[int, int], str] | None:
    """One -gencode target: sm_86 -> ("sm", (8, 6), ""), compute_90a -> ("compute", (9, 0), "a")."""
    match = _ARCH.match(entry)
    if not match:
        return None
    kind, number, suffix = match.groups()
    return kind, (int(number[:-1]), int(number[-1])), suffix


def torch_can_run(arch_list: list[str], capability: tuple[int, int]) -> Compatibility:
    """Whether a torch built with these -gencode targets has kernels for a GPU of this compute capability.

    CUDA's rules (CUDA C++ Programming Guide, "Binary Compatibility" and
    "PTX Compatibility"): a cubin for sm_XY runs on X.Z for Z >= Y (same major
    version only); an arch-specific cubin (sm_90a) runs on exactly that
    capability; PTX for compute_XY is compiled by the driver at first use on
    any GPU of capability >= X.Y (slow first start, but it runs).
    """
    need = f"{capability[0]}.{capability[1]}"
    if not arch_list:
        return Compatibility(False, "this torch is a CPU-only build (no CUDA kernels)")
    known = [(entry, parsed) for entry in arch_list if (parsed := _parse_arch(entry))]
    cubins = [(entry, arch, suffix) for entry, (kind, arch, suffix) in known if kind == "sm"]
    ptx = [(entry, arch, suffix) for entry, (kind, arch, suffix) in known if kind == "compute"]
    for entry, arch, _ in cubins:
        if arch == capability:
            return Compatibility(True, f"{entry} kernels")
    for entry, arch, suffix in sorted(cubins, key=lambda c: c[1], reverse=True):  # the closest first
        if suffix != "a" and arch[0] == capability[0] and arch[1] < capability[1]:
            return Compatibility(True, f"{entry} kernels (binary compatible within major version {arch[0]})")
    for entry, arch, suffix in ptx:
        if suffix != "a" and arch <= capability:
            return Compatibility(True, f"PTX {entry}, compiled by the driver at first use (slow first start)")
    wanted = f"sm_{capability[0]}{capability[1]}"
    return Compatibility(False, f"no kernels for compute capability {need}: torch carries "
                                f"{' '.join(arch_list)}; this GPU needs {wanted} (or PTX at or below it)")


# The oldest GPU each DALI build supports, from DALI's support matrix
# (https://docs.nvidia.com/deeplearning/dali/user-guide/docs/support_matrix.html:
# cuda110 SM 3.5+, cuda120 SM 5.0+ on x86_64). CUDA 13 itself starts at
# Turing (SM 7.5): it dropped Maxwell, Pascal and Volta.
DALI_MIN_CAPABILITY = {11: (3, 5), 12: (5, 0), 13: (7, 5)}


def dali_can_run(dali_cuda_major: int | None, capability: tuple[int, int]) -> Compatibility:
    if dali_cuda_major is None:
        return Compatibility(None, "DALI not installed")
    oldest = DALI_MIN_CAPABILITY.get(dali_cuda_major)
    if oldest is None:
        return Compatibility(None, f"unknown DALI build for CUDA {dali_cuda_major}")
    build = f"cuda{dali_cuda_major}0"
    if capability >= oldest:
        return Compatibility(True, f"DALI {build} runs on SM {oldest[0]}.{oldest[1]} and later")
    return Compatibility(False, f"DALI {build} needs SM {oldest[0]}.{oldest[1]} or later, "
                                f"this GPU is {capability[0]}.{capability[1]}")


# GPUs with NVJPG engines, which nvJPEG's hardware backend drives. DALI's
# mixed decoder uses that backend "if the hardware is available" (DALI docs,
# https://docs.nvidia.com/deeplearning/dali/user-guide/docs/operations/nvidia.dali.fn.decoders.image.html;
# disabled with drivers older than 455). nvJPEG's documentation ("Hardware
# Acceleration", https://docs.nvidia.com/cuda/nvjpeg/index.html) names the
# data-centre parts A100, A30 and H100; the same chips (GA100: A800, GH100:
# H200, H800, GH200) and Blackwell's data-centre parts carry the engines too.
# V100, T4 and GeForce/RTX cards have none: nvJPEG decodes on CUDA cores there
# and hw_decoder_load has no effect. This table is what to expect, not a probe:
# a GPU missing from it is reported without a hardware decoder.
_HARDWARE_JPEG = re.compile(r"\b(A100|A800|A30|H100|H200|H800|GH200|B100|B200|B300|GB200|GB300)\b",
                            re.IGNORECASE)


def has_hardware_jpeg_decoder(gpu_name: str) -> bool:
    return bool(_HARDWARE_JPEG.search(gpu_name))


def cuda_major(version: str | None) -> int | None:
    """The major version of a CUDA version string: 12.8 -> 12 (None when unknown)."""
    if not version:
        return None
    try:
        return int(str(version).split(".")[0])
    except ValueError:
        return None


# ------------------------------------------------------------------ the facts


def _distributions():
    """Every installed distribution (importlib.metadata's, sys.path order): what the tests simulate."""
    return importlib.metadata.distributions()


def _dali_wheels() -> list[dict]:
    """Every installed DALI distribution: its name, version, the folder its nvidia/dali files are in,
    and the CUDA major version its name says (nvidia-dali-cuda120: 12)."""
    wheels = {}
    for dist in _distributions():
        name = dist.metadata["Name"] or ""
        if not name.lower().startswith("nvidia-dali"):
            continue
        folder = str(Path(dist.locate_file("nvidia/dali")).resolve())
        major = re.search(r"cuda(\d\d)\d$", name)
        wheels[(name, folder)] = {"name": name, "version": dist.version, "location": folder,
                                  "cuda_major": int(major.group(1)) if major else None}
    return sorted(wheels.values(), key=lambda w: (w["name"], w["location"]))


def python_facts() -> dict:
    return {"version": platform.python_version(), "executable": sys.executable}


def torch_facts() -> dict:
    import torch
    # _cuda_getArchFlags answers without a GPU; torch.cuda.get_arch_list() is
    # empty unless CUDA is available.
    flags = getattr(torch._C, "_cuda_getArchFlags", lambda: None)()
    return {"version": torch.__version__, "cuda": torch.version.cuda,
            "arch_list": flags.split() if flags else []}


def torchvision_facts() -> dict:
    facts = {"version": None, "cuda": None, "error": None}
    try:
        import torchvision
    except ModuleNotFoundError as error:
        if error.name != "torchvision":
            facts["error"] = f"import failed: {error}"
        return facts
    except Exception as error:  # e.g. built for another torch: "operator torchvision::nms does not exist"
        facts["error"] = f"import failed: {type(error).__name__}: {error}"
        return facts
    facts["version"] = torchvision.__version__
    built = getattr(torchvision.version, "cuda", None)  # e.g. 12080, absent for CPU builds
    if isinstance(built, int) and built > 0:
        facts["cuda"] = f"{built // 1000}.{built % 1000 // 10}"
    elif built:
        facts["cuda"] = str(built)
    return facts


def dali_facts() -> dict:
    facts = {"version": None, "cuda": None, "cuda_major": None, "distribution": None, "location": None,
             "other_builds": [], "error": None}
    try:
        import nvidia.dali as dali
    except ModuleNotFoundError as error:
        if error.name not in ("nvidia", "nvidia.dali"):  # DALI is there, something it needs is not
            facts["error"] = f"import failed: {error}"
        return facts
    except Exception as error:
        facts["error"] = f"import failed: {type(error).__name__}: {error}"
        return facts
    facts["version"] = dali.__version__
    # __cuda_version__ is the toolkit version with the dots removed
    # (int("12.9.86".replace(".", "")) == 12986): CUDA majors since 10 have two
    # digits and minors one, so the first three digits are major and minor.
    built = str(getattr(dali, "__cuda_version__", "") or "")
    if len(built) >= 3 and built.isdigit():
        facts["cuda"] = f"{built[:2]}.{built[2]}"
    imported = Path(dali.__file__).resolve().parent
    facts["location"] = str(imported)
    wheels = _dali_wheels()
    facts["distribution"] = ", ".join(w["name"] for w in wheels) or None
    # The wheels whose files are the package imported here, and the others (in another folder: a staged
    # DALI first on PYTHONPATH, or a wheel it shadows), which another sys.path order would import.
    own = [w for w in wheels if w["location"] == str(imported)]
    facts["other_builds"] = [w for w in wheels if w["location"] != str(imported)]
    # The wheel's name says which CUDA major it is for (nvidia-dali-cuda120,
    # -cuda130): the authority when the toolkit number is odd, but only for the
    # copy that is imported.
    majors = {w["cuda_major"] for w in own if w["cuda_major"]}
    facts["cuda_major"] = majors.pop() if len(majors) == 1 else cuda_major(facts["cuda"])
    if len(own) > 1:
        facts["error"] = (f"{len(own)} DALI builds installed in {imported} "
                          f"({', '.join(w['name'] for w in own)}); they share the nvidia.dali package: "
                          "uninstall all but one")
    return facts


def nccl_facts() -> dict:
    import torch
    import torch.distributed as dist
    available = dist.is_available() and dist.is_nccl_available()
    version = None
    if available:
        try:
            raw = torch.cuda.nccl.version()
            version = ".".join(map(str, raw)) if isinstance(raw, tuple) else str(raw)
        except Exception:  # NCCL library present in name only
            available = False
    return {"available": available, "version": version}


SLURM_KEYS = ("SLURM_JOB_ID", "SLURM_JOB_NODELIST", "SLURMD_NODENAME", "SLURM_NTASKS",
              "SLURM_CPUS_PER_TASK", "SLURM_CPUS_ON_NODE", "SLURM_GPUS_ON_NODE", "SLURM_JOB_GPUS")


def cpu_facts() -> dict:
    # From planktonio.cores, not the loaders: importing the loaders imports every backend (torchvision,
    # DALI), and the doctor must report a broken one, not die of it.
    from .cores import available_cpus
    usable = available_cpus()  # under Slurm: this task's share of the node
    slurm = {key: os.environ[key] for key in SLURM_KEYS if key in os.environ}
    return {"usable": usable, "node": os.cpu_count(), "slurm": slurm or None}


def driver_version() -> str | None:
    """The NVIDIA kernel driver's version, read without touching CUDA (None: no driver loaded)."""
    try:
        text = Path("/proc/driver/nvidia/version").read_text()
    except OSError:
        return None
    match = re.search(r"Kernel Module\s+(?:for \S+\s+)?(\d[\w.]*)", text)
    return match.group(1) if match else text.splitlines()[0].strip()


def gpu_facts(arch_list: list[str], dali_major: int | None) -> tuple[list[dict], list[str], str | None]:
    """Every GPU torch sees, with what can run on it; torch's own warnings (old driver,
    unsupported GPU); and why CUDA failed to start, if it did (None when it did not)."""
    import torch
    gpus, failure = [], None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            # device_count() asks NVML or the runtime for a count; properties
            # are read only for GPUs that exist: no context without a GPU.
            for index in range(torch.cuda.device_count()):
                props = torch.cuda.get_device_properties(index)
                capability = (props.major, props.minor)
                gpus.append({
                    "index": index, "name": props.name, "capability": f"{props.major}.{props.minor}",
                    "memory_bytes": props.total_memory,
                    "torch": asdict(torch_can_run(arch_list, capability)),
                    "dali": asdict(dali_can_run(dali_major, capability)),
                    "hardware_jpeg_decoder": has_hardware_jpeg_decoder(props.name),
                })
        except RuntimeError as error:  # e.g. a driver too old for this CUDA, a GPU in a bad state
            failure = " ".join(str(error).split())
    said = [" ".join(str(w.message).split()) for w in caught]
    return gpus, said, failure


# A probe JPEG: a flat colour, not square, so a decoder that swaps width and
# height or channels shows. Flat colours survive JPEG almost exactly: each
# decoder here (DALI cpu, torchvision.io) gives (201, 40, 90), 1 level off.
PROBE_SIZE = (16, 8)  # width, height
PROBE_COLOUR = (200, 40, 90)
PROBE_TOLERANCE = 6  # grey levels


@functools.cache
def probe_jpeg() -> bytes:
    from PIL import Image
    buffer = io.BytesIO()
    Image.new("RGB", PROBE_SIZE, PROBE_COLOUR).save(buffer, "JPEG", quality=95)
    return buffer.getvalue()


def _decode_dali(data: bytes, device: str):
    """One JPEG through a one-sample DALI pipeline: cpu needs no GPU (device_id=None: no CUDA
    context), mixed decodes on GPU 0. The decoder operator is built, and nvImageCodec loaded, here."""
    import numpy as np
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=1, num_threads=1, device_id=None if device == "cpu" else 0, prefetch_queue_depth=1)
    def decode():
        encoded = fn.external_source(source=lambda: [np.frombuffer(data, dtype=np.uint8)], batch=True)
        return fn.decoders.image(encoded, device=device, output_type=types.RGB)

    pipe = decode()
    pipe.build()
    (images,) = pipe.run()
    if device == "mixed":
        images = images.as_cpu()
    image = np.array(images.at(0))
    del pipe
    return image


def _decode_dali_cpu(data: bytes):
    return _decode_dali(data, "cpu")


def _decode_dali_mixed(data: bytes):
    return _decode_dali(data, "mixed")


def _decode_torchvision(data: bytes):
    import torch
    from torchvision.io import decode_jpeg
    return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8)).permute(1, 2, 0).numpy()


DECODERS = {  # name: (what it is, who fails with it)
    "dali:cpu": ("DALI's CPU decoder", "every DALI backend fails when it builds its pipeline"),
    "dali:mixed": ("DALI's mixed (GPU) decoder", "dali-gpu and the cache on a GPU fail when they build"),
    "torchvision.io": ("torchvision.io's decode_jpeg", "the torchvision backend and prepare cannot decode"),
}


def _cause(error: Exception) -> str:
    """The line of an error that says why. DALI frames its cause ("Critical error when building
    pipeline: / Error in CPU operator ... / encountered:"): the first line after "encountered:"."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if "encountered:" in lines and lines.index("encountered:") + 1 < len(lines):
        return lines[lines.index("encountered:") + 1]
    return lines[0] if lines else type(error).__name__


def _judge(image) -> dict:
    """Whether a decoded probe (height x width x channels, uint8) is the probe."""
    import numpy as np
    shape = [int(n) for n in image.shape]
    width, height = PROBE_SIZE
    if shape != [height, width, 3]:
        return {"ok": False, "shape": shape, "detail": f"decoded to {shape}, expected [{height}, {width}, 3]"}
    off = int(np.abs(image.astype(int) - np.array(PROBE_COLOUR)).max())
    if off > PROBE_TOLERANCE:
        return {"ok": False, "shape": shape,
                "detail": f"decoded colour off by {off} levels (more than {PROBE_TOLERANCE}): a broken decoder"}
    return {"ok": True, "shape": shape,
            "detail": f"{width} x {height} px, 3 channels, colour within {off} level{'s' if off != 1 else ''}"}


def decoder_facts(dali: dict, torchvision: dict, gpus: list[dict]) -> dict:
    """Each JPEG decoder a loader here would use, tried on the probe: {name: {ok, shape, detail}}
    (ok None: not tried, and why). The mixed decoder only where a GPU is visible that DALI runs on."""
    dali_works = dali["version"] is not None and not dali["error"]
    reasons = {
        "dali:cpu": None if dali_works else "not tried: DALI not installed or not importable",
        "dali:mixed": ("not tried: DALI not installed or not importable" if not dali_works
                       else "not tried: no GPU visible" if not gpus
                       else "not tried: DALI cannot run on GPU 0" if gpus[0]["dali"]["ok"] is False else None),
        "torchvision.io": (None if torchvision["version"] is not None and not torchvision["error"]
                           else "not tried: torchvision not installed or not importable"),
    }
    decode = {"dali:cpu": _decode_dali_cpu, "dali:mixed": _decode_dali_mixed, "torchvision.io": _decode_torchvision}
    results = {}
    for name, reason in reasons.items():
        if reason:
            results[name] = {"ok": None, "shape": None, "detail": reason}
            continue
        try:
            results[name] = _judge(decode[name](probe_jpeg()))
        except Exception as error:  # whatever a decoder raises is the report, not the doctor's end
            results[name] = {"ok": False, "shape": None, "detail": _cause(error)}
    return results


# ------------------------------------------------------------------ the report


def diagnose(require_gpu: bool = False) -> dict:
    """Every fact, the problems (each one a reason the stack cannot work here), notes, and the verdict."""
    torch_info = torch_facts()
    dali = dali_facts()
    gpus, torch_said, cuda_failure = gpu_facts(torch_info["arch_list"], dali["cuda_major"])
    vision = torchvision_facts()
    report = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "host": socket.gethostname(),
        "python": python_facts(), "torch": torch_info, "torchvision": vision, "dali": dali,
        "nccl": nccl_facts(), "cpus": cpu_facts(), "driver": driver_version(),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"), "gpus": gpus,
        "decoders": decoder_facts(dali, vision, gpus),
    }
    problems, notes, warned = [], list(torch_said), []
    if cuda_failure:
        problems.append(f"torch cannot start CUDA: {cuda_failure}")

    # The GPUs first: they are what a job came for. One line per model, not per GPU.
    for same in _by_model(gpus):
        indices = ",".join(str(g["index"]) for g in same)
        label = (f"GPU{'s' if len(same) > 1 else ''} {indices} "
                 f"({same[0]['name']}, compute capability {same[0]['capability']})")
        if same[0]["torch"]["ok"] is False:
            problems.append(f"{label}: torch {torch_info['version']} has {same[0]['torch']['reason']}")
        if same[0]["dali"]["ok"] is False:
            problems.append(f"{label}: {same[0]['dali']['reason']}")
    tv, torch_major, dali_major = report["torchvision"], cuda_major(torch_info["cuda"]), dali["cuda_major"]
    for name, facts in (("torchvision", tv), ("DALI", dali)):
        if facts["error"]:
            problems.append(f"{name}: {facts['error']}")
        elif facts["version"] is None:
            notes.append(f"{name} is not installed: its loaders are unavailable (make venv installs it)")
    if torch_major is None:
        notes.append(f"torch {torch_info['version']} is a CPU-only build: it cannot use a GPU")
    if torch_major and dali_major and torch_major != dali_major:
        problems.append(f"torch is built for CUDA {torch_info['cuda']} but DALI for CUDA {dali_major} "
                        f"({dali['distribution']}), two CUDA runtimes in one process: install builds for one "
                        "CUDA major version (make venv: the CUDA 12 stack of constraints.txt)")
    tv_major = cuda_major(tv["cuda"])
    if torch_major and tv_major and torch_major != tv_major:
        problems.append(f"torch is built for CUDA {torch_info['cuda']} but torchvision for CUDA {tv['cuda']}: "
                        "install them as a matching pair (constraints.txt)")
    for name, result in report["decoders"].items():
        if result["ok"] is False:
            what, who = DECODERS[name]
            problems.append(f"{what} cannot decode a JPEG ({who}): {result['detail']}")
    for other in dali["other_builds"]:
        here = f"{dali['location']} (CUDA {dali['cuda_major']})"
        there = f"{other['location']} ({other['name']} {other['version']}, CUDA {other['cuda_major']})"
        warned.append(f"two DALI builds visible: nvidia.dali is imported from {here}, and another is "
                      f"installed in {there}; which one a process imports depends on sys.path (PYTHONPATH)")
        if dali["cuda_major"] and other["cuda_major"] and dali["cuda_major"] != other["cuda_major"]:
            problems.append(f"two DALI builds for different CUDA major versions are visible, {here} and {there}: "
                            "uninstall one or take it off PYTHONPATH, so that every process imports the same")
    if gpus and not report["nccl"]["available"]:
        notes.append("NCCL is not available: multi-GPU training (torch.distributed on GPUs) cannot run")
    if not gpus:
        why = _no_gpu_reason(report)
        if require_gpu:
            problems.append(f"a GPU is required (--require-gpu) but none is visible: {why}")
        else:
            notes.append(f"no GPU visible ({why}): CPU only")

    report["problems"], report["notes"], report["warnings"], report["ok"] = problems, notes, warned, not problems
    report["verdict"] = _verdict(report)
    return report


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

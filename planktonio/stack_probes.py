"""The facts `python -m planktonio doctor` reports: the installed stack (Python, torch, torchvision,
DALI, NCCL), the CPUs and the NVIDIA driver, every visible GPU with what can run on it, and each JPEG
decoder a loader uses, tried on a small probe JPEG.

Each probe reports what fails (a library that does not import, a decoder that cannot decode) rather
than raising: the doctor exists to say what is broken. Without a GPU nothing here creates a CUDA
context. The rules applied to these facts are in planktonio/cuda_compatibility.py.
"""

from __future__ import annotations

import functools
import importlib.metadata
import io
import os
import platform
import re
import sys
import warnings
from dataclasses import asdict
from pathlib import Path

from .cuda_compatibility import cuda_major, dali_can_run, has_hardware_jpeg_decoder, torch_can_run


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

"""Which GPU a torch or DALI build can run on, and whether a GPU decodes JPEGs in hardware.

Pure functions of version strings, -gencode targets and compute capabilities, so that they can be
tested on GPUs this machine does not have; planktonio/stack_probes.py feeds them the facts of this
machine, and `python -m planktonio doctor` (planktonio/doctor.py) reports their answers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


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

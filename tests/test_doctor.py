"""`python -m planktonio doctor`, and the environment `make` builds: one CUDA 12 stack with Volta kernels."""

from __future__ import annotations

import importlib.metadata
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from planktonio import doctor, stack_probes
from planktonio.cuda_compatibility import cuda_major, dali_can_run, has_hardware_jpeg_decoder, torch_can_run

from .helpers import REPO, run_planktonio

# torch._C._cuda_getArchFlags() of torch 2.14.1 (CUDA 13.0), the pin before
# issue 8, and of torch 2.10.0 (CUDA 12.8), the pin since.
CUDA13_TORCH = "sm_75 sm_80 sm_86 sm_90 sm_100 sm_120".split()
CUDA12_TORCH = "sm_70 sm_75 sm_80 sm_86 sm_90 sm_100 sm_120".split()
V100, A100, RTX4090, H100, RTX5090 = (7, 0), (8, 0), (8, 9), (9, 0), (12, 0)

no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the report of a machine without a GPU")


# ------------------------------------------------------------------ the environment


@pytest.mark.skipif(sys.prefix != str(REPO / ".venv"),
                    reason=f"checks the environment `make venv` builds ({REPO / '.venv'}), not {sys.prefix}")
def test_the_environment_make_builds_runs_on_volta_with_one_cuda_major_version():
    pins = dict(line.split("==") for line in (REPO / "constraints.txt").read_text().splitlines()
                if "==" in line and not line.lstrip().startswith("#"))
    # The ffcv extra's pins (FFCV and the OpenCV build it pulls in) hold where it is installed (.ci/run).
    optional = {"ffcv", "opencv-python"}
    assert optional <= set(pins)
    installed = {name: _version(name) for name in pins}
    assert {name: installed[name] for name in pins if name not in optional} == \
        {name: pin for name, pin in pins.items() if name not in optional}, \
        "the .venv is not the one constraints.txt pins: run `make venv`"
    assert all(installed[name] in (None, pins[name]) for name in optional), installed

    torch_info, dali, vision = stack_probes.torch_facts(), stack_probes.dali_facts(), stack_probes.torchvision_facts()
    assert "sm_70" in torch_info["arch_list"], torch_info["arch_list"]
    assert torch_can_run(torch_info["arch_list"], V100).ok
    assert cuda_major(torch_info["cuda"]) == dali["cuda_major"] == cuda_major(vision["cuda"]) == 12


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name).split("+")[0]
    except importlib.metadata.PackageNotFoundError:
        return None


# ------------------------------------------------------------------ the rules


@pytest.mark.parametrize("arch_list, capability, ok, says", [
    (CUDA13_TORCH, V100, False, "needs sm_70"),         # the old pin on Cirrus: no kernel image
    (CUDA12_TORCH, V100, True, "sm_70 kernels"),
    (CUDA12_TORCH, H100, True, "sm_90 kernels"),
    (CUDA13_TORCH, H100, True, "sm_90 kernels"),
    (CUDA12_TORCH, A100, True, "sm_80 kernels"),
    (CUDA12_TORCH, RTX4090, True, "sm_86 kernels (binary compatible"),  # 8.9 runs 8.6 cubins
    (CUDA12_TORCH, RTX5090, True, "sm_120 kernels"),
    (["sm_80"], V100, False, "needs sm_70"),             # cubins never run on an older GPU
    (["sm_90a"], (10, 0), False, "needs sm_100"),        # arch-specific cubins run on exactly one
    (["compute_70"], H100, True, "PTX compute_70"),      # PTX only: the driver compiles it
    (["compute_80"], V100, False, "needs sm_70"),        # PTX for a newer GPU does not help
    ([], V100, False, "CPU-only build"),
])
def test_which_gpus_a_torch_build_can_run_on(arch_list, capability, ok, says):
    verdict = torch_can_run(arch_list, capability)
    assert verdict.ok is ok
    assert says in verdict.reason


def test_which_gpus_a_dali_build_can_run_on():
    assert dali_can_run(12, V100).ok is True
    assert dali_can_run(13, V100).ok is False and "SM 7.5" in dali_can_run(13, V100).reason
    assert dali_can_run(13, H100).ok is True
    assert dali_can_run(None, V100).ok is None


@pytest.mark.parametrize("name, hardware", [
    ("NVIDIA A100-SXM4-80GB", True), ("NVIDIA A30", True), ("NVIDIA H100 80GB HBM3", True),
    ("NVIDIA H200", True), ("NVIDIA GH200 480GB", True), ("NVIDIA B200", True),
    ("Tesla V100-SXM2-16GB", False), ("Tesla T4", False), ("NVIDIA A40", False),
    ("NVIDIA GeForce RTX 4090", False), ("NVIDIA RTX A3000 Laptop GPU", False),
])
def test_hardware_jpeg_decoder_by_gpu(name, hardware):
    assert has_hardware_jpeg_decoder(name) is hardware


# ------------------------------------------------------------------ the command here


@no_gpu
def test_doctor_here_says_there_is_no_gpu_and_passes(tmp_path, capsys):
    code, out, err = run_planktonio(["doctor", "--json", tmp_path / "doctor.json"], capsys)
    assert code == 0, err
    last = out.strip().splitlines()[-1]
    assert last.startswith("doctor verdict: ok - no GPU visible"), last
    report = json.loads((tmp_path / "doctor.json").read_text())
    assert report["ok"] is True and report["gpus"] == [] and report["verdict"] == last
    assert {"python", "torch", "torchvision", "dali", "nccl", "cpus", "driver", "cuda_visible_devices", "gpus",
            "problems", "notes", "ok", "verdict", "host", "time"} <= report.keys()
    assert report["torch"].keys() >= {"version", "cuda", "arch_list"} and report["torch"]["arch_list"]
    assert report["torchvision"].keys() >= {"version", "cuda"} and report["torchvision"]["version"]
    assert report["dali"].keys() >= {"version", "cuda", "cuda_major", "distribution"} and report["dali"]["version"]
    assert report["nccl"].keys() >= {"available", "version"}
    assert report["cpus"]["usable"] >= 1 and report["cpus"]["node"] >= report["cpus"]["usable"]
    assert report["python"]["version"] == ".".join(map(str, sys.version_info[:3]))


@no_gpu
def test_doctor_fails_when_a_gpu_is_required_and_none_is_visible(capsys):
    code, _, err = run_planktonio(["doctor", "--require-gpu"], capsys)
    assert code == 1
    assert "doctor verdict: FAILED - a GPU is required (--require-gpu) but none is visible" in err


# ------------------------------------------------------------------ simulated machines


def fake_gpus(monkeypatch, *gpus):
    """torch sees these (name, (major, minor)) GPUs; nothing else in torch.cuda is touched. Their DALI
    mixed decoder works: the CPU decoder stands in for it (this machine has no GPU to run it on)."""
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(gpus))
    props = [SimpleNamespace(name=name, major=cap[0], minor=cap[1], total_memory=16 * 2**30) for name, cap in gpus]
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: props[index])
    monkeypatch.setattr(stack_probes, "_decode_dali_mixed", stack_probes._decode_dali_cpu)


def test_a_v100_node_with_the_cuda13_torch_fails_with_the_reason(monkeypatch, capsys):
    fake_gpus(monkeypatch, ("Tesla V100-SXM2-16GB", V100), ("Tesla V100-SXM2-16GB", V100))
    monkeypatch.setattr(stack_probes, "torch_facts",
                        lambda: {"version": "2.14.1+cu130", "cuda": "13.0", "arch_list": CUDA13_TORCH})
    assert doctor.run_doctor() == 1
    err = capsys.readouterr().err
    assert "doctor verdict: FAILED - GPUs 0,1 (Tesla V100-SXM2-16GB, compute capability 7.0): torch 2.14.1" in err
    assert "needs sm_70" in err
    # the other half of the old environment: a CUDA 13 torch beside DALI's cuda120 build
    assert "torch is built for CUDA 13.0 but DALI for CUDA 12" in err


def test_a_v100_node_with_this_torch_passes_without_a_hardware_decoder(monkeypatch, capsys, tmp_path):
    fake_gpus(monkeypatch, ("Tesla V100-SXM2-16GB", V100))
    assert doctor.run_doctor(tmp_path / "doctor.json") == 0
    out = capsys.readouterr().out
    assert "doctor verdict: ok - 1 GPU(s) (Tesla V100-SXM2-16GB) usable by torch" in out
    assert "no hardware JPEG decoder" in out
    gpu = json.loads((tmp_path / "doctor.json").read_text())["gpus"][0]
    assert gpu["capability"] == "7.0" and gpu["memory_bytes"] == 16 * 2**30
    assert gpu["torch"] == {"ok": True, "reason": "sm_70 kernels"} and gpu["dali"]["ok"] is True
    assert gpu["hardware_jpeg_decoder"] is False


def test_an_h100_has_the_hardware_decoder(monkeypatch):
    fake_gpus(monkeypatch, ("NVIDIA H100 80GB HBM3", H100))
    report = doctor.diagnose()
    assert report["ok"] and report["gpus"][0]["hardware_jpeg_decoder"] is True
    assert "hardware JPEG decoder (NVJPG)" in doctor.format_report(report)


def test_missing_torchvision_and_dali_are_reported_not_fatal(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchvision", None)  # `import torchvision` now fails as if absent
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)
    report = doctor.diagnose()
    assert report["torchvision"]["version"] is None and report["dali"]["version"] is None
    assert report["dali"]["cuda_major"] is None
    assert any(n.startswith("torchvision is not installed") for n in report["notes"])
    assert any(n.startswith("DALI is not installed") for n in report["notes"])
    assert report["ok"], report["problems"]
    assert "DALI         not installed" in doctor.format_report(report)


def test_a_torchvision_that_fails_to_import_is_a_problem(monkeypatch, tmp_path):
    broken = tmp_path / "torchvision"
    broken.mkdir()
    (broken / "__init__.py").write_text("raise RuntimeError('operator torchvision::nms does not exist')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "torchvision", raising=False)
    report = doctor.diagnose()
    assert not report["ok"]
    assert "torchvision: import failed: RuntimeError: operator torchvision::nms does not exist" in report["verdict"]


def test_a_gpu_torch_cannot_start_is_a_problem(monkeypatch):
    def fail(index):
        raise RuntimeError("The NVIDIA driver on your system is too old (found version 11040).")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_properties", fail)
    report = doctor.diagnose()
    assert not report["ok"]
    assert "torch cannot start CUDA: The NVIDIA driver on your system is too old" in report["verdict"]


# ------------------------------------------------------------------ decoding a JPEG, as the loaders will


@no_gpu
def test_the_cpu_decoders_decode_the_probe_jpeg_here():
    report = doctor.diagnose()
    decoders = report["decoders"]
    for name in ("dali:cpu", "torchvision.io"):
        assert decoders[name]["ok"] is True, decoders[name]
        assert decoders[name]["shape"] == [8, 16, 3]  # height, width, channels: a 16 x 8 px probe
        assert "colour within" in decoders[name]["detail"]
    assert decoders["dali:mixed"] == {"ok": None, "shape": None, "detail": "not tried: no GPU visible"}
    assert report["ok"]
    assert "  JPEG decode  DALI cpu ok (16 x 8 px, 3 channels, colour within" in doctor.format_report(report)


# What DALI 2.4 raises when its decoder cannot load nvImageCodec (the C++ text, framed by the pipeline).
DALI_FRAME = ("Critical error when building pipeline:\nError in CPU operator `nvidia.dali.fn.decoders.image`,\n"
              "which was used in the pipeline definition with the following traceback:\n\n"
              '  File "planktonio/doctor.py", line 1, in decode\n\nencountered:\n\n{}\n'
              "Current pipeline object is no longer valid.")
NO_NVIMGCODEC = ("dlopen libnvimgcodec.so failed!. Please install nvImageCodec: See "
                 "https://developer.nvidia.com/nvimgcodec-downloads or simply do `pip install nvidia-nvimgcodec-cu12`.")
OLD_NVIMGCODEC = ("DALI requires nvImageCodec at minimum version 0.6.0, but got 0.5.0. Please upgrade: See "
                  "https://developer.nvidia.com/nvimgcodec-downloads or simply do `pip install nvidia-nvimgcodec-cu12~=0.6.0`.")


@pytest.mark.parametrize("cause", [NO_NVIMGCODEC, OLD_NVIMGCODEC])
def test_a_dali_decoder_that_cannot_load_nvimagecodec_fails_the_verdict(monkeypatch, capsys, cause):
    def fails(data):
        raise RuntimeError(DALI_FRAME.format(cause))
    monkeypatch.setattr(stack_probes, "_decode_dali_cpu", fails)
    assert doctor.run_doctor() == 1
    verdict = capsys.readouterr().err.strip()
    assert verdict.startswith("doctor verdict: FAILED - DALI's CPU decoder cannot decode a JPEG") and "\n" not in verdict
    assert verdict.endswith(cause), verdict  # the line that says why, not DALI's frame around it


def fake_distributions(monkeypatch, *wheels):
    """importlib.metadata lists these (name, folder of its nvidia/dali) DALI wheels beside the real others."""
    real = [d for d in importlib.metadata.distributions()
            if not (d.metadata["Name"] or "").lower().startswith("nvidia-dali")]
    fakes = [SimpleNamespace(metadata={"Name": name}, version="2.4.0",
                             locate_file=lambda path, site=site: site.parent.parent / path) for name, site in wheels]
    monkeypatch.setattr(stack_probes, "_distributions", lambda: real + fakes)


def test_two_dali_builds_for_different_cuda_majors_are_flagged_and_fail(monkeypatch, tmp_path, capsys):
    """The staged CUDA 13 DALI of the GPU host (pip --target, its own dist-info) put first on PYTHONPATH
    beside the CUDA 12 wheel of the .venv: which one a process imports depends on sys.path."""
    import nvidia.dali
    mine = Path(nvidia.dali.__file__).parent
    staged = tmp_path / "dali-site" / "nvidia" / "dali"
    fake_distributions(monkeypatch, ("nvidia-dali-cuda120", mine), ("nvidia-dali-cuda130", staged))
    assert doctor.run_doctor() == 1
    captured = capsys.readouterr()
    warning = [line for line in captured.out.splitlines() if line.startswith("  warning: two DALI builds")]
    assert len(warning) == 1 and str(mine) in warning[0] and str(staged) in warning[0], captured.out
    assert "doctor verdict: FAILED - " in captured.err and "CUDA 12" in captured.err and "CUDA 13" in captured.err
    assert str(staged) in captured.err and "\n" not in captured.err.strip()


def test_two_dali_builds_for_one_cuda_major_are_a_warning(monkeypatch, tmp_path):
    import nvidia.dali
    mine = Path(nvidia.dali.__file__).parent
    other = tmp_path / "site" / "nvidia" / "dali"
    fake_distributions(monkeypatch, ("nvidia-dali-cuda120", mine), ("nvidia-dali-cuda120", other))
    report = doctor.diagnose()
    assert report["ok"], report["problems"]
    assert any(str(other) in w and str(mine) in w for w in report["warnings"])
    assert report["dali"]["cuda_major"] == 12


def test_an_imported_dali_that_is_not_the_installed_one_is_flagged(monkeypatch, tmp_path):
    """Only a CUDA 13 wheel installed elsewhere, while the nvidia.dali imported is this CUDA 12 build:
    the wheel's name must not be taken for the imported build's CUDA version."""
    import nvidia.dali
    elsewhere = tmp_path / "site" / "nvidia" / "dali"
    fake_distributions(monkeypatch, ("nvidia-dali-cuda130", elsewhere))
    report = doctor.diagnose()
    assert report["dali"]["cuda_major"] == 12 and report["dali"]["location"] == str(Path(nvidia.dali.__file__).parent)
    assert not report["ok"] and any(str(elsewhere) in p for p in report["problems"])


def test_two_dali_wheels_in_one_folder_are_still_a_problem(monkeypatch):
    """Both wrote nvidia/dali in one site-packages: their files are mixed, whatever their CUDA versions."""
    import nvidia.dali
    mine = Path(nvidia.dali.__file__).parent
    fake_distributions(monkeypatch, ("nvidia-dali-cuda120", mine), ("nvidia-dali-nightly-cuda120", mine))
    report = doctor.diagnose()
    assert not report["ok"] and f"2 DALI builds installed in {mine.resolve()}" in report["verdict"]
    assert report["warnings"] == []

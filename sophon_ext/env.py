"""``sophon env``: the versions, compiled library, CPU and GPUs to paste into a bug report."""

from __future__ import annotations

import os
import platform
import sys
from importlib import metadata
from pathlib import Path

import torch

from .ops import extension_info
from ._optional import installed_extras
from ._version import __version__

# /proc/cpuinfo flags that decide which CPU kernels run (csrc/cpu/*_avx2.cpp need avx2 + fma).
ISA_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_bf16", "amx_tile")


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> list[str]:
    """The ISA_FLAGS this CPU reports (empty where /proc/cpuinfo is absent)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return []
    for line in text.splitlines():
        if line.startswith("flags"):
            present = set(line.partition(":")[2].split())
            return [flag for flag in ISA_FLAGS if flag in present]
    return []


def _cpu_capability() -> str | None:
    try:
        return torch.backends.cpu.get_cpu_capability()
    except (AttributeError, RuntimeError):
        return None


def _cuda_devices() -> list[dict]:
    if not torch.cuda.is_available():
        return []
    devices = []
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        devices.append({"index": index, "name": props.name, "capability": f"{props.major}.{props.minor}",
                        "memory_gib": round(props.total_memory / 2**30, 1)})
    return devices


def _package_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def environment_report() -> dict:
    """Everything that decides which code runs and how fast, as plain data."""
    ext = extension_info()
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        affinity = os.cpu_count()
    return {
        "sophon_ext": __version__,
        "sophon_ext_location": str(Path(__file__).resolve().parent),
        "torch": torch.__version__,
        "torch_build": f"CUDA {torch.version.cuda}" if torch.version.cuda else "cpu",
        "compiled_library": {
            "loaded": ext["cpu"],
            "cuda_kernels": ext["cuda"],
            "built_for_torch": ext["torch"],
            "path": ext["library"],
            "why_not_loaded": ext["error"],
        },
        "cpu": {
            "machine": platform.machine(),
            "torch_capability": _cpu_capability(),
            "isa_flags": cpu_flags(),
            "torch_threads": torch.get_num_threads(),
            "cores_available": affinity,
        },
        "cuda_devices": _cuda_devices(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "extras": installed_extras(),
        "packages": {name: _package_version(name) for name in ("numpy", "safetensors", "pyyaml", "tqdm", "scikit-learn",
                                                                "mlxtend", "matplotlib", "pillow")},
    }


def format_report(report: dict) -> str:
    """The report as aligned ``name: value`` lines."""
    lib = report["compiled_library"]
    if lib["loaded"]:
        library = f"loaded ({'CPU + CUDA' if lib['cuda_kernels'] else 'CPU'} kernels) from {lib['path']}"
    else:
        library = f"NOT loaded: {lib['why_not_loaded']}"
    cpu = report["cpu"]
    gpus = [f"cuda:{d['index']} {d['name']} (sm {d['capability']}, {d['memory_gib']} GiB)" for d in report["cuda_devices"]]
    extras = ", ".join(f"{extra} {'yes' if ok else 'no'}" for extra, ok in report["extras"].items())
    missing = [extra for extra, ok in report["extras"].items() if not ok]
    if missing:
        extras += f" (to add: pip install 'sophon_ext[{','.join(missing)}]')"
    packages = [f"{name} {version}" for name, version in report["packages"].items() if version]
    rows = [
        ("sophon_ext", f"{report['sophon_ext']} ({report['sophon_ext_location']})"),
        ("torch", f"{report['torch']} ({report['torch_build']})"),
        ("compiled library", library),
        ("built for torch", lib["built_for_torch"] or "unknown"),
        ("CPU", f"{cpu['machine']}, torch capability {cpu['torch_capability'] or 'unknown'}, "
                f"flags {' '.join(cpu['isa_flags']) or 'unknown'}"),
        ("threads", f"{cpu['torch_threads']} torch threads, {cpu['cores_available']} cores available"),
        ("CUDA devices", "; ".join(gpus) or "none"),
        ("python", report["python"]),
        ("platform", report["platform"]),
        ("extras", extras),
        ("packages", ", ".join(packages)),
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name + ':':<{width + 1}} {value}" for name, value in rows)

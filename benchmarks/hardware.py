"""The machine and software a benchmark ran on, recorded beside its figures."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

import lightning as L
import ray
import torch
import torchvision


def cpu_model() -> str:
    """The CPU's marketing name on Linux (/proc/cpuinfo), else what the platform module knows."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def commit() -> str:
    """The checkout's commit, with "-dirty" when uncommitted changes may have shaped the figures."""
    done = subprocess.run(
        ["git", "describe", "--always", "--dirty"], cwd=Path(__file__).parent, capture_output=True, text=True
    )
    return done.stdout.strip() if done.returncode == 0 else "unknown"


def describe() -> dict[str, str | int | None]:
    return {
        "cpu": cpu_model(),
        "cpus": os.cpu_count(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "lightning": L.__version__,
        "ray": ray.__version__,
        "commit": commit(),
    }


def caption(hardware: dict) -> str:
    """One line for above the table."""
    return (
        f"{hardware['cpu']} ({hardware['cpus']} CPUs), GPU: {hardware['gpu'] or 'none'}; torch {hardware['torch']}, "
        f"ray {hardware['ray']}, lightning {hardware['lightning']}; medvq commit {hardware['commit']}"
    )

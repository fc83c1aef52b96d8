"""The whole job, small: `jobs/sweep.py --smoke` in a subprocess, as a user runs it (it starts its own Ray
instance, or joins one already running on this machine), timed end to end, with the per-step seconds it writes
to summary.md."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from medvq.config import Config

from common import Row, timed

REPO = Path(__file__).resolve().parents[1]


def step_seconds(summary: str) -> dict[str, float]:
    """summary.md's `seconds: ray_init 3.1, search 50.2, ...` line -> {"ray_init": 3.1, "search": 50.2, ...}."""
    line = next(line for line in summary.splitlines() if line.startswith("seconds:"))
    pairs = (item.strip().rsplit(" ", 1) for item in line.removeprefix("seconds:").split(","))
    return {name: float(value) for name, value in pairs}


def measure(config: Config, out: Path) -> dict:
    command = [sys.executable, "jobs/sweep.py", "--smoke", "--data-root", config.data_root,
               "--datasets", ",".join(config.datasets), "--accelerator", config.accelerator, "--out", str(out)]
    print("sweep: " + " ".join(command[1:]), flush=True)
    seconds, done = timed(subprocess.run, command, cwd=REPO)  # its output passes through, errors included
    if done.returncode != 0:
        raise RuntimeError(f"jobs/sweep.py --smoke exited with {done.returncode}: its output is above")
    return {"total_seconds": seconds, "steps": step_seconds((out / "summary.md").read_text())}


def rows(results: dict) -> list[Row]:
    steps = ", ".join(f"{name} {value:.1f} s" for name, value in results["steps"].items())
    return [("whole job", "jobs/sweep.py --smoke (2 tiny trials, encode, UMAP, probes, plots)",
             f"{results['total_seconds']:.0f} s wall", steps)]

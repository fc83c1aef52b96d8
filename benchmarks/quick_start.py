"""The README's quick start (jobs/sweep.py --smoke) timed beside its floor: the same interpreter importing the job's
modules and starting Ray, then exiting as a job does (run_job stops the Ray it started). Both are timed from outside,
as a user waits for them; the floor is taken before and after the job, and the lower is the one compared (this
machine's other work only adds time).

    python benchmarks/quick_start.py --data-root DATA --datasets bloodmnist,pneumoniamnist,retinamnist,breastmnist
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from common import Row, benchmark_parser, run_benchmark, timed
from ray_cost import step_seconds

from medvq.cli import run_job
from medvq.config import Config

REPO = Path(__file__).resolve().parents[1]
# jobs/sweep.py run as a module of another name: its imports, not its main; then a job that only starts Ray
FLOOR = "import runpy; runpy.run_path('jobs/sweep.py'); from medvq.cli import run_job, start_ray; run_job(start_ray)"


def floor_seconds() -> float:
    """Seconds to import everything jobs/sweep.py imports, start a local Ray instance and stop it as a job does."""
    seconds, done = timed(subprocess.run, [sys.executable, "-c", FLOOR], cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"the floor's process failed: {done.stderr[-2000:]}")
    return seconds


def measure(config: Config, args: argparse.Namespace, work: Path) -> dict:
    floors = [floor_seconds()]
    out = work / "smoke"
    data = ("--data-root", config.data_root, "--datasets", ",".join(config.datasets))
    command = [sys.executable, "jobs/sweep.py", "--smoke", *data, "--out", str(out)]
    print("quick start: " + " ".join(command[1:]), flush=True)
    seconds, done = timed(subprocess.run, command, cwd=REPO)  # its output passes through, errors included
    if done.returncode != 0:
        raise RuntimeError(f"jobs/sweep.py exited with {done.returncode}: its output is above")
    floors.append(floor_seconds())
    return {"floor_seconds": floors, "total_seconds": seconds, "steps": step_seconds((out / "summary.md").read_text())}


def rows(results: dict) -> list[Row]:
    floor, total = min(results["floor_seconds"]), results["total_seconds"]
    steps = ", ".join(f"{name} {value:.1f} s" for name, value in results["steps"].items())
    floors = " and ".join(f"{value:.1f}" for value in results["floor_seconds"])
    return [
        ("floor", "import the job's modules, start Ray (before and after the job)", f"{floors} s", "1.0x"),
        ("quick start", "jobs/sweep.py --smoke, as the README runs it", f"{total:.1f} s wall", f"{total / floor:.1f}x"),
        ("its steps", "the job's own `seconds:` line", steps, ""),
    ]


def main() -> None:
    parser = benchmark_parser(__doc__, "quick-start.json")
    run_benchmark(parser, measure, rows)


if __name__ == "__main__":
    run_job(main)

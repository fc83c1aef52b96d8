"""The whole job: `jobs/sweep.py` in a subprocess, as a user runs it (it starts its own Ray instance, or joins
one already running on this machine), timed end to end, with the per-step seconds it writes to summary.md.

Two shapes: `--smoke` (2 tiny trials, a row of benchmarks/run.py), and the issue's packed sweep (16 trials of
20 epochs, several per GPU: `python benchmarks/sweep_job.py --gpus-per-trial 0.25 ...`).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

from common import Row, add_data_source_flags, data_root, timed

from medvq.cli import JobParser, run_job
from medvq.config import Config

REPO = Path(__file__).resolve().parents[1]
# 4 codebook sizes x 4 commitment weights, 20 epochs: the sweep the GPU goal is set for.
PACKED_FLAGS = ("--codebook-sizes", "64,128,256,512", "--commitment-weights", "0.1,0.25,0.5,1.0", "--num-samples", "1")
PACKED_EPOCHS = 20


def step_seconds(summary: str) -> dict[str, float]:
    """summary.md's `seconds: ray_init 3.1, search 50.2, ...` line -> {"ray_init": 3.1, "search": 50.2, ...}."""
    line = next(line for line in summary.splitlines() if line.startswith("seconds:"))
    pairs = (item.strip().rsplit(" ", 1) for item in line.removeprefix("seconds:").split(","))
    return {name: float(value) for name, value in pairs}


def measure(config: Config, out: Path, flags: tuple[str, ...] = ("--smoke",)) -> dict:
    command = [
        sys.executable,
        "jobs/sweep.py",
        *flags,
        "--data-root",
        config.data_root,
        "--datasets",
        ",".join(config.datasets),
        "--accelerator",
        config.accelerator,
        "--out",
        str(out),
    ]
    print("sweep: " + " ".join(command[1:]), flush=True)
    seconds, done = timed(subprocess.run, command, cwd=REPO)  # its output passes through, errors included
    if done.returncode != 0:
        raise RuntimeError(f"jobs/sweep.py exited with {done.returncode}: its output is above")
    return {"flags": list(flags), "total_seconds": seconds, "steps": step_seconds((out / "summary.md").read_text())}


def rows(
    results: dict, contender: str = "jobs/sweep.py --smoke (2 tiny trials, encode, UMAP, probes, plots)"
) -> list[Row]:
    steps = ", ".join(f"{name} {value:.1f} s" for name, value in results["steps"].items())
    return [("whole job", contender, f"{results['total_seconds']:.0f} s wall", steps)]


def main() -> None:
    parser = JobParser("time the packed sweep: 16 trials of 20 epochs, several per GPU")
    add_data_source_flags(parser)
    parser.add_argument("--gpus-per-trial", type=float, default=0.25, help="default: %(default)s (4 trials per GPU)")
    parser.add_argument("--epochs", type=int, default=PACKED_EPOCHS, help="default: %(default)s")
    parser.add_argument("--out", default="packed-sweep.json", help="raw numbers as JSON (default: %(default)s)")
    args = parser.parse_args()
    flags = (*PACKED_FLAGS, "--epochs", str(args.epochs), "--gpus-per-trial", str(args.gpus_per_trial))
    with tempfile.TemporaryDirectory(prefix="medvq-packed-sweep-") as work:
        config = Config(data_root=data_root(args, Path(work)), datasets=args.datasets)
        results = measure(config, Path(work) / "sweep", flags)
    contender = f"jobs/sweep.py, 16 trials x {args.epochs} epochs, {args.gpus_per_trial:g} GPU per trial"
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print("\n" + "\n".join("| " + " | ".join(row) + " |" for row in rows(results, contender)))


if __name__ == "__main__":
    run_job(main)

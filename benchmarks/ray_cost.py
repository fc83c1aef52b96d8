"""What Ray costs: medvq's training step in this process against a Ray Train worker; and the whole job.

The step is timed with torch on every core and on one thread, with how often the machine's other processes woke up
meanwhile; the whole job is `jobs/sweep.py` in a subprocess, as a user runs it, with the seconds of its steps.

A step with torch on every core waits at each parallel operation for its slowest thread, so a thread that loses
its core to another process for a moment holds up the whole step. Ray's processes wake up many times a second
even when idle, and a Train run adds several (its controller and helper actors). With one torch thread a core is
left for them, and the worker's step should cost what this process's does.

    python benchmarks/ray_cost.py --data-root DATA --datasets bloodmnist,pneumoniamnist,retinamnist,breastmnist
    python benchmarks/ray_cost.py --synthetic --datasets bloodmnist --sweep packed --gpus-per-trial 0.25  # a GPU
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import torch
from common import Row, benchmark_parser, ray_session, run_benchmark, timed, train_step
from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from medvq.cli import NON_NEGATIVE, run_job
from medvq.config import Config
from medvq.model import VQVAE

REPO = Path(__file__).resolve().parents[1]
WARMUP_STEPS, STEPS, SMOKE_STEPS = 3, 60, 3
# 4 codebook sizes x 4 commitment weights: the sweep the GPU goal is set for (16 trials of 20 epochs).
PACKED_FLAGS = ("--codebook-sizes", "64,128,256,512", "--commitment-weights", "0.1,0.25,0.5,1.0", "--num-samples", "1")
PACKED_EPOCHS = 20


def context_switches(exclude_pid: int) -> dict[str, int] | None:
    """{thread: its context switches so far} of every thread of every process but `exclude_pid` (Linux's /proc;
    None elsewhere)."""
    if not Path("/proc/self/task").exists():
        return None
    switches = {}
    for status in Path("/proc").glob("[0-9]*/task/*/status"):
        if status.parts[2] == str(exclude_pid):
            continue
        try:
            lines = status.read_text().splitlines()
        except OSError:
            continue  # the thread ended while being read
        switches[str(status.parent)] = sum(int(line.split()[1]) for line in lines if "ctxt_switches" in line)
    return switches


def wakeups_per_second(before: dict[str, int] | None, after: dict[str, int] | None, seconds: float) -> float:
    """Context switches per second between two `context_switches`, of the threads alive at both (NaN off Linux)."""
    if before is None or after is None:
        return float("nan")
    return sum(after[thread] - before[thread] for thread in before.keys() & after.keys()) / seconds


def time_steps(config_dict: dict, threads: int, steps: int) -> dict[str, float]:
    """The median seconds of medvq's training step (its model, Adam, one fixed random batch; no data loading, no
    Lightning) on `threads` torch threads, and the other processes' wake-ups per second while it ran."""
    config = Config.from_dict(config_dict)
    torch.set_num_threads(threads)
    torch.manual_seed(config.seed)
    model = VQVAE(config).to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate)
    x = torch.rand(config.batch_size, 3, config.size, config.size).contiguous(memory_format=torch.channels_last)
    seconds = []
    for step in range(WARMUP_STEPS + steps):
        if step == WARMUP_STEPS:
            switches, window_start = context_switches(os.getpid()), time.perf_counter()
        started = time.perf_counter()
        train_step(model, optimizer, x)
        seconds.append(time.perf_counter() - started)
    wakeups = wakeups_per_second(switches, context_switches(os.getpid()), time.perf_counter() - window_start)
    return {"step_seconds": float(np.median(seconds[WARMUP_STEPS:])), "other_wakeups_per_second": wakeups}


def _worker(loop_config: dict) -> None:
    """Writes `time_steps`' figures per thread count to a file: Ray Train keeps only metrics reported with a
    checkpoint, and the local Ray instance's worker shares this machine's disk."""
    config, steps = loop_config["config_dict"], loop_config["steps"]
    figures = {threads: time_steps(config, threads, steps) for threads in loop_config["thread_counts"]}
    Path(loop_config["out"]).write_text(json.dumps(figures))


def in_ray_worker(config: Config, thread_counts: list[int], steps: int, work: Path) -> dict[int, dict[str, float]]:
    """`time_steps` at each thread count in turn, in the one worker of a Ray Train run holding every CPU (as
    train_speed.py's 1-worker run has); one run, since each start of Ray Train costs seconds."""
    name = f"step-{uuid.uuid4().hex[:8]}"
    out = work / f"{name}.json"
    TorchTrainer(
        _worker,
        train_loop_config={
            "config_dict": config.to_dict(),
            "thread_counts": thread_counts,
            "steps": steps,
            "out": str(out),
        },
        scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": os.cpu_count()}),
        run_config=RunConfig(name=name, storage_path=str(work / "ray_results")),
    ).fit()
    return {int(threads): figures for threads, figures in json.loads(out.read_text()).items()}


def train_step_cost(config: Config, steps: int, work: Path) -> dict[str, dict]:
    """For every core and for one thread: the step in this process (before Ray starts), then in a Ray worker."""
    counts = sorted({os.cpu_count() or 1, 1}, reverse=True)
    print(f"Ray Train's overhead: {steps} CPU training steps on {' and '.join(map(str, counts))} threads", flush=True)
    plain = {threads: time_steps(config.to_dict(), threads, steps) for threads in counts}
    with ray_session():
        worker = in_ray_worker(config, counts, steps, work)
    return {f"{n}_threads": {"threads": n, "plain": plain[n], "ray_worker": worker[n]} for n in counts}


def step_seconds(summary: str) -> dict[str, float]:
    """summary.md's `seconds: ray_init 3.1, search 50.2, ...` line -> {"ray_init": 3.1, "search": 50.2, ...}."""
    line = next(line for line in summary.splitlines() if line.startswith("seconds:"))
    pairs = (item.strip().rsplit(" ", 1) for item in line.removeprefix("seconds:").split(","))
    return {name: float(value) for name, value in pairs}


def sweep_shape(args: argparse.Namespace, config: Config) -> tuple[tuple[str, ...], str]:
    """(jobs/sweep.py's flags, the row's contender) for --sweep smoke or packed."""
    if args.sweep == "smoke":
        return ("--smoke",), "jobs/sweep.py --smoke (2 tiny trials, encode, UMAP, probes, plots)"
    if args.sweep == "default":
        return (), "jobs/sweep.py at its defaults (15 trials, the final fit, encode, UMAP, probes, plots)"
    flags = (*PACKED_FLAGS, "--epochs", str(config.epochs), "--gpus-per-trial", str(args.gpus_per_trial))
    return flags, f"jobs/sweep.py, 16 trials x {config.epochs} epochs, {args.gpus_per_trial:g} GPU per trial"


def whole_job(config: Config, args: argparse.Namespace, out: Path) -> dict:
    flags, contender = sweep_shape(args, config)
    data = ("--data-root", config.data_root, "--datasets", ",".join(config.datasets))
    command = [sys.executable, "jobs/sweep.py", *flags, *data, "--accelerator", config.accelerator, "--out", str(out)]
    print("sweep: " + " ".join(command[1:]), flush=True)
    seconds, done = timed(subprocess.run, command, cwd=REPO)  # its output passes through, errors included
    if done.returncode != 0:
        raise RuntimeError(f"jobs/sweep.py exited with {done.returncode}: its output is above")
    steps = step_seconds((out / "summary.md").read_text())
    return {"contender": contender, "flags": list(flags), "total_seconds": seconds, "steps": steps}


def measure(config: Config, args: argparse.Namespace, work: Path) -> dict:
    results = {"train_step": train_step_cost(config, SMOKE_STEPS if args.smoke else STEPS, work)}
    if args.sweep != "none":
        results["sweep"] = whole_job(config, args, work / "sweep")
    return results


def rows(results: dict) -> list[Row]:
    table = []
    for result in results["train_step"].values():
        plain, worker, threads = result["plain"], result["ray_worker"], result["threads"]
        table.append(
            (
                "Ray Train's overhead",
                f"CPU training step (no data, no Lightning), torch on {threads} thread{'s' if threads > 1 else ''}: "
                "this process / a Ray Train worker",
                f"{1000 * plain['step_seconds']:.0f} / {1000 * worker['step_seconds']:.0f} ms; other processes woke "
                f"{plain['other_wakeups_per_second']:,.0f} / {worker['other_wakeups_per_second']:,.0f} times/s",
                f"{worker['step_seconds'] / plain['step_seconds']:.2f}x in the worker",
            )
        )
    if "sweep" in results:
        sweep = results["sweep"]
        steps = ", ".join(f"{name} {value:.1f} s" for name, value in sweep["steps"].items())
        table.append(("whole job", sweep["contender"], f"{sweep['total_seconds']:.0f} s wall", steps))
    return table


def main() -> None:
    parser = benchmark_parser(__doc__, "ray-cost.json")
    parser.add_argument(
        "--sweep",
        choices=("smoke", "packed", "default", "none"),
        default="smoke",
        help="the whole job timed: jobs/sweep.py --smoke (2 tiny trials; minutes on a laptop CPU), the packed "
        "sweep (16 trials of --epochs, several per GPU: the GPU goal), the job at its defaults (an hour on a CPU; "
        "issue 32's five minutes on one GPU), or none (default: %(default)s)",
    )
    parser.add_settings(Config, ("epochs",), epochs=PACKED_EPOCHS)  # of each packed-sweep trial
    parser.add_argument(
        "--gpus-per-trial", type=NON_NEGATIVE, default=0.25, help="of the packed sweep (default: %(default)s)"
    )
    run_benchmark(parser, measure, rows)


if __name__ == "__main__":
    run_job(main)

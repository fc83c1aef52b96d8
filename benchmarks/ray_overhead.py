"""Where Ray Train's epoch overhead on a small CPU machine comes from: medvq's training step timed in this process
and in a Ray Train worker, with torch on every core and on one thread, and how often the machine's other
processes woke up meanwhile.

A step with torch on every core waits at each parallel operation for its slowest thread, so a thread that loses
its core to another process for a moment holds up the whole step. Ray's processes wake up many times a second
even when idle, and a Train run adds several (its controller and helper actors). With one torch thread a core is
left for them, and the worker's step should cost what this process's does.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from common import Row, ray_session
from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from medvq.config import Config
from medvq.model import VQVAE

WARMUP_STEPS = 3


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
    Lightning) on `threads` torch threads, and the other processes' wake-ups per second while it ran. The
    process's torch thread count is restored afterwards, for the benchmark's later sections."""
    config = Config.from_dict(config_dict)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _time_steps(config, steps)
    finally:
        torch.set_num_threads(previous_threads)


def _time_steps(config: Config, steps: int) -> dict[str, float]:
    torch.manual_seed(config.seed)
    model = VQVAE(config).to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate)
    x = torch.rand(config.batch_size, 3, config.size, config.size).contiguous(memory_format=torch.channels_last)
    seconds = []
    for step in range(WARMUP_STEPS + steps):
        if step == WARMUP_STEPS:
            switches, window_start = context_switches(os.getpid()), time.perf_counter()
        started = time.perf_counter()
        recon, quantized = model(x)
        loss = F.mse_loss(recon, x) + quantized.commitment_loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        seconds.append(time.perf_counter() - started)
    wakeups = wakeups_per_second(switches, context_switches(os.getpid()), time.perf_counter() - window_start)
    return {"step_seconds": float(np.median(seconds[WARMUP_STEPS:])), "other_wakeups_per_second": wakeups}


def _worker(loop_config: dict) -> None:
    """Writes `time_steps`' figures to a file: Ray Train keeps only metrics reported with a checkpoint, and the
    local Ray instance's worker shares this machine's disk."""
    result = time_steps(loop_config["config_dict"], loop_config["threads"], loop_config["steps"])
    Path(loop_config["out"]).write_text(json.dumps(result))


def in_ray_worker(config: Config, threads: int, steps: int, work: Path) -> dict[str, float]:
    """`time_steps` in the one worker of a Ray Train run holding every CPU, as `benchmarks/training.py`'s run has."""
    name = f"step-{uuid.uuid4().hex[:8]}"
    out = work / f"{name}.json"
    TorchTrainer(
        _worker,
        train_loop_config={"config_dict": config.to_dict(), "threads": threads, "steps": steps, "out": str(out)},
        scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": os.cpu_count()}),
        run_config=RunConfig(name=name, storage_path=str(work / "ray_results")),
    ).fit()
    return json.loads(out.read_text())


def measure(config: Config, steps: int, work: Path) -> dict[str, dict]:
    """For every core and for one thread: the step in this process (before Ray starts), then in a Ray worker."""
    counts = sorted({os.cpu_count() or 1, 1}, reverse=True)
    print(f"Ray Train's overhead: {steps} CPU training steps on {' and '.join(map(str, counts))} threads", flush=True)
    results = {f"{n}_threads": {"threads": n, "plain": time_steps(config.to_dict(), n, steps)} for n in counts}
    with ray_session():
        for result in results.values():
            result["ray_worker"] = in_ray_worker(config, result["threads"], steps, work)
    return results


def rows(results: dict[str, dict]) -> list[Row]:
    table = []
    for result in results.values():
        plain, worker = result["plain"], result["ray_worker"]
        table.append(
            (
                "Ray Train's overhead",
                f"CPU training step (no data, no Lightning), torch on {result['threads']} "
                f"thread{'s' if result['threads'] > 1 else ''}: this process / a Ray Train worker",
                f"{1000 * plain['step_seconds']:.0f} / {1000 * worker['step_seconds']:.0f} ms; other processes woke "
                f"{plain['other_wakeups_per_second']:,.0f} / {worker['other_wakeups_per_second']:,.0f} times/s",
                f"{worker['step_seconds'] / plain['step_seconds']:.2f}x in the worker",
            )
        )
    return table

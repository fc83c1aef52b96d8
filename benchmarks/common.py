"""What the benchmark scripts share: a steady-state clock, a Ray session, the data flags, the table's row type."""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import ray
import torch

from medvq.cli import JobParser, add_data_flags, resolve_data_root
from medvq.synthetic import write_synthetic_npz

Row = tuple[str, str, str, str]  # one line of the results table: step, contender, result, compared


class SteadyClock:
    """Seconds and images of training after the first `warmup` batches, timed from one batch's end to the next.

    `resume()` at each epoch start, so time spent between epochs (validation) is not counted. On a GPU the
    clock waits for queued work when it starts and when it is read, so no kernel is counted late or early.
    """

    def __init__(self, warmup: int, device: torch.device):
        self.warmup, self.device = warmup, device
        self.batches = self.images = 0
        self.seconds = 0.0
        self.last = time.perf_counter()

    def _now(self, sync: bool) -> float:
        if sync and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def resume(self) -> None:
        self.last = self._now(sync=False)

    def tick(self, images: int) -> None:
        """One training batch of `images` has just been stepped."""
        self.batches += 1
        now = self._now(sync=self.batches == self.warmup)
        if self.batches > self.warmup:
            self.seconds += now - self.last
            self.images += images
        self.last = now

    def stop(self) -> float:
        """Count the GPU work still queued for the batches ticked so far; returns the timed seconds."""
        if self.batches > self.warmup:
            now = self._now(sync=True)
            self.seconds += now - self.last
            self.last = now
        return self.seconds

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds else float("nan")


@contextmanager
def ray_session() -> Iterator[float]:
    """A new local Ray instance with one logical CPU per core, never a cluster already running here;
    yields the seconds `ray.init` took."""
    started = time.perf_counter()
    ray.init(address="local", num_cpus=os.cpu_count(), log_to_driver=False)
    try:
        yield time.perf_counter() - started
    finally:
        ray.shutdown()


def timed(function, *args, **kwargs) -> tuple[float, object]:
    """(seconds, result) of one call."""
    started = time.perf_counter()
    result = function(*args, **kwargs)
    return time.perf_counter() - started, result


def add_data_source_flags(parser: JobParser) -> None:
    """--data-root and --datasets as in every medvq job, and --synthetic."""
    add_data_flags(parser)
    parser.add_argument(
        "--synthetic",
        action="store_true",
        help="time on synthetic files of the official shapes and split sizes, written to a temporary "
        "folder (for a machine the real files cannot reach): speeds hold, quality figures mean nothing",
    )


def data_root(args: argparse.Namespace, work: Path) -> str:
    """The data root the flags ask for; with --synthetic, a folder under `work` with a synthetic file per dataset."""
    if not args.synthetic:
        return resolve_data_root(args.data_root)
    for seed, name in enumerate(args.datasets):
        write_synthetic_npz(work / "synthetic", name, seed=seed)
    return str(work / "synthetic")

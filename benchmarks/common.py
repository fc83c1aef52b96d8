"""What the benchmark scripts share: their flags and run (data, table, raw JSON), a steady-state clock, a Ray
session, the bare training step and the hardware caption."""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import lightning as L
import ray
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import medvq
from medvq.cli import JOB_RUNTIME_ENV, JobParser, add_data_flags, resolve_data_root
from medvq.config import Config
from medvq.data import check_data
from medvq.devices import resolve_accelerator
from medvq.errors import UserError
from medvq.provenance import code_commit, cpu_model
from medvq.synthetic import write_synthetic_npz

CHECKOUT = Path(__file__).resolve().parents[1]
Row = tuple[str, str, str, str]  # one line of the results table: step, contender, result, compared
# The tests' tiny model, epochs of 8 batches: a smoke run checks the scripts and measures nothing.
SMOKE_CONFIG = dict(hidden_channels=16, embedding_dim=8, codebook_size=32, batch_size=64, limit_batches=8, epochs=2)


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
    """A new local Ray instance with one logical CPU per core, never a cluster already running here, whose workers
    start as the job's do; yields the seconds `ray.init` took."""
    started = time.perf_counter()
    ray.init(address="local", num_cpus=os.cpu_count(), log_to_driver=False, runtime_env=JOB_RUNTIME_ENV)
    try:
        yield time.perf_counter() - started
    finally:
        ray.shutdown()


def timed(function, *args, **kwargs) -> tuple[float, object]:
    """(seconds, result) of one call."""
    started = time.perf_counter()
    result = function(*args, **kwargs)
    return time.perf_counter() - started, result


def torch_device(config: Config) -> torch.device:
    return torch.device("cuda" if resolve_accelerator(config.accelerator) == "gpu" else "cpu")


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor) -> None:
    """One step on MSE + commitment, no Lightning: the seed's loop, and the step Ray's cost is timed on."""
    recon, quantized = model(x)
    loss = F.mse_loss(recon, x) + quantized.commitment_loss
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def benchmark_parser(doc: str, out: str) -> JobParser:
    """The flags every benchmark script has: the data, --synthetic, --accelerator, --smoke and --out."""
    parser = JobParser(doc.strip().splitlines()[0])
    add_data_flags(parser)
    parser.add_argument(
        "--synthetic",
        action="store_true",
        help="time on synthetic files of the official shapes and split sizes, written to a temporary "
        "folder (for a machine the real files cannot reach): speeds hold, quality figures mean nothing",
    )
    parser.add_settings(Config, ("accelerator",))
    parser.add_argument("--smoke", action="store_true", help="a tiny model, seconds per row: measures nothing")
    parser.add_argument("--out", default=out, help="raw numbers, settings and hardware as JSON (default: %(default)s)")
    return parser


def data_root(args: argparse.Namespace, work: Path) -> str:
    """The data root the flags ask for; with --synthetic, a folder under `work` with a synthetic file per dataset."""
    if not args.synthetic:
        return resolve_data_root(args.data_root)
    for seed, name in enumerate(args.datasets):
        write_synthetic_npz(work / "synthetic", name, seed=seed)
    return str(work / "synthetic")


def markdown_table(rows: list[Row]) -> str:
    lines = ["| step | contender | result | compared |", "| --- | --- | --- | --- |"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows]) + "\n"


def run_benchmark(
    parser: JobParser,
    measure: Callable[[Config, argparse.Namespace, Path], dict],
    rows: Callable[[dict], list[Row]],
) -> None:
    """Measure in a temporary folder (deleted after), print the table under the hardware, write the raw JSON."""
    args = parser.parse_args()
    check_medvq_is_from_this_checkout()
    hardware = describe()
    with tempfile.TemporaryDirectory(prefix="medvq-benchmark-") as work:
        smoke = SMOKE_CONFIG if args.smoke else {}
        config = parser.build(Config, args, data_root=data_root(args, Path(work)), **smoke)
        check_data(config)
        results = measure(config, args, Path(work))
    table = markdown_table(rows(results))
    settings = {"smoke": args.smoke, "synthetic": args.synthetic, "config": config.to_dict()}
    raw = {"hardware": hardware, "settings": settings, **results, "table": table}
    Path(args.out).write_text(json.dumps(raw, indent=2) + "\n")
    data = "synthetic files (speeds only: the quality rows mean nothing)" if args.synthetic else config.data_root
    print(f"\n{caption(hardware)}\ndata: {data}\n\n{table}\nraw numbers: {args.out}")


def check_medvq_is_from_this_checkout() -> None:
    """`python benchmarks/X.py` puts benchmarks/, not its checkout, on the path: medvq is then whichever checkout pip
    installed, and a benchmark run in a second checkout (an older commit's, say) would time the other's code."""
    imported = Path(medvq.__file__).resolve().parents[1]
    if imported != CHECKOUT:
        raise UserError(
            f"medvq is imported from {imported}, not from this benchmark's checkout {CHECKOUT}: "
            f"run it with PYTHONPATH={CHECKOUT}, or pip install -e {CHECKOUT}"
        )


def describe() -> dict[str, str | int | None]:
    """The machine and software the figures come from, written beside them."""
    return {
        "cpu": cpu_model(),
        "cpus": os.cpu_count(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "lightning": L.__version__,
        "ray": ray.__version__,
        "commit": code_commit(),
    }


def caption(hardware: dict) -> str:
    """One line for above the table."""
    return (
        f"{hardware['cpu']} ({hardware['cpus']} CPUs), GPU: {hardware['gpu'] or 'none'}; torch {hardware['torch']}, "
        f"ray {hardware['ray']}, lightning {hardware['lightning']}; medvq commit {hardware['commit']}"
    )

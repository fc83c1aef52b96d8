"""How fast medvq trains, against the seed pipeline, in one process and under Ray Train.

Images/s after warm-up over a fixed budget of training seconds, and the quality reached in that budget, for

a. the seed pipeline (seed_model.py);
b. medvq's model on the seed's data path and loop: separates the data path's gain from the model's;
c. medvq as shipped: Lightning on whole-split tensors (`build_trainer`, `VQVAEModule`, `MedMNISTDataModule`);
d. medvq under Ray Train (`run_on_ray`), 1 worker and 2 CPU workers, timed per epoch;
e. optionally, (c) at larger batches and with torch.compile (`--batch-sizes`, `--compile`): the GPU goals.

    python benchmarks/train_speed.py --data-root DATA --datasets bloodmnist,pneumoniamnist,retinamnist,breastmnist
    python benchmarks/train_speed.py --synthetic --datasets bloodmnist --batch-sizes 1024,4096 --compile  # a GPU
"""

from __future__ import annotations

import argparse
import itertools
import os
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path

import lightning as L
import numpy as np
import torch
from common import Row, SteadyClock, benchmark_parser, ray_session, run_benchmark, torch_device, train_step
from ray.train import UserCallback
from seed_model import SeedVQVAE, seed_dataset, seed_loader, seed_optimizer, seed_transform, to_unit
from torch import nn
from torch.utils.data import DataLoader

from medvq.batches import load_splits, to_float_images
from medvq.cli import POSITIVE, POSITIVE_INT, JobParser, list_value, run_job
from medvq.config import Config
from medvq.datamodule import MedMNISTDataModule
from medvq.metrics import image_scores
from medvq.model import VQVAE
from medvq.module import VQVAEModule
from medvq.ray_train import run_on_ray
from medvq.train import LocalCheckpoints, build_trainer

SECONDS, WARMUP_BATCHES = 60.0, 5  # long past warm-up (allocator, cuDNN autotuning, lazy imports), epochs to time
SMOKE_SECONDS, SMOKE_WARMUP_BATCHES = 1.0, 1
VAL_IMAGES = 256  # the fixed validation batch every model is scored on
UNCAPPED_EPOCHS = 1_000_000  # the budget callback ends the Lightning run; the epoch cap must stay out of its way
CHECKPOINT_DIR_FORMAT = "checkpoint_%Y-%m-%d_%H-%M-%S.%f"  # Ray Train's default checkpoint folder name
CPU_EPOCHS = 3  # epochs of the CPU Ray runs when the Lightning run had a GPU: two steady epochs to time


def budget(smoke: bool, seconds: float | None = None) -> tuple[float, int]:
    """(steady-state training seconds, warm-up batches) of a training contender."""
    return (seconds or SMOKE_SECONDS, SMOKE_WARMUP_BATCHES) if smoke else (seconds or SECONDS, WARMUP_BATCHES)


def add_budget_flag(parser: JobParser) -> None:
    parser.add_argument(
        "--seconds",
        type=POSITIVE,
        help=f"steady-state training seconds per model (default: {SECONDS:g}; {SMOKE_SECONDS:g} with --smoke)",
    )


def val_rows(n: int) -> torch.Tensor:
    """The same VAL_IMAGES rows of the concatenated validation split for every model."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(0))[:VAL_IMAGES]


@torch.inference_mode()
def score(
    model: nn.Module, x: torch.Tensor, unit: Callable[[torch.Tensor], torch.Tensor] = lambda t: t
) -> dict[str, float]:
    """Mean val PSNR and SSIM of `model` on `x`, both mapped to [0, 1] by `unit`; leaves the model in train mode."""
    model.eval()
    recon, _ = model(x)
    scores = image_scores(unit(recon).clamp(0, 1), unit(x))
    model.train()
    return {f"val_{name}": float(scores[name].mean()) for name in ("psnr", "ssim")}


def throughput(clock: SteadyClock) -> dict[str, float]:
    return {"images_per_second": clock.images_per_second, "timed_images": clock.images, "timed_seconds": clock.seconds}


def _forever(loader: DataLoader) -> Iterator:
    """Batches epoch after epoch, reshuffled each time, as a user's `for epoch ...` loop sees them."""
    return itertools.chain.from_iterable(itertools.repeat(loader))


def seed_loop(model: nn.Module, loader: DataLoader, seconds: float, warmup: int, device: torch.device) -> SteadyClock:
    """The seed's training loop (SGD, MSE + commitment), until `seconds` of steady-state training have passed."""
    optimizer, clock = seed_optimizer(model), SteadyClock(warmup, device)
    model.train()
    for images, _ in _forever(loader):
        train_step(model, optimizer, images.to(device))
        clock.tick(len(images))
        if clock.seconds >= seconds:
            clock.stop()
            return clock


def seed_pipeline(config: Config, seconds: float, warmup: int, device: torch.device) -> dict:
    """(a) The seed's model and data path; scored at 64x64 after undoing its Normalize."""
    model, transform = SeedVQVAE().to(device), seed_transform()
    clock = seed_loop(
        model, seed_loader(seed_dataset(config.datasets, "train", config.data_root, transform)), seconds, warmup, device
    )
    val = seed_dataset(config.datasets, "val", config.data_root, transform)
    x = torch.stack([val[int(row)][0] for row in val_rows(len(val))]).to(device)
    return {**throughput(clock), **score(model, x, to_unit)}


def medvq_model_seed_data(config: Config, seconds: float, warmup: int, device: torch.device) -> dict:
    """(b) medvq's model in the seed's loop and data path, at 28x28 in [0, 1] as that model expects."""
    dataset = seed_dataset(config.datasets, "train", config.data_root, seed_transform(side=None, normalize=False))
    return throughput(seed_loop(VQVAE(config).to(device), seed_loader(dataset), seconds, warmup, device))


class Budget(L.Callback):
    """Times the steady-state training batches of a Lightning run; when `seconds` of them have passed, scores the
    fixed validation batch, then stops the run at the end of that epoch (after two, so one is past warm-up)."""

    def __init__(self, clock: SteadyClock, seconds: float, val_images: torch.Tensor):
        self.clock, self.seconds, self.val_images = clock, seconds, val_images
        self.scores: dict[str, float] | None = None
        self.epoch_ends: list[float] = []

    def on_train_epoch_start(self, trainer: L.Trainer, module: VQVAEModule) -> None:
        self.clock.resume()

    def on_train_batch_end(self, trainer: L.Trainer, module: VQVAEModule, outputs, batch, batch_idx: int) -> None:
        if self.scores is not None:
            return
        self.clock.tick(len(batch["image"]))
        if self.clock.seconds >= self.seconds:
            self.clock.stop()
            self.scores = score(module.model, to_float_images(self.val_images.to(module.device)))

    def on_train_epoch_end(self, trainer: L.Trainer, module: VQVAEModule) -> None:
        self.epoch_ends.append(time.perf_counter())
        trainer.should_stop = self.scores is not None and len(self.epoch_ends) >= 2


def lightning_run(config: Config, seconds: float, warmup: int, device: torch.device, out: Path) -> dict:
    """(c) medvq as shipped, in this process; leaves model.ckpt and metrics.csv in `out` (encode_speed.py's model)."""
    L.seed_everything(config.seed, verbose=False)
    out.mkdir(parents=True, exist_ok=True)
    val = load_splits(config.datasets, "val", config.data_root, config.size)
    budget = Budget(SteadyClock(warmup, device), seconds, val[val_rows(len(val))]["image"])
    trainer = build_trainer(
        config.with_changes(epochs=UNCAPPED_EPOCHS), progress_bar=False, callbacks=[budget, LocalCheckpoints(out)]
    )
    trainer.fit(VQVAEModule(config), datamodule=MedMNISTDataModule(config))
    return {
        **throughput(budget.clock),
        **budget.scores,
        "accelerator": device.type.replace("cuda", "gpu"),
        "batch_size": config.batch_size,
        "epochs": len(budget.epoch_ends),
        "epoch_seconds": float(np.diff(budget.epoch_ends).mean()),
    }


def batch_runs(
    config: Config, seconds: float, warmup: int, device: torch.device, args: argparse.Namespace, work: Path
) -> dict[str, dict]:
    """(e) medvq as shipped at larger batches, and compiled: how far one GPU goes (the learning rate stays)."""
    variants = [(size, False) for size in args.batch_sizes]
    variants += [(size, True) for size in args.batch_sizes if args.compile]
    results = {}
    for size, compiled in variants:
        label = f"batch_{size}" + ("_compiled" if compiled else "")
        print(f"training: medvq, {label.replace('_', ' ')}, for {seconds:g} s", flush=True)
        started = time.perf_counter()
        run = lightning_run(
            config.with_changes(batch_size=size, compile_model=compiled), seconds, warmup, device, work / label
        )
        results[label] = {**run, "compiled": compiled, "wall_seconds": time.perf_counter() - started}
    return results


class ReportTimes(UserCallback):
    """Appends the time of every epoch's report to a file (Ray Train calls this in its controller process, so
    the times cannot come back in memory). The time is the one in the checkpoint's folder name, taken on the
    worker when it reported: the controller itself only sees reports when it polls."""

    def __init__(self, path: Path):
        self.path = path

    def after_report(self, run_context, metrics, checkpoint) -> None:
        reported = datetime.strptime(Path(checkpoint.path).name, CHECKPOINT_DIR_FORMAT).timestamp()
        with open(self.path, "a") as handle:
            handle.write(f"{reported}\n")


def ray_run(config: Config, workers: int, accelerator: str, epochs: int, work: Path) -> dict:
    """(d) `run_on_ray` as the sweep runs it; epoch time = the mean gap between epoch reports after the first."""
    gpu = accelerator == "gpu"
    # Every core for the run, as the Lightning run has: Ray caps a worker's threads at the CPUs it holds.
    config = config.with_changes(
        workers=workers, epochs=epochs, cpus_per_worker=os.cpu_count() / workers, gpus_per_worker=1.0 if gpu else 0.0
    )
    name = f"bench-{workers}x{accelerator}-{uuid.uuid4().hex[:8]}"
    times = work / f"{name}.times"
    started = time.time()
    run_on_ray(config, storage=str(work / "ray_results"), name=name, callbacks=[ReportTimes(times)])
    reports = np.loadtxt(times, ndmin=1)
    return {
        "workers": workers,
        "accelerator": accelerator,
        "epochs": epochs,
        "epoch_seconds": float(np.diff(reports).mean()),
        "total_seconds": time.time() - started,
    }


def ray_runs(config: Config, plain: dict, work: Path) -> dict[str, dict]:
    """1 worker on the Lightning run's device, and 2 CPU workers against 1 CPU worker (the same run on a CPU
    machine). As many epochs as the Lightning run, at most `config.epochs`: short GPU epochs would run for minutes."""
    device = plain["accelerator"]
    runs = {"ray_1_worker": (1, device)}
    if device != "cpu":
        runs["ray_1_cpu_worker"] = (1, "cpu")
    runs["ray_2_cpu_workers"] = (2, "cpu")
    print("training: medvq under Ray Train", flush=True)
    with ray_session():
        epochs = lambda kind: min(plain["epochs"] if kind == device else CPU_EPOCHS, config.epochs)
        return {label: ray_run(config, workers, kind, epochs(kind), work) for label, (workers, kind) in runs.items()}


def measure(config: Config, args: argparse.Namespace, work: Path) -> dict:
    seconds, warmup = budget(args.smoke, args.seconds)
    device = torch_device(config)
    results = {"seconds": seconds, "warmup_batches": warmup}
    for label, contender in (("seed_pipeline", seed_pipeline), ("medvq_model_seed_data", medvq_model_seed_data)):
        print(f"training: {label} for {seconds:g} s", flush=True)
        results[label] = contender(config, seconds, warmup, device)
    print(f"training: medvq with Lightning for {seconds:g} s", flush=True)
    results["lightning"] = lightning_run(config, seconds, warmup, device, work / "lightning")
    results["batches"] = batch_runs(config, seconds, warmup, device, args, work)
    return {**results, **ray_runs(config, results["lightning"], work)}


def _speed(result: dict) -> str:
    return f"{result['images_per_second']:,.0f} images/s"


def _epochs(result: dict) -> str:
    epochs, total = result["epochs"], result["total_seconds"]
    return f"epoch {result['epoch_seconds']:.2f} s ({epochs} epochs, {total:.0f} s with start-up)"


def rows(results: dict) -> list[Row]:
    seed, model_only, plain = results["seed_pipeline"], results["medvq_model_seed_data"], results["lightning"]
    one, two = results["ray_1_worker"], results["ray_2_cpu_workers"]
    cpu_one = results.get("ray_1_cpu_worker", one)
    versus_seed = lambda result: f"{result['images_per_second'] / seed['images_per_second']:.2f}x seed"
    training = lambda *cells: ("training", *cells)
    quality = lambda *cells: (f"quality after {results['seconds']:g} s of training", *cells)
    table = [
        training(
            "seed pipeline: ResNet-18 stem, medmnist Dataset + PIL transforms, 64x64, batch 16",
            _speed(seed),
            "1.00x (baseline)",
        ),
        training("medvq model, seed data path and loop (28x28, batch 16)", _speed(model_only), versus_seed(model_only)),
        training(
            f"medvq as shipped: Lightning, one process, batch {plain['batch_size']}",
            f"{_speed(plain)}; epoch {plain['epoch_seconds']:.2f} s",
            versus_seed(plain),
        ),
        training(
            f"medvq, Ray Train, 1 {one['accelerator'].upper()} worker",
            _epochs(one),
            f"{one['epoch_seconds'] / plain['epoch_seconds']:.2f}x Lightning's epoch time (goal <= 1.15x)",
        ),
    ]
    if cpu_one is not one:
        table.append(training("medvq, Ray Train, 1 CPU worker", _epochs(cpu_one), "baseline for 2 CPU workers"))
    faster = cpu_one["epoch_seconds"] / two["epoch_seconds"]
    table.append(training("medvq, Ray Train, 2 CPU workers", _epochs(two), f"{faster:.2f}x faster than 1 CPU worker"))
    for run in results["batches"].values():
        table.append(
            training(
                f"medvq as shipped, batch {run['batch_size']}" + (", torch.compile" if run["compiled"] else ""),
                f"{_speed(run)}; PSNR {run['val_psnr']:.2f} dB after {results['seconds']:g} s",
                f"{versus_seed(run)} (goal on a GPU: >= 100,000 images/s, >= 20x seed)",
            )
        )
    gain = f"{plain['val_psnr'] - seed['val_psnr']:+.2f} dB, SSIM {plain['val_ssim'] - seed['val_ssim']:+.3f} vs seed"
    return table + [
        quality("seed pipeline (64x64)", f"PSNR {seed['val_psnr']:.2f} dB, SSIM {seed['val_ssim']:.3f}", ""),
        quality("medvq as shipped (28x28)", f"PSNR {plain['val_psnr']:.2f} dB, SSIM {plain['val_ssim']:.3f}", gain),
    ]


def main() -> None:
    parser = benchmark_parser(__doc__, "train-speed.json")
    add_budget_flag(parser)
    parser.add_argument(
        "--batch-sizes",
        type=list_value(POSITIVE_INT),
        default=(),
        help="comma-separated: medvq as shipped again at each of these batch sizes (for a GPU: 1024,4096)",
    )
    parser.add_argument("--compile", action="store_true", help="and each --batch-sizes run again with torch.compile")
    run_benchmark(parser, measure, rows)


if __name__ == "__main__":
    run_job(main)

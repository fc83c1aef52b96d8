"""Shared fixtures: synthetic MedMNIST files (fast, offline) and the real files when present."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import ray

from medvq.config import Config
from medvq.synthetic import write_synthetic_npz

REPO = Path(__file__).resolve().parents[1]
# Two small sets, one grayscale and one RGB, so every test covers the channel replication.
SYNTHETIC_DATASETS = ("breastmnist", "retinamnist")
# A model small enough that a CPU epoch of a few batches takes about a second.
TINY = dict(
    datasets=SYNTHETIC_DATASETS,
    hidden_channels=16,
    embedding_dim=8,
    codebook_size=32,
    batch_size=64,
    epochs=1,
    limit_batches=3,
    accelerator="cpu",
)


def slow_sweep_flags(epochs: int, codebook_sizes: str) -> list[str]:
    """A sweep whose trials (one per codebook size) run long enough to be stopped or lost half-way: several epochs of
    a few small batches, one commitment weight, no final fit."""
    return [
        *("--epochs", str(epochs), "--limit-batches", "8", "--batch-size", "32", "--final-epochs", "0"),
        *("--codebook-sizes", codebook_sizes, "--commitment-weights", "0.25", "--num-samples", "1"),
        *("--accelerator", "cpu"),
    ]


def smoke_command(data_root: Path | str, out: Path | str, *extra: str) -> list[str]:
    """The smoke sweep on the synthetic sets, as a user types it."""
    return [
        "python",
        "jobs/sweep.py",
        "--smoke",
        "--data-root",
        str(data_root),
        "--datasets",
        ",".join(SYNTHETIC_DATASETS),
        "--out",
        str(out),
        *extra,
    ]


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("medmnist")
    for seed, name in enumerate(SYNTHETIC_DATASETS):
        write_synthetic_npz(root, name, seed=seed)
    return root


@pytest.fixture(scope="session")
def real_root() -> Path:
    """The real MedMNIST files: $MEDVQ_DATA_ROOT, else ../shared/medmnist beside the repo."""
    root = Path(os.environ.get("MEDVQ_DATA_ROOT", REPO.parent / "shared" / "medmnist"))
    if not (root / "breastmnist.npz").exists():
        pytest.skip(f"real MedMNIST files not found in {root}")
    return root


@pytest.fixture
def tiny_config(synthetic_root):
    """Factory for a TINY Config on the synthetic files; keyword arguments override any field."""

    def make(**overrides) -> Config:
        return Config(**{**TINY, "data_root": str(synthetic_root), **overrides})

    return make


@pytest.fixture(scope="module")
def ray_instance():
    """A real local Ray instance; 4 logical CPUs so two workers (or actors) and their drivers fit on 2 cores."""
    ray.init(address="local", num_cpus=4, log_to_driver=False)  # a fresh instance, even if a cluster runs here
    yield
    ray.shutdown()

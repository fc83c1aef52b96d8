"""One typed configuration shared by every step: data, model, training, tuning, encoding.

Plain data only (str, int, float, tuple), so Ray can ship it to workers and a checkpoint can
store it as a dict and rebuild the exact model it was trained with.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields, is_dataclass, replace
from typing import Any

from medvq.errors import UserError

# The five MedMNIST sets the project learns together; any other 2D MedMNIST set works the same way.
DEFAULT_DATASETS = ("dermamnist", "pneumoniamnist", "retinamnist", "breastmnist", "bloodmnist")
MIXINGS = ("proportional", "balanced")
ACCELERATORS = ("auto", "cpu", "gpu")
# Marks a setting that says where or how fast a run goes, not what it learns: left out of the run's name, so
# the same command resumes the same run from another data mount, with other concurrency or GPUs up.
RUNTIME = {"shapes_results": False}


@dataclass(frozen=True)
class Config:
    # --- data ---
    data_root: str | None = field(default=None, metadata=RUNTIME)  # None: medmnist's own root (~/.medmnist)
    datasets: tuple[str, ...] = DEFAULT_DATASETS
    size: int = 28  # MedMNIST image side; MedMNIST+ also has 64, 128, 224
    mixing: str = "proportional"  # "balanced" draws every set equally often, so Breast (546) is not drowned
    # --- model ---
    hidden_channels: int = 64  # enough for 28x28 medical images; the model stays < 0.5M parameters
    residual_blocks: int = 2  # per side, as in the VQ-VAE paper
    downsample: int = 2  # stride-2 stages: 28x28 -> 7x7 latent grid
    embedding_dim: int = 64  # D, the size of one code vector
    codebook_size: int = 512  # K, the number of codes
    commitment_weight: float = 0.25  # beta in the VQ-VAE paper
    ema_decay: float = 0.99  # codebook EMA decay (VQ-VAE-2 value)
    dead_code_threshold: float = 1.0  # re-seed a code whose EMA count falls below one vector per batch
    # --- optimisation ---
    batch_size: int = 256  # per worker; small images, so large batches keep a GPU busy
    learning_rate: float = 1e-3  # Adam; the codebook itself is not trained by gradient
    epochs: int = 10
    limit_batches: int | None = None  # cap on train and val batches per epoch (smoke runs)
    seed: int = 0
    accelerator: str = "auto"  # "auto": the GPU when there is one, else the CPU
    compile_model: bool = field(default=False, metadata=RUNTIME)  # torch.compile the encoder and decoder (~20 s of compiling first on a CPU)
    # --- Ray Train workers (ignored by local training) ---
    workers: int = 1  # DDP workers, one per GPU
    cpus_per_worker: float = field(default=1.0, metadata=RUNTIME)
    gpus_per_worker: float = field(default=0.0, metadata=RUNTIME)  # 0: CPU workers; a fraction lets several one-worker trials share a GPU

    def __post_init__(self) -> None:
        object.__setattr__(self, "datasets", tuple(self.datasets))
        checks = [
            (len(self.datasets) > 0, "datasets: name at least one dataset"),
            (len(set(self.datasets)) == len(self.datasets), "datasets: a dataset is named twice"),
            (self.mixing in MIXINGS, f"mixing must be one of {', '.join(MIXINGS)}, got {self.mixing!r}"),
            (self.accelerator in ACCELERATORS, f"accelerator must be one of {', '.join(ACCELERATORS)}, got {self.accelerator!r}"),
            (self.codebook_size > 0, f"codebook size must be positive, got {self.codebook_size}"),
            (self.commitment_weight > 0, f"commitment weight must be > 0, got {self.commitment_weight}"),
            (0 < self.ema_decay < 1, f"EMA decay must be in (0, 1), got {self.ema_decay}"),
            (self.dead_code_threshold >= 0, f"dead-code threshold must be >= 0, got {self.dead_code_threshold}"),
            (self.embedding_dim > 0 and self.hidden_channels > 0, "embedding dim and hidden channels must be positive"),
            (self.residual_blocks >= 0, f"residual blocks must be >= 0, got {self.residual_blocks}"),
            (self.downsample >= 1, f"downsample must be >= 1, got {self.downsample}"),
            (self.size % 2**self.downsample == 0, f"image size {self.size} is not divisible by 2**downsample = {2**self.downsample}"),
            (self.batch_size > 0, f"batch size must be positive, got {self.batch_size}"),
            (self.learning_rate > 0, f"learning rate must be positive, got {self.learning_rate}"),
            (self.epochs > 0, f"epochs must be positive, got {self.epochs}"),
            (self.limit_batches is None or self.limit_batches > 0, f"limit batches must be positive, got {self.limit_batches}"),
            (self.workers >= 1, f"workers must be >= 1, got {self.workers}"),
            (self.cpus_per_worker > 0 and self.gpus_per_worker >= 0, "CPUs per worker must be > 0 and GPUs per worker >= 0"),
            # NCCL refuses two ranks of one run on the same GPU, so only a one-worker run may share one.
            (self.workers == 1 or self.gpus_per_worker in (0, int(self.gpus_per_worker)),
             f"a run of {self.workers} workers needs whole GPUs per worker, got {self.gpus_per_worker}"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(message)

    @property
    def latent_side(self) -> int:
        """Side of the latent grid (7 for 28x28 images and two stride-2 stages)."""
        return self.size // 2**self.downsample

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Config:
        """Rebuild from `to_dict()`; unknown keys are an error, not silently dropped."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise UserError(f"unknown config keys: {', '.join(unknown)}")
        return cls(**values)

    def with_changes(self, **changes: Any) -> Config:
        return replace(self, **changes)

    def run_name(self) -> str:
        """Deterministic name of a Ray Train run of this config, from what shapes its results: the same
        command resumes the same run."""
        return f"medvq-train-{_digest(self)}"


def results_shaping(config: Any) -> dict[str, Any]:
    """A config dataclass's values that shape what a run learns (nested configs likewise): no RUNTIME field."""
    return {f.name: results_shaping(value) if is_dataclass(value := getattr(config, f.name)) else value
            for f in fields(config) if f.metadata.get("shapes_results", True)}


def _digest(config: Any) -> str:
    """A short hash of what shapes a config's results."""
    return hashlib.sha1(json.dumps(results_shaping(config), sort_keys=True).encode()).hexdigest()[:10]


@dataclass(frozen=True)
class SweepConfig:
    """A Ray Tune search over codebook size x commitment weight; every trial trains `base` with those two changed."""

    base: Config
    codebook_sizes: tuple[int, ...] = (64, 128, 256, 512, 1024)
    commitment_range: tuple[float, float] = (0.05, 2.0)  # sampled log-uniformly ...
    commitment_grid: tuple[float, ...] = ()  # ... unless a grid is given
    # Sampled commitment weights per codebook size; with a commitment grid, repeats of each cell, each with
    # its own seed (base.seed, +1, ...), so that repeats measure the spread instead of copying one trial.
    num_samples: int = 3
    max_concurrent_trials: int | None = field(default=None, metadata=RUNTIME)  # None: as many as the cluster's resources allow
    grace_period: int = 2  # ASHA lets every trial run this many epochs before stopping poor ones

    def __post_init__(self) -> None:
        object.__setattr__(self, "codebook_sizes", tuple(self.codebook_sizes))
        object.__setattr__(self, "commitment_grid", tuple(self.commitment_grid))
        low, high = self.commitment_range
        checks = [
            (len(self.codebook_sizes) > 0, "the search space is empty: give at least one codebook size"),
            (all(k > 0 for k in self.codebook_sizes), f"codebook sizes must be positive, got {self.codebook_sizes}"),
            (0 < low <= high, f"commitment range must satisfy 0 < low <= high, got {self.commitment_range}"),
            (all(w > 0 for w in self.commitment_grid), f"commitment weights must be > 0, got {self.commitment_grid}"),
            (self.num_samples >= 1, f"num samples must be >= 1, got {self.num_samples}"),
            (self.max_concurrent_trials is None or self.max_concurrent_trials >= 1, "max concurrent trials must be >= 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(message)

    @property
    def grace_epochs(self) -> int:
        """Epochs every trial runs before ASHA may stop it: the one epoch at which all trials compare fairly."""
        return min(self.grace_period, self.base.epochs)

    @property
    def seeds(self) -> tuple[int, ...]:
        """One seed per repeat of a grid cell; sampled trials differ in their weight and share the base seed."""
        repeats = self.num_samples if self.commitment_grid else 1
        return tuple(range(self.base.seed, self.base.seed + repeats))

    @property
    def trial_count(self) -> int:
        return self.num_samples * len(self.codebook_sizes) * max(1, len(self.commitment_grid))

    def run_name(self) -> str:
        """Deterministic name from what shapes the results, so the same command resumes the same sweep."""
        return f"medvq-sweep-{_digest(self)}"


def smoke_sweep(base: Config) -> SweepConfig:
    """Two tiny trials that finish in a few minutes on two CPU cores: checks the whole job, learns little."""
    tiny = base.with_changes(epochs=2, limit_batches=4, batch_size=128, hidden_channels=32, embedding_dim=16)
    return SweepConfig(tiny, codebook_sizes=(32, 64), commitment_grid=(0.25,), num_samples=1, grace_period=1)

"""One typed configuration shared by every step: data, model, training, tuning, encoding.

Plain data only (str, int, float, tuple), so Ray can ship it to workers and a checkpoint can
store it as a dict and rebuild the exact model it was trained with. Each field is declared once, with
its default, help and allowed values (`setting`); the jobs' flags are generated from these (medvq/cli.py).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field, fields, is_dataclass, replace
from typing import Any

from medvq.errors import UserError

# The five MedMNIST sets the project learns together; any other 2D MedMNIST set works the same way.
DEFAULT_DATASETS = ("dermamnist", "pneumoniamnist", "retinamnist", "breastmnist", "bloodmnist")
ALWAYS_SAVED = object()  # Setting.before_it_existed of a setting every saved config has
BOUNDS = {"> 0": lambda value: value > 0, ">= 0": lambda value: value >= 0, "in (0, 1)": lambda value: 0 < value < 1}


@dataclass(frozen=True)
class Setting:
    """What a config field means to a user: its help, its allowed values, its flag, and whether it shapes results."""

    help: str
    bound: str | None = None  # a key of BOUNDS; for a tuple, each item's
    choices: tuple[str, ...] = ()
    flag: str | None = None  # the flag's name if not --field-name; "" when a job declares its own flag for it
    # False for what says where or how fast a run goes, not what it learns: left out of what a resumed run must
    # repeat, so the same command resumes the same run from another data mount, with other concurrency or GPUs up.
    shapes_results: bool = True
    # For a setting added after runs had been saved: the value those runs trained with, which a saved config
    # without the key reads as (rather than today's default).
    before_it_existed: Any = ALWAYS_SAVED

    def allows(self, value: Any) -> bool:
        items = value if isinstance(value, tuple) else (value,)
        if self.choices and any(item not in self.choices for item in items):
            return False
        return (
            self.bound is None
            or value is None
            or all(math.isfinite(item) and BOUNDS[self.bound](item) for item in items)
        )


def setting(default: Any, help: str, **how: Any) -> Any:
    """A dataclass field with its Setting."""
    return field(default=default, metadata={"setting": Setting(help, **how)})


def settings(config_class: type) -> dict[str, Setting]:
    """{field name: Setting} of a config dataclass, in declaration order."""
    return {f.name: f.metadata["setting"] for f in fields(config_class) if "setting" in f.metadata}


def check_settings(config: Any) -> None:
    """Every field within its declared bound and choices: one line naming the first that is not."""
    for name, declared in settings(type(config)).items():
        value = getattr(config, name)
        if not declared.allows(value):
            allowed = f"one of {', '.join(declared.choices)}" if declared.choices else declared.bound
            raise UserError(f"{name.replace('_', ' ')} must be {allowed}, got {value!r}")


@dataclass(frozen=True)
class Config:
    # --- data ---
    data_root: str | None = setting(
        None,
        "folder (on a cluster, every node's: a shared volume) or URI (s3://...) of the MedMNIST .npz files "
        "(default: $MEDVQ_DATA_ROOT, else medmnist's ~/.medmnist)",
        shapes_results=False,
    )
    datasets: tuple[str, ...] = setting(DEFAULT_DATASETS, "comma-separated MedMNIST names")
    size: int = setting(28, "image side: 28, or MedMNIST+'s 64, 128, 224", bound="> 0")
    mixing: str = setting(
        "proportional",
        "how batches draw from the sets: 'balanced' draws every set equally often, "
        "so BreastMNIST (546 images) is not drowned",
        choices=("proportional", "balanced"),
    )
    # --- model ---
    # 128: beat 64 in the same 15 minutes once bf16 made it cost 1.6x, not 2.6x (results/ablations, sixth round)
    hidden_channels: int = setting(128, "channels of the encoder and decoder", bound="> 0")
    residual_blocks: int = setting(2, "residual blocks on each side, as in the VQ-VAE paper", bound=">= 0")
    downsample: int = setting(2, "stride-2 stages: 2 turns 28x28 images into a 7x7 latent grid", bound="> 0")
    embedding_dim: int = setting(64, "D, the size of one code vector", bound="> 0")
    codebook_size: int = setting(512, "K, the number of codes", bound="> 0")
    commitment_weight: float = setting(
        0.25, "beta of the VQ-VAE paper: how hard the encoder is pulled to its code", bound="> 0"
    )
    ema_decay: float = setting(0.99, "decay of the codebook's moving averages", bound="in (0, 1)")
    dead_code_threshold: float = setting(
        1.0,
        "a code whose moving count of vectors falls below this is moved onto a current encoder output",
        bound=">= 0",
    )
    l2_codes: bool = setting(
        False,
        "look codes up among l2-normalised vectors (cosine similarity); with a small "
        "--embedding-dim, the factorised codes of ViT-VQGAN",
    )
    kmeans_init: bool = setting(
        False, "start the codebook as k-means centres of the first batch's encoder outputs, instead of random vectors"
    )
    gradient: str = setting(
        "straight-through",
        "how the reconstruction's gradient passes the quantizer to the "
        "encoder: copied (straight-through), or through the rotation of the encoder output onto "
        "its code (Fifty et al., 2024)",
        choices=("straight-through", "rotation"),
    )
    # log-mse: +0.10 dB on the mean of the sets in the 15-minute run, ahead at 92 of its 134 epochs (results/ablations)
    error_loss: str = setting(
        "log-mse",
        "the squared error trained on: 'mse' over every pixel of the batch; 'log-mse' the log of each image's mean "
        "squared error, i.e. the mean per-image PSNR that the scores report, so an image already reconstructed well "
        "still counts (its value is logged as the batch's mse)",
        choices=("mse", "log-mse"),
        before_it_existed="mse",
    )
    # 0.1: more SSIM for little PSNR in the ablations' third round (results/ablations/ablations.md)
    ssim_weight: float = setting(
        0.1,
        "weight of 1 - SSIM added to the reconstruction's mean squared error: 0 trains on the error alone (PSNR's "
        "measure), more favours the local structure SSIM scores",
        bound=">= 0",
        before_it_existed=0.0,
    )
    # --- optimisation ---
    # 64: more quality per CPU-minute than 128 in the 15-minute runs, as 128 beat 256 before (results/ablations)
    batch_size: int = setting(64, "images per batch and worker", bound="> 0")
    learning_rate: float = setting(1e-3, "Adam's (the codebook itself is not trained by gradient)", bound="> 0")
    # cooldown: beat constant (which beat cosine) in the 15-minute runs, and ends without its swing (results/ablations)
    lr_schedule: str = setting(
        "cooldown",
        "'cooldown': constant, then a linear decay to zero over the last --cooldown-share of steps; 'constant': one "
        "rate throughout; 'cosine': a linear warm-up over the first 5%% of steps, then a cosine decay to zero at the "
        "last",
        choices=("constant", "cosine", "cooldown"),
    )
    # 0.2: as long a decay as matched cosine in Hägele et al. (2024); 0.4 did not beat it (results/ablations)
    cooldown_share: float = setting(
        0.2,
        "the share of the steps over which 'cooldown' decays the rate to zero",
        bound="in (0, 1)",
        before_it_existed=0.2,
    )
    epochs: int = setting(10, "passes over the training images", bound="> 0")
    check_every: int | None = setting(
        None,
        "validate, report and checkpoint after every N epochs and after the last (default: every epoch on a CPU; on "
        "a GPU, whose epochs are short, as often as keeps these checks within 5%% of the training time, from what "
        "they are measured to cost); a sweep's trials check every epoch, this sets its final fit's",
        bound="> 0",
        shapes_results=False,
    )
    limit_batches: int | None = setting(
        None, "at most this many train and val batches per epoch (smoke runs)", bound="> 0"
    )
    seed: int = setting(0, "seeds the weights, the codebook and the batch order", bound=">= 0")
    # No "mps" of its own: "gpu" means Apple's GPU where Lightning's does, and Ray runs cannot use it (devices.py).
    accelerator: str = setting(
        "auto",
        "'auto': a CUDA GPU when there is one, else Apple's GPU (MPS) for a run in this process, else the CPU; 'gpu' "
        "insists on a GPU (a Ray run's workers: a CUDA GPU, as Ray has no resource for Apple's)",
        choices=("auto", "cpu", "gpu"),
    )
    precision: str = setting(
        "auto",
        "arithmetic of the encoder and decoder: 'bf16' mixed precision (the quantizer and SSIM stay float32) or '32'; "
        "'auto' is bf16 on a CUDA GPU and on a CPU with bf16 matrix units (Intel AMX), 32 elsewhere (Apple's GPU "
        "too)",
        choices=("auto", "32", "bf16"),
    )
    compile_model: bool = setting(
        False,
        "torch.compile the whole training step and the validation step, once each (compiling takes a while first)",
        flag="--compile",
        shapes_results=False,
    )
    # --- Ray Train workers (ignored by local training) ---
    workers: int = setting(1, "DDP workers, one per GPU", bound="> 0", flag="")
    cpus_per_worker: float = setting(1.0, "CPUs each Ray Train worker holds", bound="> 0", shapes_results=False)
    gpus_per_worker: float = setting(
        0.0,
        "0: CPU workers; a fraction lets several one-worker runs share a GPU",
        bound=">= 0",
        flag="",
        shapes_results=False,
    )

    def __post_init__(self) -> None:
        object.__setattr__(self, "datasets", tuple(self.datasets))
        check_settings(self)
        checks = [
            (len(self.datasets) > 0, "datasets: name at least one dataset"),
            (len(set(self.datasets)) == len(self.datasets), "datasets: a dataset is named twice"),
            (
                self.size % 2**self.downsample == 0,
                f"image size {self.size} is not divisible by 2**downsample = {2**self.downsample}",
            ),
            # NCCL refuses two ranks of one run on the same GPU, so only a one-worker run may share one.
            (
                self.workers == 1 or self.gpus_per_worker in (0, int(self.gpus_per_worker)),
                f"a run of {self.workers} workers needs whole GPUs per worker, got {self.gpus_per_worker}",
            ),
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
        """Rebuild from `to_dict()`, of this version or an older one; unknown keys are an error, not dropped."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise UserError(f"unknown config keys: {', '.join(unknown)}")
        older = {
            name: declared.before_it_existed
            for name, declared in settings(cls).items()
            if name not in values and declared.before_it_existed is not ALWAYS_SAVED
        }
        return cls(**older, **values)

    def with_changes(self, **changes: Any) -> Config:
        return replace(self, **changes)

    def run_name(self) -> str:
        """A short name of what shapes this config's results: a local run continues in its --out only under the
        same. (A Ray run is named after its --out: cli.run_record.)"""
        return f"medvq-train-{_digest(self)}"


def results_shaping(config: Any) -> dict[str, Any]:
    """A config dataclass's values that shape what a run learns (nested configs likewise)."""
    shapes = {name: declared.shapes_results for name, declared in settings(type(config)).items()}
    return {
        f.name: results_shaping(value) if is_dataclass(value := getattr(config, f.name)) else value
        for f in fields(config)
        if shapes.get(f.name, True)
    }


def _digest(config: Any) -> str:
    """A short hash of what shapes a config's results."""
    return hashlib.sha1(json.dumps(results_shaping(config), sort_keys=True).encode()).hexdigest()[:10]


@dataclass(frozen=True)
class SweepConfig:
    """A Ray Tune search over codebook size x commitment weight; every trial trains `base` with those two changed."""

    base: Config
    codebook_sizes: tuple[int, ...] = setting(
        (64, 128, 256, 512, 1024), "comma-separated codebook sizes to search", bound="> 0"
    )
    commitment_range: tuple[float, float] = setting(
        (0.05, 2.0), "commitment weights sampled log-uniformly from LOW:HIGH ...", bound="> 0", flag=""
    )
    commitment_grid: tuple[float, ...] = setting((), "... unless a grid of them is given", bound="> 0", flag="")
    num_samples: int = setting(
        3,
        "sampled commitment weights per codebook size; with a grid of weights, repeats of "
        "each cell, with seeds --seed, +1, ...",
        bound="> 0",
    )
    max_concurrent_trials: int | None = setting(
        None, "trials at once (default: as many as the cluster fits)", bound="> 0", shapes_results=False
    )
    grace_period: int = setting(2, "epochs every trial runs before ASHA may stop the poor ones", bound="> 0")
    # About twice the 54-70 epochs a 15-minute run trains at 128 channels (results/ablations), so the sweep ships a
    # model at least as good.
    final_epochs: int = setting(
        120,
        "after the search, train the best trial's settings afresh for this many epochs and ship that model "
        "(0: ship the best trial as it stopped)",
        bound=">= 0",
    )

    def __post_init__(self) -> None:
        object.__setattr__(self, "codebook_sizes", tuple(self.codebook_sizes))
        object.__setattr__(self, "commitment_grid", tuple(self.commitment_grid))
        check_settings(self)
        low, high = self.commitment_range
        if not self.codebook_sizes:
            raise UserError("the search space is empty: give at least one codebook size")
        if low > high:
            raise UserError(f"commitment range must satisfy 0 < low <= high, got {self.commitment_range}")

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


def smoke_sweep(base: Config) -> SweepConfig:
    """Two tiny trials that finish in a few minutes on two CPU cores: checks the whole job, learns little."""
    tiny = base.with_changes(epochs=2, limit_batches=4, batch_size=128, hidden_channels=32, embedding_dim=16)
    return SweepConfig(
        tiny, codebook_sizes=(32, 64), commitment_grid=(0.25,), num_samples=1, grace_period=1, final_epochs=1
    )

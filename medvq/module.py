"""The LightningModule: reconstruction + commitment loss, Adam, and the metrics logged every epoch.

Each stage accumulates torchmetrics objects every step and logs their values once per epoch, so a step
costs little Python beyond the model itself: on a GPU that overhead, not the arithmetic, bounds the
images per second. Image scores are per-image means.
"""

from __future__ import annotations

import io
import math
import pickle
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import IO

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanMetric, Metric
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

from medvq.config import Config
from medvq.data import to_float_images
from medvq.errors import UserError
from medvq.model import VQVAE, index_counts
from medvq.storage import read_bytes

IMAGE_SCORES = ("psnr", "ssim", "mae")
LOSSES = ("loss", "recon_loss", "commitment_loss")
PROGRESS_BAR = {"train": ("loss",), "val": ("nmse", "psnr")}  # what a local run's progress bar shows
WARMUP_SHARE = 0.05  # of a cosine schedule's steps
TRAIN_SCORED_IMAGES = 64  # per training batch: the epoch's mean PSNR/SSIM/MAE from thousands of images


def image_scores(recon: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-image MAE, PSNR (dB) and SSIM for images in [0, 1]: (B, 3, H, W) x 2 -> {name: (B,)}."""
    recon, target = recon.float(), target.float()
    return {
        "mae": (recon - target).abs().mean(dim=(1, 2, 3)),
        "psnr": peak_signal_noise_ratio(recon, target, data_range=1.0, reduction="none", dim=(1, 2, 3)),
        "ssim": structural_similarity_index_measure(recon, target, data_range=1.0, reduction="none"),
    }


class CodeUsage(Metric):
    """How often each code was chosen over the epoch -> perplexity, exp(entropy) of the usage (K when all
    codes are used evenly), and the share of the codebook chosen at least once (codebook health)."""

    full_state_update = False

    def __init__(self, codebook_size: int):
        super().__init__()
        self.add_state("counts", torch.zeros(codebook_size, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, indices: torch.Tensor) -> None:
        self.counts += index_counts(indices, len(self.counts), self.counts.dtype)

    def compute(self) -> dict[str, torch.Tensor]:
        p = self.counts / self.counts.sum()
        perplexity = torch.exp(-(p * torch.log(p.clamp_min(1e-12))).sum())
        return {"perplexity": perplexity.float(), "codes_used": (self.counts > 0).float().mean()}


class DatasetMeans(Metric):
    """Means of per-image scores over the epoch, per dataset and over all images."""

    full_state_update = False

    def __init__(self, n_datasets: int, n_scores: int):
        super().__init__()
        self.add_state("sums", torch.zeros(n_datasets, n_scores, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("counts", torch.zeros(n_datasets, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, scores: torch.Tensor, dataset_ids: torch.Tensor) -> None:
        """scores (B, S) of B images from datasets dataset_ids (B,)."""
        self.sums.index_add_(0, dataset_ids, scores.double())
        self.counts += index_counts(dataset_ids, len(self.counts), self.counts.dtype)

    def compute(self) -> dict[str, torch.Tensor]:
        """{"per_dataset": (n_datasets, S), NaN for a dataset without images; "all": (S,)}."""
        return {"per_dataset": (self.sums / self.counts.unsqueeze(1)).float(),
                "all": (self.sums.sum(0) / self.counts.sum()).float()}


class MeanNormalizedMSE(Metric):
    """The tuning objective: per dataset, MSE / pixel variance of its targets, averaged over datasets.

    Dividing by each set's variance makes the sets comparable, and averaging over sets (not images)
    keeps BloodMNIST's 12k images from outweighing BreastMNIST's 546.
    """

    full_state_update = False

    def __init__(self, n_datasets: int):
        super().__init__()
        for name in ("squared_error", "pixel_sum", "pixel_square_sum", "pixel_count"):
            self.add_state(name, torch.zeros(n_datasets, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, recon: torch.Tensor, target: torch.Tensor, dataset_ids: torch.Tensor) -> None:
        recon, target = recon.double().flatten(1), target.double().flatten(1)  # (B, P)
        self.squared_error.index_add_(0, dataset_ids, (recon - target).pow(2).sum(1))
        self.pixel_sum.index_add_(0, dataset_ids, target.sum(1))
        self.pixel_square_sum.index_add_(0, dataset_ids, target.pow(2).sum(1))
        self.pixel_count.index_add_(0, dataset_ids, torch.full_like(target[:, 0], target.shape[1]))

    def compute(self) -> torch.Tensor:
        seen = self.pixel_count > 0
        count = self.pixel_count[seen]
        variance_times_count = self.pixel_square_sum[seen] - self.pixel_sum[seen].pow(2) / count
        return (self.squared_error[seen] / variance_times_count).mean().float()


class StageMetrics(nn.Module):
    """One stage's (train or val) epoch metrics: updated every step (a few tensor operations), computed and
    reset once per epoch (each `compute` synchronises over DDP ranks).

    scored_images: score only the batch's first rows (shuffled, so an unbiased sample) with PSNR, SSIM and
    MAE: SSIM of a whole batch costs a large share of a CPU training step (benchmarks/RESULTS.md).
    """

    def __init__(self, config: Config, scored_images: int | None = None):
        super().__init__()
        self.scored_images = scored_images
        n_datasets = len(config.datasets)
        self.nmse = MeanNormalizedMSE(n_datasets)
        self.scores = DatasetMeans(n_datasets, len(IMAGE_SCORES))
        # nan_strategy "disable": the default checks every update for NaNs, a GPU-to-CPU wait each step.
        self.losses = nn.ModuleDict({name: MeanMetric(nan_strategy="disable") for name in LOSSES})
        self.code_usage = CodeUsage(config.codebook_size)

    def update(self, x: torch.Tensor, recon: torch.Tensor, indices: torch.Tensor, losses: dict[str, torch.Tensor],
               dataset_ids: torch.Tensor) -> None:
        self.nmse.update(recon, x, dataset_ids)
        scored = slice(self.scored_images)
        scores = image_scores(recon[scored], x[scored])
        self.scores.update(torch.stack([scores[name] for name in IMAGE_SCORES], dim=1), dataset_ids[scored])
        for name, value in losses.items():
            self.losses[name].update(value.detach(), weight=torch.full_like(value, len(x)))
        self.code_usage.update(indices)

    def compute_and_reset(self, datasets: tuple[str, ...] | None = None) -> dict[str, torch.Tensor]:
        """{name: value}, the objective and image scores first; per-dataset scores too if `datasets` is given."""
        scores = self.scores.compute()
        values = {"nmse": self.nmse.compute(), **dict(zip(IMAGE_SCORES, scores["all"])),
                  **{name: metric.compute() for name, metric in self.losses.items()}, **self.code_usage.compute()}
        for d, dataset in enumerate(datasets or ()):
            values.update({f"{name}_{dataset}": value for name, value in zip(IMAGE_SCORES, scores["per_dataset"][d])})
        for metric in (self.nmse, self.scores, self.code_usage, *self.losses.values()):
            metric.reset()
        return values


@contextmanager
def refused_if_unsafe(source: str | Path):
    """A file torch's weights-only loader refuses (it holds objects, not only tensors and plain data) or cannot
    read (not a checkpoint, cut short) becomes one line naming it and why."""
    try:
        yield
    except pickle.UnpicklingError as error:
        cause = error.__context__ or error  # torch's own message leads with advice to load it unsafely
        reason = str(cause).strip().splitlines()[0].split(". Please use")[0]
        raise UserError(f"{source} is not a checkpoint of plain tensors and data, which is all medvq loads "
                        f"({reason})") from None
    except RuntimeError as error:  # torch's zip reader: not a checkpoint file at all, or a truncated one
        raise UserError(f"{source} is not a readable checkpoint ({str(error).split('. ')[0]})") from None


def read_checkpoint(checkpoint: str | Path) -> dict:
    """A Lightning checkpoint (a path or a URI) as plain data, through torch's safe unpickler."""
    with refused_if_unsafe(checkpoint):
        return torch.load(io.BytesIO(read_bytes(checkpoint)), map_location="cpu", weights_only=True)


def checkpoint_config(checkpoint: str | Path) -> Config:
    """The Config a checkpoint of `VQVAEModule` was trained with (its saved hyperparameters)."""
    return Config.from_dict(read_checkpoint(checkpoint)["hyper_parameters"]["config"])


class VQVAEModule(L.LightningModule):
    def __init__(self, config: dict):
        """`config` is `Config.to_dict()`: plain data, so the checkpoint rebuilds its own module."""
        super().__init__()
        self.save_hyperparameters()
        self.config = Config.from_dict(config)
        # Channels-last weights match the channels-last activations (faster convolutions on GPU, and DDP's
        # gradient buckets then have the same layout as the gradients).
        self.model = VQVAE(self.config).to(memory_format=torch.channels_last)
        if self.config.compile_model:
            # In place: the state dict keeps its keys, so a checkpoint loads with or without compiling. The
            # quantizer stays eager: its codebook update is a handful of small ops and collectives.
            self.model.encoder.compile()
            self.model.decoder.compile()
        self.train_metrics = StageMetrics(self.config, scored_images=TRAIN_SCORED_IMAGES)
        self.val_metrics = StageMetrics(self.config)

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path: str | Path | IO[bytes], **kwargs) -> VQVAEModule:
        """Lightning's, from a local path, any URI pyarrow opens (s3://bucket/.../checkpoint.ckpt) or a file
        object; with torch's safe unpickler (plain tensors and data), not one that can run code."""
        source = checkpoint_path if isinstance(checkpoint_path, (str, Path)) else "the checkpoint"
        if isinstance(checkpoint_path, (str, Path)):
            checkpoint_path = io.BytesIO(read_bytes(checkpoint_path))
        with refused_if_unsafe(source):
            return super().load_from_checkpoint(checkpoint_path, **{"weights_only": True, **kwargs})

    def forward(self, images: torch.Tensor):
        """uint8 images (B, H, W, 3) -> reconstruction (B, 3, H, W) in [0, 1] and the quantizer output."""
        return self.model(to_float_images(images))

    def _step(self, batch: dict[str, torch.Tensor], metrics: StageMetrics) -> torch.Tensor:
        """Reconstruct the batch, update the stage's metrics; returns the loss."""
        x = to_float_images(batch["image"])
        recon, quantized = self.model(x)
        recon_loss = F.mse_loss(recon.float(), x)
        losses = {"loss": recon_loss + quantized.commitment_loss, "recon_loss": recon_loss,
                  "commitment_loss": quantized.commitment_loss}
        metrics.update(x, recon.detach().float(), quantized.indices, losses, batch["dataset_id"])
        return losses["loss"]

    def on_train_batch_start(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        if self.config.kmeans_init and self.trainer.global_step == 0:  # a new run's first step; never a resumed one
            self.model.init_codebook_from_kmeans_(to_float_images(batch["image"]))

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self._step(batch, self.train_metrics)
        # Lightning runs the callbacks' on_train_epoch_end (Ray's report, the metrics CSV) before the module's,
        # so the epoch's training metrics are logged with its last batch.
        if batch_idx + 1 == self.trainer.num_training_batches:
            self._log_epoch("train", self.train_metrics.compute_and_reset())
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._step(batch, self.val_metrics)

    def on_validation_epoch_end(self) -> None:
        values = self.val_metrics.compute_and_reset(self.config.datasets)
        if self.trainer.world_size > 1:  # a health check of the EMA's all-reduce, logged once per epoch
            values["codebook_rank_spread"] = self.model.quantizer.codebook.rank_spread()
        self._log_epoch("val", values)

    def _log_epoch(self, stage: str, values: dict[str, torch.Tensor]) -> None:
        """Log one epoch's values, once: a Lightning log call's Python, paid every step, would bound a GPU's images
        per second (benchmarks/RESULTS.md). The values are the same on every rank already;
        sync_dist (a mean of equal values) tells Lightning so. Tune's trial table shows the first few."""
        for name, value in values.items():
            self.log(f"{stage}_{name}", value, on_step=False, on_epoch=True, batch_size=1, sync_dist=True,
                     prog_bar=name in PROGRESS_BAR[stage])

    def configure_optimizers(self):
        # Fused: one kernel for the whole update on a GPU, instead of several per parameter group.
        optimizer = torch.optim.Adam(self.model.parameters(), lr=self.config.learning_rate, fused=self.device.type == "cuda")
        if self.config.lr_schedule == "constant":
            return optimizer
        factor = partial(warmup_cosine, steps=self.trainer.estimated_stepping_batches)
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": torch.optim.lr_scheduler.LambdaLR(optimizer, factor), "interval": "step"}}


def warmup_cosine(step: int, steps: int) -> float:
    """The learning rate's factor at `step` of `steps`: linear warm-up over the first WARMUP_SHARE, then cosine to 0."""
    warmup = max(1, round(WARMUP_SHARE * steps))
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, steps - warmup))))

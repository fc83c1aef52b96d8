"""The LightningModule: reconstruction + commitment loss, Adam, and the metrics logged every epoch.

Every metric is a torchmetrics object logged with `on_epoch=True`, so Lightning computes it once per
epoch (synchronised over DDP ranks) and resets it. Image scores are per-image means.
"""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanMetric, Metric
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

from medvq.config import Config
from medvq.data import to_float_images
from medvq.model import VQVAE

IMAGE_SCORES = ("psnr", "ssim", "mae")


def image_scores(recon: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-image MAE, PSNR (dB) and SSIM for images in [0, 1]: (B, 3, H, W) x 2 -> {name: (B,)}."""
    recon, target = recon.float(), target.float()
    return {
        "mae": (recon - target).abs().mean(dim=(1, 2, 3)),
        "psnr": peak_signal_noise_ratio(recon, target, data_range=1.0, reduction="none", dim=(1, 2, 3)),
        "ssim": structural_similarity_index_measure(recon, target, data_range=1.0, reduction="none"),
    }


class CodePerplexity(Metric):
    """exp(entropy) of how often each code was chosen over the epoch: K if all codes are used evenly."""

    full_state_update = False

    def __init__(self, codebook_size: int):
        super().__init__()
        self.add_state("counts", torch.zeros(codebook_size, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, indices: torch.Tensor) -> None:
        self.counts += torch.bincount(indices.flatten(), minlength=len(self.counts)).to(self.counts)

    def compute(self) -> torch.Tensor:
        p = self.counts / self.counts.sum()
        return torch.exp(-(p * torch.log(p.clamp_min(1e-12))).sum()).float()


class CodesUsed(CodePerplexity):
    """Share of the codebook chosen at least once over the epoch (codebook health)."""

    def compute(self) -> torch.Tensor:
        return (self.counts > 0).float().mean()


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


class VQVAEModule(L.LightningModule):
    def __init__(self, config: dict):
        """`config` is `Config.to_dict()`: plain data, so the checkpoint rebuilds its own module."""
        super().__init__()
        self.save_hyperparameters()
        self.config = Config.from_dict(config)
        # Channels-last weights match the channels-last activations (faster convolutions on GPU, and DDP's
        # gradient buckets then have the same layout as the gradients).
        self.model = VQVAE(self.config).to(memory_format=torch.channels_last)
        self.train_metrics, self.val_metrics = self._stage_metrics(), self._stage_metrics()
        self.dataset_metrics = nn.ModuleDict(
            {name: nn.ModuleDict({score: MeanMetric() for score in IMAGE_SCORES}) for name in self.config.datasets}
        )
        self.val_nmse = MeanNormalizedMSE(len(self.config.datasets))

    def _stage_metrics(self) -> nn.ModuleDict:
        metrics = {name: MeanMetric() for name in (*IMAGE_SCORES, "loss", "recon_loss", "commitment_loss")}
        return nn.ModuleDict(
            {**metrics, "perplexity": CodePerplexity(self.config.codebook_size), "codes_used": CodesUsed(self.config.codebook_size)}
        )

    def forward(self, images: torch.Tensor):
        """uint8 images (B, H, W, 3) -> reconstruction (B, 3, H, W) in [0, 1] and the quantizer output."""
        return self.model(to_float_images(images))

    def _shared_step(self, batch: dict[str, torch.Tensor], stage: str) -> torch.Tensor:
        x = to_float_images(batch["image"])
        recon, quantized = self.model(x)
        recon_loss = F.mse_loss(recon.float(), x)
        loss = recon_loss + quantized.commitment_loss
        scores = image_scores(recon.detach(), x)
        if stage == "val":  # logged first: Tune's trial table shows the first few metrics reported
            self.val_nmse.update(recon.detach().float(), x, batch["dataset_id"])
            self.log("val_nmse", self.val_nmse, on_step=False, on_epoch=True, prog_bar=True)
        values = {**scores, "loss": loss, "recon_loss": recon_loss, "commitment_loss": quantized.commitment_loss}
        metrics = self.train_metrics if stage == "train" else self.val_metrics
        for name, value in values.items():
            metrics[name].update(value.detach())
        metrics["perplexity"].update(quantized.indices)
        metrics["codes_used"].update(quantized.indices)
        for name, metric in metrics.items():
            self.log(f"{stage}_{name}", metric, on_step=False, on_epoch=True, prog_bar=name in ("loss", "psnr"))
        if stage == "val":
            self._update_dataset_metrics(batch["dataset_id"], scores)
        return loss

    def _update_dataset_metrics(self, dataset_ids: torch.Tensor, scores: dict[str, torch.Tensor]) -> None:
        # Log every dataset's metrics on every step, seen or not: under DDP each rank must log the same
        # keys, or the epoch-end synchronisation waits forever for a rank that never logged one.
        for dataset_id, name in enumerate(self.config.datasets):
            rows = dataset_ids == dataset_id
            for score, metric in self.dataset_metrics[name].items():
                if rows.any():
                    metric.update(scores[score][rows])
                self.log(f"val_{score}_{name}", metric, on_step=False, on_epoch=True)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._shared_step(batch, "train")

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._shared_step(batch, "val")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.model.parameters(), lr=self.config.learning_rate)

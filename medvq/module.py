"""The LightningModule: reconstruction (squared error, optionally + SSIM) + commitment loss, Adam and its
schedule, the metrics logged every epoch (medvq/metrics.py), and loading itself from a checkpoint safely."""

from __future__ import annotations

import io
import math
from functools import partial
from pathlib import Path
from typing import IO

import lightning as L
import torch

from medvq.batches import to_float_images
from medvq.checkpoints import TRAINED_PRECISION, refused_if_unsafe
from medvq.config import Config
from medvq.metrics import StageMetrics, structural_similarity
from medvq.model import VQVAE
from medvq.provenance import STRETCHES_JOINED_BY
from medvq.storage import read_bytes

PROGRESS_BAR = {"train": ("loss",), "val": ("nmse", "psnr")}  # what a local run's progress bar shows
WARMUP_SHARE = 0.05  # of a cosine schedule's steps
TRAIN_SCORED_IMAGES = 64  # per training batch: the epoch's mean PSNR/SSIM/MAE from thousands of images
MIN_IMAGE_MSE = 1e-6  # 60 dB: an image reconstructed better than this weighs no more in the 'log-mse' loss


class VQVAEModule(L.LightningModule):
    def __init__(self, config: Config | dict):
        """The checkpoint keeps `config` as a dict (plain data): `load_from_checkpoint` rebuilds the module from it."""
        super().__init__()
        self.config = config if isinstance(config, Config) else Config.from_dict(config)
        self.save_hyperparameters({"config": self.config.to_dict()})
        # Channels-last weights match the channels-last activations (faster convolutions on GPU, and DDP's
        # gradient buckets then have the same layout as the gradients).
        self.model = VQVAE(self.config).to(memory_format=torch.channels_last)
        self.train_metrics = StageMetrics(self.config, scored_images=TRAIN_SCORED_IMAGES)
        self.val_metrics = StageMetrics(self.config)
        if self.config.compile_model:
            # Each stage's whole step as one graph: forward, the codebook's EMA update, the loss and the metrics' sums.
            # fullgraph: a graph break is an error, not a silently slower step. dynamic=False: every training batch
            # has one shape (batches.IndexBatches), so it compiles once; validation's last, shorter batch compiles a
            # second graph, once. Methods, not modules: the state dict keeps its keys, checkpoints load either way.
            compiled = partial(torch.compile, fullgraph=True, dynamic=False)
            self._train_step, self._val_step = compiled(self._train_step), compiled(self._val_step)
        self.trained_precision: str | None = None  # set from a checkpoint; None for one saved before it was kept

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # The config may say "auto", which each node resolves by its own hardware (medvq/devices.py): the checkpoint
        # keeps what rank zero trained in, and each stretch of a run resumed elsewhere ("bf16-mixed, then 32-true").
        stretches = self.trained_precision.split(STRETCHES_JOINED_BY) if self.trained_precision else []
        if stretches[-1:] != [self.trainer.precision]:
            stretches.append(self.trainer.precision)
        checkpoint[TRAINED_PRECISION] = STRETCHES_JOINED_BY.join(stretches)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.trained_precision = checkpoint.get(TRAINED_PRECISION)

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
        recon_loss = squared_error_loss(recon.float(), x, self.config.error_loss)
        ssim = None  # per image, computed once for the loss and the logged score
        if self.config.ssim_weight:
            ssim = structural_similarity(recon.float(), x)
            recon_loss = recon_loss + self.config.ssim_weight * (1 - ssim.mean())
        losses = {
            "loss": recon_loss + quantized.commitment_loss,
            "recon_loss": recon_loss,
            "commitment_loss": quantized.commitment_loss,
        }
        metrics.update(x, recon.detach().float(), quantized.indices, losses, batch["dataset_id"], ssim)
        return losses["loss"]

    def on_train_batch_start(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        if self.config.kmeans_init and self.trainer.global_step == 0:  # a new run's first step; never a resumed one
            self.model.init_codebook_from_kmeans_(to_float_images(batch["image"]))

    def _train_step(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self._step(batch, self.train_metrics)

    def _val_step(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self._step(batch, self.val_metrics)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self._train_step(batch)
        # Lightning runs the callbacks' on_train_epoch_end (Ray's report, the metrics CSV) before the module's,
        # so the epoch's training metrics are logged with its last batch.
        if batch_idx + 1 == self.trainer.num_training_batches:
            self._log_epoch("train", self.train_metrics.compute_and_reset())
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._val_step(batch)

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
            self.log(
                f"{stage}_{name}",
                value,
                on_step=False,
                on_epoch=True,
                batch_size=1,
                sync_dist=True,
                prog_bar=name in PROGRESS_BAR[stage],
            )

    def configure_optimizers(self):
        # Fused: one kernel for the whole update on a GPU, instead of several per parameter group.
        optimizer = torch.optim.Adam(
            self.model.parameters(), lr=self.config.learning_rate, fused=self.device.type == "cuda"
        )
        if self.config.lr_schedule == "constant":
            return optimizer
        schedule = {
            "cosine": warmup_cosine,
            "cooldown": partial(constant_then_cooldown, share=self.config.cooldown_share),
        }[self.config.lr_schedule]
        factor = partial(schedule, steps=self.trainer.estimated_stepping_batches)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": torch.optim.lr_scheduler.LambdaLR(optimizer, factor), "interval": "step"},
        }


def squared_error_loss(recon: torch.Tensor, target: torch.Tensor, kind: str) -> torch.Tensor:
    """The batch's mean squared error, (B, C, H, W) x 2 -> scalar. 'log-mse' has the gradient of
    mse * mean(log(mse_i)): each image weighted by the inverse of its own error, as a mean of per-image PSNRs weighs
    it, where 'mse' lets the worst images drive the step. Its value is still the mse, so logs compare."""
    per_image = (recon - target).pow(2).mean(dim=(1, 2, 3))  # (B,)
    if kind == "mse":
        return per_image.mean()
    weights = (per_image.mean() / per_image.clamp_min(MIN_IMAGE_MSE)).detach()  # mean(weights) >= 1
    return (weights * per_image).mean()


def warmup_cosine(step: int, steps: int) -> float:
    """The learning rate's factor at `step` of `steps`: linear warm-up over the first WARMUP_SHARE, then cosine to 0."""
    warmup = max(1, round(WARMUP_SHARE * steps))
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, steps - warmup))))


def constant_then_cooldown(step: int, steps: int, share: float) -> float:
    """The learning rate's factor at `step` of `steps`: 1, then a linear decay to 0 over the last `share` of them."""
    cooldown = max(1, round(share * steps))
    return max(0.0, min(1.0, (steps - step) / cooldown))  # 0 past the end: a step beyond the estimate learns nothing

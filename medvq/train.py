"""Training: one Lightning trainer builder, used the same way by a local run and by Ray Train workers."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pandas as pd
import torch

from medvq.config import Config
from medvq.data import MedMNISTDataModule, verified_file
from medvq.errors import UserError
from medvq.module import VQVAEModule

CHECKPOINT_NAME = "model.ckpt"
METRICS_NAME = "metrics.csv"


def resolve_accelerator(requested: str) -> str:
    """"auto" -> "gpu" when CUDA is visible, else "cpu"; an explicit choice is checked, never guessed."""
    if requested == "auto":
        return "gpu" if torch.cuda.is_available() else "cpu"
    if requested == "gpu" and not torch.cuda.is_available():
        raise UserError("--accelerator gpu was asked for, but no CUDA GPU is visible here")
    return requested


def check_data(config: Config) -> None:
    """Fail early, before anything is written, if any dataset file is missing or corrupt."""
    for name in config.datasets:
        verified_file(name, config.data_root, config.size)


class EpochMetrics(L.Callback):
    """Keeps one row of epoch-level metrics per epoch and writes them as CSV (rank zero only)."""

    def __init__(self, path: Path | None = None):
        self.path, self.rows = path, []

    def on_train_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        row = {"epoch": trainer.current_epoch, **{k: float(v) for k, v in trainer.callback_metrics.items()}}
        self.rows.append(row)
        if self.path is not None and trainer.is_global_zero:
            pd.DataFrame(self.rows).to_csv(self.path, index=False)


def build_trainer(config: Config, *, devices: int | str = 1, strategy="auto", plugins=(), callbacks=()) -> L.Trainer:
    """The one place a Lightning Trainer is configured; local and Ray runs differ only in strategy."""
    accelerator = resolve_accelerator(config.accelerator)
    return L.Trainer(
        accelerator=accelerator,
        devices=devices,
        strategy=strategy,
        plugins=list(plugins),
        callbacks=list(callbacks),
        precision="bf16-mixed" if accelerator == "gpu" else "32-true",
        max_epochs=config.epochs,
        limit_train_batches=config.limit_batches or 1.0,
        limit_val_batches=config.limit_batches or 1.0,
        use_distributed_sampler=False,  # the data module shards by rank itself
        num_sanity_val_steps=0,
        logger=False,  # EpochMetrics writes the per-epoch CSV; Ray Train reports for Tune
        enable_checkpointing=False,
        enable_model_summary=False,
    )


def train_local(config: Config, out_dir: Path) -> dict[str, float]:
    """Train in this process on the CPU or one GPU; writes model.ckpt and metrics.csv to out_dir."""
    L.seed_everything(config.seed, verbose=False)
    history = EpochMetrics(out_dir / METRICS_NAME)
    trainer = build_trainer(config, callbacks=[history])
    trainer.fit(VQVAEModule(config.to_dict()), datamodule=MedMNISTDataModule(config))
    trainer.save_checkpoint(out_dir / CHECKPOINT_NAME)
    return history.rows[-1]

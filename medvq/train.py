"""Training: one Lightning trainer builder, used the same way by a local run and by Ray Train workers."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Callable

import lightning as L
import pandas as pd
import ray.train
import torch
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.lightning import RayDDPStrategy, RayLightningEnvironment, RayTrainReportCallback, prepare_trainer
from ray.train.torch import TorchConfig, TorchTrainer

from medvq.config import Config
from medvq.data import MedMNISTDataModule
from medvq.errors import UserError
from medvq.module import VQVAEModule

CHECKPOINT_NAME = "model.ckpt"
METRICS_NAME = "metrics.csv"
# Ray Train's controller polls its workers every 2 s by default and a worker's report waits for the poll, so
# epochs shorter than that (a smoke run's; likely a GPU's) were held to ~2 s. Measured on 2 CPU cores, a tiny model's
# epochs: 1.60 s at 2 s, 0.47 s at 0.5 s, with no CPU cost seen on a real-size run. Ray Train passes the variable
# from the process that calls fit() to its controller; a value set by the user is kept.
CONTROLLER_POLL_ENV, CONTROLLER_POLL_SECONDS = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5"


def resolve_accelerator(requested: str) -> str:
    """"auto" -> "gpu" when CUDA is visible, else "cpu"; an explicit choice is checked, never guessed."""
    if requested == "auto":
        return "gpu" if torch.cuda.is_available() else "cpu"
    if requested == "gpu" and not torch.cuda.is_available():
        raise UserError("--accelerator gpu was asked for, but no CUDA GPU is visible here")
    return requested


class EpochMetrics(L.Callback):
    """Keeps one row of epoch-level metrics per epoch and writes them as CSV (rank zero only)."""

    def __init__(self, path: Path | None = None):
        self.path, self.rows = path, []

    def on_train_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        row = {"epoch": trainer.current_epoch, **{k: float(v) for k, v in trainer.callback_metrics.items()}}
        self.rows.append(row)
        if self.path is not None and trainer.is_global_zero:
            pd.DataFrame(self.rows).to_csv(self.path, index=False)


def build_trainer(config: Config, *, devices: int | str = 1, strategy="auto", plugins=(), callbacks=(),
                  progress_bar: bool = True) -> L.Trainer:
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
        enable_progress_bar=progress_bar,
    )


def train_local(config: Config, out_dir: Path) -> dict[str, float]:
    """Train in this process on the CPU or one GPU; writes model.ckpt and metrics.csv to out_dir."""
    L.seed_everything(config.seed, verbose=False)
    history = EpochMetrics(out_dir / METRICS_NAME)
    trainer = build_trainer(config, callbacks=[history])
    trainer.fit(VQVAEModule(config.to_dict()), datamodule=MedMNISTDataModule(config))
    trainer.save_checkpoint(out_dir / CHECKPOINT_NAME)
    return history.rows[-1]


def train_worker(config_dict: dict) -> None:
    """Ray Train's per-worker function (Ray forbids returning tensors from it)."""
    fit_worker(config_dict)


def fit_worker(config_dict: dict) -> VQVAEModule:
    """The local trainer with Ray's DDP strategy, on one Ray Train worker; returns the fitted module.

    Reports metrics and a checkpoint every epoch. When Ray Train resumes a run (same name and storage)
    or retries after a worker failure, training continues from the newest checkpoint.
    """
    config = Config.from_dict(config_dict)
    L.seed_everything(config.seed, verbose=False)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # no per-worker banners in the driver log
    trainer = build_trainer(
        config,
        devices="auto",
        # The codebook's EMA is all-reduced by the quantizer itself; broadcasting rank 0's buffers on
        # every forward would be redundant work (and would hide a bug in that all-reduce).
        strategy=RayDDPStrategy(forward_sync_buffers=False),
        plugins=[RayLightningEnvironment()],
        callbacks=[RayTrainReportCallback()],
        progress_bar=False,  # Ray shows the run's progress; per-worker bars would flood the driver log
    )
    trainer = prepare_trainer(trainer)
    module, data = VQVAEModule(config.to_dict()), MedMNISTDataModule(config)
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        trainer.fit(module, datamodule=data)
    else:
        with checkpoint.as_directory() as directory:
            trainer.fit(module, datamodule=data, ckpt_path=Path(directory) / RayTrainReportCallback.CHECKPOINT_NAME)
    return module


def train_distributed(config: Config, *, storage: str, name: str, callbacks=(),
                      per_worker: Callable[[dict], None] = train_worker) -> ray.train.Result:
    """Run `per_worker` on `config.workers` Ray Train workers (Lightning DDP: NCCL on GPU, gloo on CPU).

    The run lives at storage/name; calling again with the same name resumes it from its last checkpoint.
    """
    os.environ.setdefault(CONTROLLER_POLL_ENV, CONTROLLER_POLL_SECONDS)
    use_gpu = config.gpus_per_worker > 0
    # Explicit, never guessed: a CPU worker may still see the node's GPUs.
    config = config.with_changes(accelerator="gpu" if use_gpu else "cpu")
    # One worker per GPU; several one-worker runs may share a GPU through fractional gpus_per_worker.
    resources = {"CPU": config.cpus_per_worker, **({"GPU": config.gpus_per_worker} if use_gpu else {})}
    scaling = ScalingConfig(num_workers=config.workers, use_gpu=use_gpu, resources_per_worker=resources)
    # Two newest checkpoints: the last one resumes the run, and the one before still exists if Tune (ASHA)
    # stops a trial whose run has already written one more epoch. Retry failed workers twice.
    run = RunConfig(name=name, storage_path=storage, checkpoint_config=CheckpointConfig(num_to_keep=2),
                    failure_config=FailureConfig(max_failures=2), callbacks=list(callbacks))
    trainer = TorchTrainer(per_worker, train_loop_config=config.to_dict(), scaling_config=scaling, run_config=run,
                           torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"))
    return trainer.fit()


def train_on_ray(config: Config, out_dir: Path, storage: str) -> dict[str, float]:
    """A Ray Train run named after its config: model.ckpt and metrics.csv land in out_dir as for a local
    run. Running the same config again resumes it from its last checkpoint in `storage`."""
    result = train_distributed(config, storage=storage, name=config.run_name())
    with result.checkpoint.as_directory() as directory:
        shutil.copyfile(Path(directory) / RayTrainReportCallback.CHECKPOINT_NAME, out_dir / CHECKPOINT_NAME)
    result.metrics_dataframe.to_csv(out_dir / METRICS_NAME, index=False)
    return result.metrics

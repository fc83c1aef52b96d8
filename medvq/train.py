"""Training: one Lightning trainer builder, used the same way by a local run and by Ray Train workers (whose runs
medvq.ray_train starts)."""

from __future__ import annotations

import logging
import math
import tempfile
import time
from functools import partial
from pathlib import Path

import lightning as L
import pandas as pd
import ray.train
from ray.train.lightning import RayDDPStrategy, RayLightningEnvironment, prepare_trainer

from medvq.checkpoints import read_checkpoint
from medvq.collector import back_to_pythons_pace
from medvq.config import Config, results_shaping
from medvq.datamodule import MedMNISTDataModule
from medvq.devices import resolve_accelerator, resolve_precision
from medvq.errors import RunFailed, Stopped, UserError
from medvq.module import VQVAEModule
from medvq.provenance import PROVENANCE_FILE
from medvq.run_files import CHECKPOINT_NAME, DIVERGED, EPOCH_SECONDS, EPOCHS_DONE, METRICS_NAME, TRAIN_CHECKPOINT, kept
from medvq.storage import ERROR_FILE, PARTIAL, replace_atomically

CHECKED_LOSSES = ("train_loss", "val_loss", "val_nmse")  # any of them non-finite: the run diverged


CHECK_SHARE = 0.05  # of the training time, at most, that adaptive checks (validation, report, checkpoint) take
# Adaptive checks still come at least this often: a resume point and a progress line, even after a check slowed
# by a first compile or a slow upload
MOST_SECONDS_BETWEEN_CHECKS = 600


def epochs_between_checks(check_seconds: float, epoch_seconds: float) -> int:
    """Epochs to train before the next check, so that a check of `check_seconds` costs at most CHECK_SHARE of the
    training time, whose epochs take `epoch_seconds` each, and checks come at least every
    MOST_SECONDS_BETWEEN_CHECKS: at least one."""
    epoch_seconds = max(epoch_seconds, 1e-3)  # an epoch timed as 0 s (a coarse clock) plans no endless gap
    needed = math.ceil(check_seconds / (CHECK_SHARE * epoch_seconds))
    return max(1, min(needed, math.floor(MOST_SECONDS_BETWEEN_CHECKS / epoch_seconds)))


class EpochRecorder(L.Callback):
    """At each epoch's end the epoch's metrics join the run's history; at each check (validation, then a checkpoint
    kept by `save`, in a subclass) the history is saved inside the checkpoint, so a run resumed from one holds each
    epoch once.

    Checks come every `check_every` epochs and after the last. None: adaptive, the first epoch checked to measure
    what a check costs, then re-planned from each check's seconds (`epochs_between_checks`), as rank zero plans it
    so that every rank checks together. Lightning validates when (epoch + 1) is a multiple of
    check_val_every_n_epoch, so the next check's epoch + 1 is set as that.

    A non-finite loss stops the run at the end of that epoch with no checkpoint of it: `diverged` says why, and
    the last checkpoint is the last checked epoch, all of whose losses were finite. (Checked on the epoch's means,
    which Lightning has already synchronised: no extra wait for the GPU on any step.)
    """

    def __init__(self, check_every: int | None = 1):
        self.check_every = check_every
        self.rows: list[dict[str, float]] = []
        self.diverged: str | None = None
        self.epoch_started = self.validation_started = time.monotonic()
        self.trained_seconds: list[float] = []  # of each epoch since the last check, validation excluded
        self.next_check = 0
        self.checkpointed: list[dict[str, float]] = []  # the rows the last checkpoint holds

    def state_dict(self) -> dict:
        return {"rows": self.rows}

    def load_state_dict(self, state: dict) -> None:
        self.rows = list(state["rows"])
        self.checkpointed = list(self.rows)

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._plan_check(trainer, trainer.current_epoch, self.check_every or 1)  # a resumed run's epoch is restored

    def on_train_epoch_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.epoch_started = time.monotonic()

    def on_validation_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.validation_started = time.monotonic()

    def on_train_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        checked = trainer.current_epoch == self.next_check
        row = self._row(trainer, checked)
        self.trained_seconds.append(self.validation_started - self.epoch_started if checked else row[EPOCH_SECONDS])
        non_finite = [name for name in CHECKED_LOSSES if not math.isfinite(row.get(name, 0.0))]
        if non_finite:
            self.diverged = f"{non_finite[0]} became {row[non_finite[0]]} in epoch {row['epoch']}"
            trainer.should_stop = True
            self.stop(trainer, row)
            return
        self.rows.append(row)
        if checked:
            self._check(trainer, row)

    def _row(self, trainer: L.Trainer, checked: bool) -> dict[str, float]:
        """The epoch's history row: its metrics (val_* only when it was checked: Lightning keeps the last ones)."""
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if checked or not k.startswith("val_")}
        return {"epoch": trainer.current_epoch, **metrics, EPOCH_SECONDS: time.monotonic() - self.epoch_started}

    def _check(self, trainer: L.Trainer, row: dict[str, float]) -> None:
        """Keep a checkpoint after the epoch's validation, then plan the next check."""
        self.save(trainer, row)
        self.checkpointed = list(self.rows)
        check_seconds = time.monotonic() - self.validation_started
        epoch_seconds = sum(self.trained_seconds) / len(self.trained_seconds)
        epochs = self.check_every or epochs_between_checks(check_seconds, epoch_seconds)
        self._plan_check(trainer, trainer.current_epoch + 1, epochs)

    def _plan_check(self, trainer: L.Trainer, first_epoch: int, epochs: int) -> None:
        """Check after `epochs` epochs from `first_epoch` on, or after the last if sooner: as rank zero plans it."""
        epochs = trainer.strategy.broadcast(epochs, src=0)
        self.next_check = min(first_epoch + epochs - 1, trainer.max_epochs - 1)
        trainer.check_val_every_n_epoch = self.next_check + 1
        self.trained_seconds = []

    def save(self, trainer: L.Trainer, row: dict[str, float]) -> None:
        raise NotImplementedError

    def stop(self, trainer: L.Trainer, row: dict[str, float]) -> None:
        """What a subclass records of the epoch that diverged."""


def write_history(rows: list[dict[str, float]], path: Path) -> None:
    replace_atomically(path, lambda partial: pd.DataFrame(rows).to_csv(partial, index=False))


class LocalCheckpoints(EpochRecorder):
    """A local run's outputs, after every check: OUT/model.ckpt and OUT/metrics.csv (with the diverged epoch's
    row, when there is one)."""

    def __init__(self, out: Path, check_every: int | None = 1):
        super().__init__(check_every)
        self.out = out

    def save(self, trainer: L.Trainer, row: dict[str, float]) -> None:
        # weights_only=False (the optimizer and loops too, to continue from) said outright: Lightning logs it otherwise
        replace_atomically(self.out / CHECKPOINT_NAME, partial(trainer.save_checkpoint, weights_only=False))
        write_history(self.rows, self.out / METRICS_NAME)

    def stop(self, trainer: L.Trainer, row: dict[str, float]) -> None:
        write_history([*self.rows, row], self.out / METRICS_NAME)


class RayTrainReport(EpochRecorder):
    """At every check, to Ray Train (and through it to Tune): the epoch's metrics and `epochs_done`, with a
    checkpoint folder of TRAIN_CHECKPOINT and the history as METRICS_NAME. The epoch that diverged is reported with
    its reason and no checkpoint. Every rank reports; rank zero's metrics and files are the ones kept."""

    def save(self, trainer: L.Trainer, row: dict[str, float]) -> None:
        with tempfile.TemporaryDirectory(prefix="medvq-checkpoint-", ignore_cleanup_errors=True) as folder:
            trainer.save_checkpoint(Path(folder) / TRAIN_CHECKPOINT, weights_only=False)  # collective; rank zero writes
            checkpoint = None
            if trainer.is_global_zero:
                write_history(self.rows, Path(folder) / METRICS_NAME)
                checkpoint = ray.train.Checkpoint.from_directory(folder)
            ray.train.report(self._metrics(row), checkpoint=checkpoint)  # uploads before it returns

    def stop(self, trainer: L.Trainer, row: dict[str, float]) -> None:
        ray.train.report({**self._metrics(row), DIVERGED: self.diverged})

    @staticmethod
    def _metrics(row: dict[str, float]) -> dict:
        return {**row, EPOCHS_DONE: row["epoch"] + 1}


def check_cadence(config: Config) -> int | None:
    """Epochs between checks: the user's, else every epoch on a CPU (the CPU's defaults, as the ablations ran them)
    and None, adaptive, on a GPU, where a 28 px epoch takes a second or two and a check would be a large share."""
    if config.check_every is not None:
        return config.check_every
    return 1 if resolve_accelerator(config.accelerator) == "cpu" else None


def build_trainer(
    config: Config, *, devices: int | str = 1, strategy="auto", plugins=(), callbacks=(), progress_bar: bool = True
) -> L.Trainer:
    """The one place a Lightning Trainer is configured; local and Ray runs differ only in strategy."""
    accelerator = resolve_accelerator(config.accelerator)
    return L.Trainer(
        accelerator=accelerator,
        devices=devices,
        strategy=strategy,
        plugins=list(plugins),
        callbacks=list(callbacks),
        precision=resolve_precision(config.precision, accelerator),
        max_epochs=config.epochs,
        limit_train_batches=config.limit_batches or 1.0,
        limit_val_batches=config.limit_batches or 1.0,
        use_distributed_sampler=False,  # the data module shards by rank itself
        num_sanity_val_steps=0,
        logger=False,  # an EpochRecorder keeps the per-epoch history and reports it
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=progress_bar,
    )


def local_resume_point(config: Config, out: Path) -> Path | None:
    """The checkpoint to continue from when `out` holds an unfinished local run of these settings; None for a new
    or empty folder. A folder with anything else, a different run or a finished one is refused in one line."""
    # A run stopped before its first checkpoint leaves only its provenance and why it stopped, or a save cut short
    left = (PROVENANCE_FILE, ERROR_FILE)
    if not out.exists() or all(path.name.endswith(PARTIAL) or path.name in left for path in out.iterdir()):
        return None
    checkpoint = out / CHECKPOINT_NAME
    if not checkpoint.is_file():
        raise UserError(f"--out {out} is not empty and holds no {CHECKPOINT_NAME} to continue: choose a new folder")
    saved = read_checkpoint(checkpoint)
    trained = Config.from_dict(saved["hyper_parameters"]["config"])
    if trained.run_name() != config.run_name():
        wanted, had = results_shaping(config), results_shaping(trained)
        differing = ", ".join(name for name in wanted if wanted[name] != had[name])
        raise UserError(
            f"--out {out} holds a run with other settings ({differing}): choose a new folder, "
            "or repeat that run's flags to continue it"
        )
    done = saved["epoch"] + 1
    if done >= config.epochs:
        raise UserError(f"--out {out} holds this run, finished ({done} epochs): nothing to train; choose a new folder")
    return checkpoint


def train_local(config: Config, out_dir: Path) -> dict[str, float]:
    """Train in this process on the CPU or one GPU; model.ckpt and metrics.csv in out_dir are rewritten after
    every check (`check_every`), and the same call continues an interrupted run. Returns the last epoch's metrics."""
    resume = local_resume_point(config, out_dir)
    if resume is not None:
        print(f"continuing the run in {out_dir} from its {CHECKPOINT_NAME}", flush=True)
    back_to_pythons_pace()
    L.seed_everything(config.seed, verbose=False)
    recorder = LocalCheckpoints(out_dir, check_cadence(config))
    trainer = build_trainer(config, callbacks=[recorder])
    try:
        trainer.fit(VQVAEModule(config), datamodule=MedMNISTDataModule(config), ckpt_path=resume)
    except SystemExit:  # Lightning's answer to Ctrl-C (and so to SIGTERM, see cli.run_job)
        if trainer.interrupted:
            raise Stopped(
                f"stopped in epoch {trainer.current_epoch}: {out_dir / CHECKPOINT_NAME} holds "
                f"{len(recorder.checkpointed)} epochs; the same command continues"
            ) from None
        raise
    if recorder.diverged:
        left = kept(recorder.checkpointed, out_dir / CHECKPOINT_NAME)
        raise RunFailed(f"training diverged: {recorder.diverged}; {left}")
    return recorder.rows[-1]


def fit_on_worker(config: Config) -> str | None:
    """One Ray Train worker's training (ray_train.train_worker): the local trainer with Ray's DDP strategy. Reports
    metrics and a checkpoint at every check (`check_every`); when Ray Train resumes the run (same name and storage)
    or retries it after a worker failed, training continues from the newest checkpoint.

    Returns why the run diverged, or None: rank zero's return value is the run's `return_value`, while its metrics
    are those of its last checkpoint.
    """
    back_to_pythons_pace()
    L.seed_everything(config.seed, verbose=False)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # no per-worker banners in the driver log
    trainer = build_trainer(
        config,
        devices="auto",
        # The codebook's EMA is all-reduced by the quantizer itself; broadcasting rank 0's buffers on
        # every forward would be redundant work (and would hide a bug in that all-reduce).
        strategy=RayDDPStrategy(forward_sync_buffers=False),
        plugins=[RayLightningEnvironment()],
        callbacks=[recorder := RayTrainReport(check_cadence(config))],
        progress_bar=False,  # Ray shows the run's progress; per-worker bars would flood the driver log
    )
    trainer = prepare_trainer(trainer)
    module, data = VQVAEModule(config), MedMNISTDataModule(config)
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        trainer.fit(module, datamodule=data)
    else:
        with checkpoint.as_directory() as directory:
            trainer.fit(module, datamodule=data, ckpt_path=Path(directory) / TRAIN_CHECKPOINT)
    return recorder.diverged

"""Training: one Lightning trainer builder, used the same way by a local run and by Ray Train workers."""

from __future__ import annotations

import logging
import math
import os
import queue
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from functools import partial
from pathlib import Path

import lightning as L
import pandas as pd
import ray.train
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.lightning import RayDDPStrategy, RayLightningEnvironment, prepare_trainer
from ray.train.torch import TorchConfig, TorchTrainer
from ray.util.queue import Queue

from medvq.checkpoints import read_checkpoint
from medvq.config import Config, results_shaping
from medvq.datamodule import MedMNISTDataModule
from medvq.devices import resolve_accelerator, resolve_precision
from medvq.errors import RunFailed, Stopped, UserError
from medvq.module import VQVAEModule
from medvq.provenance import PROVENANCE_FILE
from medvq.storage import ERROR_FILE, PARTIAL, replace_atomically

CHECKPOINT_NAME = "model.ckpt"  # a local run's, and the copy every job leaves in its output folder
TRAIN_CHECKPOINT = "checkpoint.ckpt"  # inside a Ray Train checkpoint folder
METRICS_NAME = "metrics.csv"  # the per-epoch history, one row per epoch
CHECKED_LOSSES = ("train_loss", "val_loss", "val_nmse")  # any of them non-finite: the run diverged
DIVERGED, EPOCHS_DONE, EPOCH_SECONDS = (
    "diverged",
    "epochs_done",
    "epoch_seconds",
)  # reported to Ray Train and Tune beside the metrics
# Ray Train's controller polls its workers every 2 s by default and a worker's report waits for the poll, which
# held short epochs (a smoke run's; likely a GPU's) to 2 s (benchmarks/RESULTS.md). Ray Train passes the variable
# from the process that calls fit() to its controller; a value set by the user is kept.
CONTROLLER_POLL_ENV, CONTROLLER_POLL_SECONDS = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5"


class EpochRecorder(L.Callback):
    """At each epoch's end: the epoch's metrics join the run's history, then a checkpoint is kept (`save`, in a
    subclass). The history is saved inside every checkpoint, so a run resumed from one holds each epoch once.

    A non-finite loss stops the run at the end of that epoch with no checkpoint of it: `diverged` says why, and
    the last checkpoint is the last epoch whose losses were all finite. (Checked on the epoch's means, which
    Lightning has already synchronised: no extra wait for the GPU on any step.)
    """

    def __init__(self):
        self.rows: list[dict[str, float]] = []
        self.diverged: str | None = None
        self.epoch_started = time.monotonic()

    def state_dict(self) -> dict:
        return {"rows": self.rows}

    def load_state_dict(self, state: dict) -> None:
        self.rows = list(state["rows"])

    def on_train_epoch_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.epoch_started = time.monotonic()

    def on_train_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        row = {
            "epoch": trainer.current_epoch,
            **{k: float(v) for k, v in trainer.callback_metrics.items()},
            EPOCH_SECONDS: time.monotonic() - self.epoch_started,
        }  # training and validation
        non_finite = [name for name in CHECKED_LOSSES if not math.isfinite(row.get(name, 0.0))]
        if non_finite:
            self.diverged = f"{non_finite[0]} became {row[non_finite[0]]} in epoch {row['epoch']}"
            trainer.should_stop = True
            self.stop(trainer, row)
        else:
            self.rows.append(row)
            self.save(trainer, row)

    def save(self, trainer: L.Trainer, row: dict[str, float]) -> None:
        raise NotImplementedError

    def stop(self, trainer: L.Trainer, row: dict[str, float]) -> None:
        """What a subclass records of the epoch that diverged."""


def write_history(rows: list[dict[str, float]], path: Path) -> None:
    replace_atomically(path, lambda partial: pd.DataFrame(rows).to_csv(partial, index=False))


class LocalCheckpoints(EpochRecorder):
    """A local run's outputs, after every epoch: OUT/model.ckpt and OUT/metrics.csv (with the diverged epoch's
    row, when there is one)."""

    def __init__(self, out: Path):
        super().__init__()
        self.out = out

    def save(self, trainer: L.Trainer, row: dict[str, float]) -> None:
        # weights_only=False (the optimizer and loops too, to continue from) said outright: Lightning logs it otherwise
        replace_atomically(self.out / CHECKPOINT_NAME, partial(trainer.save_checkpoint, weights_only=False))
        write_history(self.rows, self.out / METRICS_NAME)

    def stop(self, trainer: L.Trainer, row: dict[str, float]) -> None:
        write_history([*self.rows, row], self.out / METRICS_NAME)


class RayTrainReport(EpochRecorder):
    """Every epoch, to Ray Train (and through it to Tune): the metrics and `epochs_done`, with a checkpoint folder
    of TRAIN_CHECKPOINT and the history as METRICS_NAME. The epoch that diverged is reported with its reason and
    no checkpoint. Every rank reports; rank zero's metrics and files are the ones kept."""

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


class EpochsToDriver(ray.train.UserCallback):
    """Hands each epoch rank zero reports to the driver through a Ray queue. The callback runs in Ray Train's
    controller, an actor whose prints the job does not forward (`cli.start_ray`)."""

    def __init__(self, epoch_queue: Queue):
        self.epoch_queue: Queue | None = epoch_queue

    def after_report(self, run_context, metrics: list[dict], checkpoint) -> None:
        if self.epoch_queue is None:
            return
        try:
            self.epoch_queue.put(metrics[0])  # blocking: the last epoch is queued before the run's fit() returns
        except ray.exceptions.RayError:
            # The queue is gone (the driver stopped, or its node failed). An error here would fail the whole run:
            # Ray Train retries no error of its controller's callbacks.
            self.epoch_queue = None


@contextmanager
def printed_epochs(name: str, epochs: int) -> Iterator[EpochsToDriver]:
    """While the block runs, the driver prints an `epoch_line` for each epoch the callback it yields hands over:
    outside Tune, whose trial table shows its runs, a long fit would otherwise be silent until it ends."""
    epoch_queue, fit_returned = Queue(actor_options={"num_cpus": 0}), threading.Event()  # never waits for a CPU

    def print_epochs() -> None:
        try:
            while not (fit_returned.is_set() and epoch_queue.empty()):
                with suppress(queue.Empty):
                    print(epoch_line(name, epochs, epoch_queue.get(timeout=1)), flush=True)
        except ray.exceptions.RayError:  # the queue's actor is gone (its node failed): only the lines stop
            pass

    printer = threading.Thread(target=print_epochs, daemon=True)
    printer.start()
    try:
        yield EpochsToDriver(epoch_queue)
    finally:
        fit_returned.set()
        printer.join()
        epoch_queue.shutdown()


def epoch_line(name: str, epochs: int, row: dict) -> str:
    """'NAME: epoch 7/120, val PSNR 28.10 dB, SSIM 0.905, 9.8 s an epoch, about 19 min left', or why it stopped.
    PSNR and SSIM over all val images, as the job's summary gives them."""
    done = row[EPOCHS_DONE]
    if row.get(DIVERGED):
        return f"{name}: diverged: {row[DIVERGED]}"
    minutes_left = max(1, round((epochs - done) * row[EPOCH_SECONDS] / 60))
    return (
        f"{name}: epoch {done}/{epochs}, val PSNR {row['val_psnr']:.2f} dB, SSIM {row['val_ssim']:.3f}, "
        f"{row[EPOCH_SECONDS]:.1f} s an epoch" + (f", about {minutes_left} min left" if done < epochs else "")
    )


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
    every epoch, and the same call continues an interrupted run. Returns the last epoch's metrics."""
    resume = local_resume_point(config, out_dir)
    if resume is not None:
        print(f"continuing the run in {out_dir} from its {CHECKPOINT_NAME}", flush=True)
    L.seed_everything(config.seed, verbose=False)
    recorder = LocalCheckpoints(out_dir)
    trainer = build_trainer(config, callbacks=[recorder])
    try:
        trainer.fit(VQVAEModule(config), datamodule=MedMNISTDataModule(config), ckpt_path=resume)
    except SystemExit:  # Lightning's answer to Ctrl-C (and so to SIGTERM, see cli.run_job)
        if trainer.interrupted:
            raise Stopped(
                f"stopped in epoch {trainer.current_epoch}: {out_dir / CHECKPOINT_NAME} holds "
                f"{len(recorder.rows)} epochs; the same command continues"
            ) from None
        raise
    if recorder.diverged:
        raise RunFailed(f"training diverged: {recorder.diverged}; {kept(recorder.rows, out_dir / CHECKPOINT_NAME)}")
    return recorder.rows[-1]


def kept(rows: list[dict], checkpoint: Path | str) -> str:
    """What a diverged run leaves behind, in words."""
    if not rows:
        return "no checkpoint was written"
    return f"{checkpoint} holds epoch {rows[-1]['epoch']}, the last with finite losses"


def train_worker(loop_config: dict) -> str | None:
    """Ray Train's per-worker function: the local trainer with Ray's DDP strategy, on one worker. Reports metrics and
    a checkpoint every epoch; when Ray Train resumes the run (same name and storage) or retries it after a worker
    failed, training continues from the newest checkpoint.

    `loop_config` is `Config.to_dict()` (Ray hands each worker a dict). Returns why the run diverged, or None: rank
    zero's return value is the run's `return_value`, while its metrics are those of its last checkpoint.
    """
    config = Config.from_dict(loop_config)
    L.seed_everything(config.seed, verbose=False)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # no per-worker banners in the driver log
    trainer = build_trainer(
        config,
        devices="auto",
        # The codebook's EMA is all-reduced by the quantizer itself; broadcasting rank 0's buffers on
        # every forward would be redundant work (and would hide a bug in that all-reduce).
        strategy=RayDDPStrategy(forward_sync_buffers=False),
        plugins=[RayLightningEnvironment()],
        callbacks=[recorder := RayTrainReport()],
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


def run_on_ray(config: Config, *, storage: str, name: str, callbacks=()) -> ray.train.Result:
    """Run `train_worker` on `config.workers` Ray Train workers (Lightning DDP: NCCL on GPU, gloo on CPU), from any
    driver: jobs/train.py's process or a Tune trial. The run lives at storage/name; calling again with the same
    name resumes it from its last checkpoint.
    """
    os.environ.setdefault(CONTROLLER_POLL_ENV, CONTROLLER_POLL_SECONDS)
    use_gpu = config.gpus_per_worker > 0  # decided by the job (medvq.devices); here only carried out
    # Explicit, never guessed: a CPU worker may still see the node's GPUs.
    config = config.with_changes(accelerator="gpu" if use_gpu else "cpu")
    # One worker per GPU; several one-worker runs may share a GPU through fractional gpus_per_worker.
    resources = {"CPU": config.cpus_per_worker, **({"GPU": config.gpus_per_worker} if use_gpu else {})}
    scaling = ScalingConfig(num_workers=config.workers, use_gpu=use_gpu, resources_per_worker=resources)
    # Two newest checkpoints: the last one resumes the run, and the one before still exists if Tune (ASHA)
    # stops a trial whose run has already written one more epoch. Retry failed workers twice.
    run = RunConfig(
        name=name,
        storage_path=storage,
        checkpoint_config=CheckpointConfig(num_to_keep=2),
        failure_config=FailureConfig(max_failures=2),
        callbacks=list(callbacks),
    )
    trainer = TorchTrainer(
        train_worker,
        train_loop_config=config.to_dict(),
        scaling_config=scaling,
        run_config=run,
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
    )
    return trainer.fit()


def train_on_ray(config: Config, out_dir: Path, storage: str, name: str) -> dict[str, float]:
    """The Ray Train run `name`: model.ckpt and metrics.csv land in out_dir as for a local run. Running it again
    resumes it from its last checkpoint in `storage`."""
    with printed_epochs(name, config.epochs) as progress:
        result = run_on_ray(config, storage=storage, name=name, callbacks=[progress])
    rows = []
    if result.checkpoint is not None:
        with result.checkpoint.as_directory() as directory:
            shutil.copyfile(Path(directory) / TRAIN_CHECKPOINT, out_dir / CHECKPOINT_NAME)
            shutil.copyfile(Path(directory) / METRICS_NAME, out_dir / METRICS_NAME)
        rows = pd.read_csv(out_dir / METRICS_NAME).to_dict("records")
    if result.return_value is not None:
        raise RunFailed(f"training diverged: {result.return_value}; {kept(rows, out_dir / CHECKPOINT_NAME)}")
    return rows[-1]

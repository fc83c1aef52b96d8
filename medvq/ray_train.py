"""Ray Train runs of medvq's Lightning trainer, from any driver: jobs/train.py, a Tune trial, the sweep's final fit.

Only the workers train, so only they import Lightning (medvq.train) and torch (medvq.process_group): a run's driver
and Ray Train's controller import this module, and each of those imports costs seconds of a core in every process
that makes it.
"""

from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import pandas as pd
import ray.train
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer
from ray.util.queue import Queue

from medvq.config import Config
from medvq.errors import RunFailed
from medvq.nodes import nodes_can_leave
from medvq.process_group import TorchProcessGroup
from medvq.run_files import CHECKPOINT_NAME, DIVERGED, EPOCH_SECONDS, EPOCHS_DONE, METRICS_NAME, TRAIN_CHECKPOINT, kept

# Ray Train's controller polls its workers every 2 s by default and a worker's report waits for the poll, which
# held short epochs (a smoke run's; likely a GPU's) to 2 s (benchmarks/RESULTS.md). Ray Train passes the variable
# from the process that calls fit() to its controller; a value set by the user is kept.
CONTROLLER_POLL_ENV, CONTROLLER_POLL_SECONDS = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5"
PREEMPTION_WATCHER_ENV = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"  # passed on the same way
# The newest checkpoints a run keeps: the last resumes it, and the two before cover a Tune trial that ASHA stops while
# its run goes on (it ends with the trial's process, seconds later). The controller keeps (and prunes, oldest first)
# each report's one checkpoint before TuneReportCallback hands the report to Tune through a queue of one, blocking
# while it is full: once Tune stops taking reports, at most two more are kept, and the one Tune recorded stays
# (benchmarks/RESULTS.md; a test makes a trial slow to stop). Pruning by a score instead would bring the race back.
CHECKPOINTS_KEPT = 3
PRINTER_WAIT_SECONDS = 30  # for the epoch printer to finish: it always does unless the queue's actor hangs


class EpochsToDriver(ray.train.UserCallback):
    """Hands each check's epoch rank zero reports to the driver through a Ray queue. The callback runs in Ray Train's
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
    """While the block runs, the driver prints an `epoch_line` for each reported epoch that the callback it yields
    hands over: outside Tune, whose trial table shows its runs, a long fit would otherwise be silent until it ends."""
    epoch_queue = Queue(actor_options={"num_cpus": 0})  # never waits for a CPU

    def print_epochs() -> None:
        try:
            while (row := epoch_queue.get()) is not None:  # None: the block has ended
                print(epoch_line(name, epochs, row), flush=True)
        except ray.exceptions.RayError:  # the queue's actor is gone (its node failed): only the lines stop
            pass

    printer = threading.Thread(target=print_epochs, daemon=True)
    printer.start()
    try:
        yield EpochsToDriver(epoch_queue)
    finally:
        with suppress(ray.exceptions.RayError):  # gone: the printer's get has failed too
            epoch_queue.put(None)  # behind the last epoch, which the callback queued before fit() returned
        printer.join(timeout=PRINTER_WAIT_SECONDS)
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


def train_worker(loop_config: dict) -> str | None:
    """Ray Train's per-worker function: `medvq.train.fit_on_worker` of `loop_config`, `Config.to_dict()` (Ray hands
    each worker a dict). Returns why the run diverged, or None."""
    from medvq.train import fit_on_worker  # Lightning: imported by the workers alone (see the module's docstring)

    return fit_on_worker(Config.from_dict(loop_config))


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
    run = RunConfig(
        name=name,
        storage_path=storage,
        checkpoint_config=CheckpointConfig(num_to_keep=CHECKPOINTS_KEPT),
        failure_config=FailureConfig(max_failures=2),  # a failed worker is retried twice
        callbacks=list(callbacks),
    )
    trainer = DataParallelTrainer(
        train_worker,
        train_loop_config=config.to_dict(),
        backend_config=TorchProcessGroup(backend="nccl" if use_gpu else "gloo"),
        scaling_config=scaling,
        run_config=run,
    )
    with preemption_watched_where_nodes_can_leave():
        return trainer.fit()


@contextmanager
def preemption_watched_where_nodes_can_leave() -> Iterator[None]:
    """While the block runs, Ray Train starts its preemption watcher (a process per run, benchmarks/RESULTS.md) only
    if a node can leave: it watches for the nodes Ray drains. Decided at each run, as nodes may join; a value the
    user set is kept."""
    if PREEMPTION_WATCHER_ENV in os.environ:
        yield
        return
    os.environ[PREEMPTION_WATCHER_ENV] = "1" if nodes_can_leave() else "0"
    try:
        yield
    finally:
        del os.environ[PREEMPTION_WATCHER_ENV]


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

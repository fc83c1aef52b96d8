"""The Ray Tune search: every trial is a Ray Train run of the same trainer, with codebook size, commitment weight
and seed changed. Objective: `val_nmse` (per-dataset-normalised validation error), never the total loss, whose
commitment term changes with the weight being searched."""

from __future__ import annotations

import io
import json
import math
import os
import re
import signal
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
from pyarrow.fs import FileType
from ray import tune
from ray.tune.experiment import Trial
from ray.tune.integration.ray_train import CHECKPOINT_PATH_KEY, TuneReportCallback
from ray.tune.schedulers import ASHAScheduler

from medvq.config import Config, SweepConfig
from medvq.errors import RunFailed, Stopped, UserError
from medvq.nodes import capacity
from medvq.ray_train import run_on_ray
from medvq.run_files import CHECKPOINT_NAME, DIVERGED, EPOCHS_DONE, METRICS_NAME, TRAIN_CHECKPOINT
from medvq.storage import info, is_file, join, read_bytes, uri_on

OBJECTIVE, MODE = "val_nmse", "min"
SEARCHED = ("codebook_size", "commitment_weight", "seed")
ORDER = "order"  # a trial's place in `trial_order`: the one grid Tune expands, so it starts trials in that order
GRACE_OBJECTIVE = f"{OBJECTIVE}_at_grace"  # the objective after the grace epochs, which every trial ran
MODEL_STATUSES = ("finished", "stopped")  # trials that left a usable model ("stopped": early, by ASHA)
TRIAL_DRIVER_MEMORY = 256 * 1024**2  # bytes
# Tune restarts a trial whose driver died with its node; the restart resumes the trial's Train run.
TRIAL_RETRIES = 1


def trial_order(sweep: SweepConfig) -> list[dict]:
    """Every trial's searched values, in the order Tune starts them: one repeat after another (a grid's seeds, or the
    samples of weights), and within a repeat the codebook sizes and weights interleaved, so that any run of
    consecutive trials holds every value about equally often. ASHA's first rungs are set by the first trials to reach
    them; in Tune's own grid order those were all of one weight, which then stopped the other weights' trials."""
    sizes = sweep.codebook_sizes
    if not sweep.commitment_grid:  # one weight per trial, drawn log-uniformly, the same on every run of this sweep
        draws = np.random.default_rng(sweep.base.seed).uniform(*np.log(sweep.commitment_range), sweep.trial_count)
        weights = iter(np.exp(draws).tolist())
        return [
            {"codebook_size": size, "commitment_weight": next(weights), "seed": sweep.base.seed}
            for _ in range(sweep.num_samples)
            for size in sizes
        ]
    weights, n, m = sweep.commitment_grid, len(sweep.codebook_sizes), len(sweep.commitment_grid)
    period = math.lcm(n, m)  # trial t: size t mod n, weight t mod m shifted by one each period; so every pair once
    return [
        {"codebook_size": sizes[t % n], "commitment_weight": weights[(t + t // period) % m], "seed": seed}
        for seed in sweep.seeds
        for t in range(n * m)
    ]


def search_space(sweep: SweepConfig) -> dict:
    """One grid over the trials' places in `trial_order`; each searched value looked up from its place (so Tune's
    trial table shows them as columns of their own)."""
    order = trial_order(sweep)
    lookups = {name: tune.sample_from(lambda config, name=name: order[config[ORDER]][name]) for name in SEARCHED}
    return {ORDER: tune.grid_search(list(range(len(order)))), **lookups}


def run_trial(params: dict, base: Config, storage: str) -> None:
    """One Tune trial = one Ray Train run, reporting to Tune every epoch whatever --check-every says (it is the final
    fit's): ASHA and the grace epochs compare trials epoch by epoch.

    Its Train run is named after the trial, so a resumed sweep (or a retried trial) resumes an unfinished
    trial's run from its last checkpoint.
    """
    config = base.with_changes(**{name: params[name] for name in SEARCHED}, check_every=1)
    context = tune.get_context()
    run_on_ray(
        config,
        storage=storage,
        name=f"{context.get_experiment_name()}-{context.get_trial_id()}",
        callbacks=[TuneReportCallback()],
    )


def final_fit_name(name: str) -> str:
    """The Ray Train run of the final fit of the sweep `name`: resumed, like the sweep, by the same command."""
    return f"{name}-final"


def sweep_start(sweep: SweepConfig, storage: str, name: str, out: str) -> str:
    """Whether the job starts the sweep `name` or resumes it, and how far it got: 'new sweep NAME: 15 trials', or
    'resuming sweep NAME: 7 of 15 trials done, final fit not started'."""
    path = join(storage, name)
    if not tune.Tuner.can_restore(path):
        return f"new sweep {name}: {sweep.trial_count} trials"
    statuses = [trial.status for trial in tune.ExperimentAnalysis(path).trials]
    line = f"resuming sweep {name}: {statuses.count(Trial.TERMINATED)} of {sweep.trial_count} trials done"
    if failed := statuses.count(Trial.ERROR):  # resumed with resume_errored (_tuner): they run again
        line += f", {failed} failed, to run again"
    if not sweep.final_epochs:
        return line
    best = join(out, "best.json")
    if is_file(best) and "final_fit" in json.loads(read_bytes(best)):
        return f"{line}, final fit done"
    started = info(join(storage, final_fit_name(name))).type != FileType.NotFound
    return f"{line}, final fit {'started' if started else 'not started'}"


def _tuner(sweep: SweepConfig, storage: str, name: str) -> tune.Tuner:
    """A new Tuner, or the stored one when this sweep already ran here: finished trials are not run again."""
    trainable = tune.with_parameters(run_trial, base=sweep.base, storage=storage)
    # The trial function only drives its Train run: the Train workers hold the CPUs and GPUs, so the
    # driver asks for a little memory only (Tune needs some request) and never blocks a worker's CPU.
    trainable = tune.with_resources(trainable, {"CPU": 0, "memory": TRIAL_DRIVER_MEMORY})
    path = join(storage, name)
    if tune.Tuner.can_restore(path):
        # The same space again: Tune saves its lookups as placeholders, and trials not yet started need them.
        space = search_space(sweep)
        return tune.Tuner.restore(path, trainable, resume_unfinished=True, resume_errored=True, param_space=space)
    limit = sweep.max_concurrent_trials or capacity().runs_at_once(sweep.base)
    # Epochs trained, not Tune's report count: a trial resumed from its Train checkpoint counts from there.
    scheduler = ASHAScheduler(time_attr=EPOCHS_DONE, max_t=sweep.base.epochs, grace_period=sweep.grace_epochs)
    return tune.Tuner(
        trainable,
        param_space=search_space(sweep),
        tune_config=tune.TuneConfig(
            metric=OBJECTIVE,
            mode=MODE,
            scheduler=scheduler,
            # a grid's repeats are its seeds; sampled weights are drawn num_samples times
            num_samples=1 if sweep.commitment_grid else sweep.num_samples,
            max_concurrent_trials=limit,
        ),
        run_config=tune.RunConfig(
            name=name,
            storage_path=storage,
            verbose=1,
            failure_config=tune.FailureConfig(max_failures=TRIAL_RETRIES),
            # Kept in the stored Tuner: a resumed sweep prints its progress too.
            callbacks=[SearchProgress(sweep.trial_count, sweep.base.epochs)],
        ),
    )


class SearchProgress(tune.Callback):
    """A line as each trial ends: trials done of all, the best so far (the objective and its settings) and about how
    long the rest takes (the trials left, each the mean time of the trials ended so far, as many at once as ran at
    once). Tune's trial table scrolls past; this says where the search stands."""

    def __init__(self, trials: int, epochs: int):
        self.trials, self.epochs = trials, epochs

    def setup(self, **info) -> None:  # each fit(), the first or a resumed one
        self.started: dict[str, float] = {}
        self.seconds: list[float] = []
        self.at_once = 1

    def on_trial_start(self, iteration: int, trials: list[Trial], trial: Trial, **info) -> None:
        self.started[trial.trial_id] = time.monotonic()
        running = {t.trial_id for t in trials if t.status == Trial.RUNNING} | {trial.trial_id}
        self.at_once = max(self.at_once, len(running))

    def on_trial_complete(self, iteration: int, trials: list[Trial], trial: Trial, **info) -> None:
        if trial.status == Trial.RUNNING:  # not a trial that never started, dropped as the search ends
            self.print_line(trials, trial, metrics_status(trial.last_result, self.epochs))

    def on_trial_error(self, iteration: int, trials: list[Trial], trial: Trial, **info) -> None:
        self.print_line(trials, trial, ("failed", ""))

    def print_line(self, trials: list[Trial], trial: Trial, outcome: tuple[str, str]) -> None:
        if trial.trial_id in self.started:
            self.seconds.append(time.monotonic() - self.started.pop(trial.trial_id))
        ended = [t for t in trials if t.status in (Trial.TERMINATED, Trial.ERROR) and t is not trial]
        print(progress_line([*ended, trial], outcome, self.trials, self.at_once, self.seconds), flush=True)


def progress_line(ended: list[Trial], outcome: tuple[str, str], trials: int, at_once: int, seconds: list[float]) -> str:
    """'search: 7 of 15 trials done; 5e42f_00006 stopped by ASHA at epoch 2 (val_nmse 0.0931); best so far val_nmse
    0.0874 (codebook 256, commitment 0.31, seed 0); about 12 min left'. `ended` ends with the trial that just ended,
    and `outcome` is its (status, reason)."""
    last, (status, reason) = ended[-1], outcome
    line = f"search: {len(ended)} of {trials} trials done; {last.trial_id} {status}"
    if status == "stopped":
        line += " by ASHA"
    if status in MODEL_STATUSES:
        line += f" at epoch {last.last_result[EPOCHS_DONE]} ({OBJECTIVE} {last.last_result[OBJECTIVE]:.4f})"
    elif reason:
        line += f": {reason}"
    usable = [
        t
        for t in ended
        if t.status != Trial.ERROR
        and DIVERGED not in t.last_result
        and math.isfinite(t.last_result.get(OBJECTIVE, math.nan))
    ]
    if usable:
        best = min(usable, key=lambda t: t.last_result[OBJECTIVE])
        line += (
            f"; best so far {OBJECTIVE} {best.last_result[OBJECTIVE]:.4f} (codebook {best.config['codebook_size']}, "
            f"commitment {best.config['commitment_weight']:.3g}, seed {best.config['seed']})"
        )
    left = trials - len(ended)
    if left and seconds:
        line += f"; about {max(1, round(left / min(at_once, left) * np.mean(seconds) / 60))} min left"
    return line


@contextmanager
def stopped_gracefully_by_signals():
    """Ctrl-C or SIGTERM during the search trigger Tune's own graceful stop (SIGUSR1: it saves the experiment
    state one last time, so the same command resumes exactly where it stopped); a second one stops at once.
    Yields the signals received."""
    received: list[int] = []

    def stop(signum: int, frame) -> None:
        received.append(signum)
        if len(received) > 1 or not callable(signal.getsignal(signal.SIGUSR1)):  # a second one, or Tune not yet up
            raise KeyboardInterrupt
        signal.raise_signal(signal.SIGUSR1)

    handled = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)
    previous = {signum: signal.getsignal(signum) for signum in handled}
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"  # Tune's own would not tell us it was interrupted
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    try:
        yield received
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def run_sweep(sweep: SweepConfig, storage: str, name: str) -> tune.ResultGrid:
    """Run (or resume) the search `name` in `storage`. Raises Stopped when a signal stopped it."""
    with stopped_gracefully_by_signals() as received:
        results = _tuner(sweep, storage, name).fit()
    if received:
        raise Stopped(
            f"the sweep was stopped by {signal.Signals(received[0]).name}; its state is saved in "
            f"{join(storage, name)}: the same command resumes it"
        )
    return results


def read_trial_history(checkpoint_path: str) -> pd.DataFrame:
    """The per-epoch history saved in a trial's checkpoint folder: each epoch once, however often it resumed."""
    return pd.read_csv(io.BytesIO(read_bytes(join(checkpoint_path, METRICS_NAME))))


def error_line(error: BaseException) -> str:
    """The last line of a trial's error (the exception itself; a Ray error's first line only names the task),
    without the terminal colours Ray puts in it."""
    lines = [line for line in re.sub(r"\x1b\[[0-9;]*m", "", str(error)).splitlines() if line.strip()]
    return lines[-1].strip() if lines else type(error).__name__


def trial_status(result: tune.Result, epochs: int) -> tuple[str, str]:
    """(status, reason): "error" (failed for good), "diverged", "stopped" (early, by ASHA) or "finished"."""
    if result.error is not None:
        return "error", error_line(result.error)
    return metrics_status(result.metrics, epochs)


def metrics_status(last: dict | None, epochs: int) -> tuple[str, str]:
    """`trial_status` of a trial that raised no error, from its last metrics (None if it never reported)."""
    last = last or {}
    if DIVERGED in last:
        return "diverged", last[DIVERGED]
    if EPOCHS_DONE not in last:
        return "error", "the trial reported no epoch"
    return ("stopped" if last.get(EPOCHS_DONE, 0) < epochs else "finished"), ""


def trial_row(result: tune.Result, grace_epochs: int, epochs: int, storage: str) -> dict:
    """One trial: searched values, status, epochs run, the objective after the grace epochs, last metrics, and the
    checkpoint's full location (s3://... when `storage` is a URI: Ray reports paths without their scheme)."""
    last = result.metrics or {}
    status, reason = trial_status(result, epochs)
    row = {
        "trial_id": last.get("trial_id", Path(result.path).name),
        **{name: result.config[name] for name in SEARCHED},
        "status": status,
        "error": reason,
        "epochs_run": last.get(EPOCHS_DONE),
        "grace_epochs": grace_epochs,
    }
    checkpoint = uri_on(storage, last[CHECKPOINT_PATH_KEY]) if CHECKPOINT_PATH_KEY in last else None
    at_grace = pd.Series(dtype=float)
    try:
        history = read_trial_history(checkpoint) if checkpoint is not None else None
    except UserError:  # pruned: after a SIGKILL, Tune's last saved result can lag its Train run by a checkpoint
        row["status"], row["error"], checkpoint, history = "error", f"checkpoint {checkpoint} is gone", None, None
    if history is not None:
        at_grace = history.loc[history["epoch"] == grace_epochs - 1, OBJECTIVE]
    row[GRACE_OBJECTIVE] = float(at_grace.iloc[-1]) if len(at_grace) else float("nan")
    row.update({k: v for k, v in last.items() if k.startswith(("val_", "train_"))})
    row[CHECKPOINT_PATH_KEY] = checkpoint
    return row


def trial_table(results: tune.ResultGrid, grace_epochs: int, epochs: int, storage: str) -> pd.DataFrame:
    """One row per trial (see `trial_row`): trials with a usable model first, best first."""
    table = pd.DataFrame([trial_row(result, grace_epochs, epochs, storage) for result in results])
    table = table.reindex(columns=[*table.columns, *{OBJECTIVE} - set(table.columns)])  # no trial reported one
    table["epochs_run"] = table["epochs_run"].astype("Int64")  # whole numbers, also beside a trial that ran none
    without_model = ~table["status"].isin(MODEL_STATUSES)
    return (
        table.assign(_order=without_model)
        .sort_values(["_order", OBJECTIVE])
        .drop(columns="_order")
        .reset_index(drop=True)
    )


def write_sweep_outputs(results: tune.ResultGrid, sweep: SweepConfig, storage: str, out: Path) -> dict:
    """trials.csv / trials.parquet, best.json, best_metrics.csv and the best checkpoint (model.ckpt) in `out`;
    returns the best record. Raises RunFailed, after writing the trial table, when no trial left a model."""
    table = trial_table(results, sweep.grace_epochs, sweep.base.epochs, storage)
    table.to_csv(out / "trials.csv", index=False)
    table.to_parquet(out / "trials.parquet", index=False)
    usable = table[table["status"].isin(MODEL_STATUSES)]
    if usable.empty:
        counts = ", ".join(f"{n} {status}" for status, n in table["status"].value_counts().items())
        raise RunFailed(
            f"no trial left a model ({counts}); first reason: {table['error'].iloc[0]}; see {out / 'trials.csv'}"
        )
    best_row = usable.iloc[0]
    read_trial_history(best_row[CHECKPOINT_PATH_KEY]).to_csv(out / "best_metrics.csv", index=False)
    config = sweep.base.with_changes(**{name: type(getattr(sweep.base, name))(best_row[name]) for name in SEARCHED})
    best = {
        "sweep": results.experiment_path.rstrip("/").rsplit("/", 1)[-1],
        "trial_id": best_row["trial_id"],
        "config": config.to_dict(),
        "metrics": {k: float(v) for k, v in best_row.items() if k.startswith(("val_", "train_"))},
        "checkpoint": join(best_row[CHECKPOINT_PATH_KEY], TRAIN_CHECKPOINT),
        "trials": len(table),
        "trials_by_status": {status: int(n) for status, n in table["status"].value_counts().items()},
    }
    (out / "best.json").write_text(json.dumps(best, indent=2) + "\n")
    # A local copy beside the tables: storage may be s3://, and the output folder should stand alone.
    (out / CHECKPOINT_NAME).write_bytes(read_bytes(best["checkpoint"]))
    return best


def write_final_fit(best: dict, config: Config, final: dict[str, float], out: Path) -> dict:
    """best.json with the final fit of the best trial's settings (`config`, its last epoch's metrics `final`) added:
    model.ckpt and metrics.csv are then that run's (ray_train.train_on_ray wrote them)."""
    best = {
        **best,
        "final_fit": {
            "run": final_fit_name(best["sweep"]),
            "epochs": config.epochs,
            "metrics": {k: float(v) for k, v in final.items() if k.startswith(("val_", "train_"))},
        },
    }
    (out / "best.json").write_text(json.dumps(best, indent=2) + "\n")
    return best

"""The Ray Tune search: every trial is a Ray Train run of the same trainer, with codebook size and
commitment weight changed. Objective: `val_nmse` (per-dataset-normalised validation error), never the
total loss, whose commitment term changes with the weight being searched."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
from ray import tune
from ray.train.lightning import RayTrainReportCallback
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler

from medvq.config import Config, SweepConfig
from medvq.nodes import capacity
from medvq.storage import join, read_bytes, uri_on
from medvq.train import CHECKPOINT_NAME, train_distributed

OBJECTIVE, MODE = "val_nmse", "min"
SEARCHED = ("codebook_size", "commitment_weight")
GRACE_OBJECTIVE = f"{OBJECTIVE}_at_grace"  # the objective after the grace epochs, which every trial ran
TRIAL_DRIVER_MEMORY = 256 * 1024**2  # bytes


def search_space(sweep: SweepConfig) -> dict:
    commitment = (tune.grid_search(list(sweep.commitment_grid)) if sweep.commitment_grid
                  else tune.loguniform(*sweep.commitment_range))
    return {"codebook_size": tune.grid_search(list(sweep.codebook_sizes)), "commitment_weight": commitment}


def run_trial(params: dict, base: dict, storage: str) -> None:
    """One Tune trial = one Ray Train run, reporting to Tune every epoch.

    Its Train run is named after the trial, so a resumed sweep resumes an unfinished trial's run
    from its last checkpoint.
    """
    config = Config.from_dict(base).with_changes(**{name: params[name] for name in SEARCHED})
    context = tune.get_context()
    train_distributed(config, storage=storage, name=f"{context.get_experiment_name()}-{context.get_trial_id()}",
                      callbacks=[TuneReportCallback()])


def _tuner(sweep: SweepConfig, storage: str) -> tune.Tuner:
    """A new Tuner, or the stored one when this sweep already ran here: finished trials are not run again."""
    trainable = tune.with_parameters(run_trial, base=sweep.base.to_dict(), storage=storage)
    # The trial function only drives its Train run: the Train workers hold the CPUs and GPUs, so the
    # driver asks for a little memory only (Tune needs some request) and never blocks a worker's CPU.
    trainable = tune.with_resources(trainable, {"CPU": 0, "memory": TRIAL_DRIVER_MEMORY})
    path = f"{storage.rstrip('/')}/{sweep.run_name()}"
    if tune.Tuner.can_restore(path):
        return tune.Tuner.restore(path, trainable, resume_unfinished=True, resume_errored=True)
    limit = sweep.max_concurrent_trials or capacity().runs_at_once(sweep.base)
    scheduler = ASHAScheduler(max_t=sweep.base.epochs, grace_period=sweep.grace_epochs)
    return tune.Tuner(
        trainable,
        param_space=search_space(sweep),
        tune_config=tune.TuneConfig(metric=OBJECTIVE, mode=MODE, scheduler=scheduler,
                                    num_samples=sweep.num_samples, max_concurrent_trials=limit),
        run_config=tune.RunConfig(name=sweep.run_name(), storage_path=storage, verbose=1),
    )


def run_sweep(sweep: SweepConfig, storage: str) -> tune.ResultGrid:
    """Run (or resume) the search; raises if any trial failed for good."""
    results = _tuner(sweep, storage).fit()
    if results.errors:
        raise RuntimeError(f"{len(results.errors)} of {len(results)} trials failed; first error: {results.errors[0]}")
    return results


def trial_table(results: tune.ResultGrid, grace_epochs: int, storage: str) -> pd.DataFrame:
    """One row per trial, best first: searched values, epochs run, the objective at the grace epoch (which
    every trial reached, so trials stopped early compare fairly there), final metrics and the checkpoint's
    full location (s3://... when `storage` is a URI: Ray reports paths without their scheme)."""
    rows = []
    for result in results:
        row = {"trial_id": result.metrics.get("trial_id"), **{name: result.config[name] for name in SEARCHED}}
        row["epochs_run"] = result.metrics.get("training_iteration")
        history = result.metrics_dataframe
        at_grace = history.loc[history["training_iteration"] == grace_epochs, OBJECTIVE]
        row["grace_epochs"] = grace_epochs
        row[GRACE_OBJECTIVE] = float(at_grace.iloc[-1]) if len(at_grace) else math.nan
        row.update({k: v for k, v in result.metrics.items() if k.startswith(("val_", "train_"))})
        row["checkpoint_path"] = uri_on(storage, result.metrics["checkpoint_path"])
        rows.append(row)
    return pd.DataFrame(rows).sort_values(OBJECTIVE).reset_index(drop=True)


def write_sweep_outputs(results: tune.ResultGrid, sweep: SweepConfig, storage: str, out: Path) -> dict:
    """trials.csv / trials.parquet, best.json, best_metrics.csv and the best checkpoint (model.ckpt) in `out`;
    returns the best record."""
    table = trial_table(results, sweep.grace_epochs, storage)
    table.to_csv(out / "trials.csv", index=False)
    table.to_parquet(out / "trials.parquet", index=False)
    best_result = results.get_best_result(metric=OBJECTIVE, mode=MODE, scope="last")
    best_result.metrics_dataframe.to_csv(out / "best_metrics.csv", index=False)
    best_row = table.iloc[0]
    config = sweep.base.with_changes(codebook_size=int(best_row["codebook_size"]),
                                     commitment_weight=float(best_row["commitment_weight"]))
    best = {
        "sweep": sweep.run_name(),
        "trial_id": best_row["trial_id"],
        "config": config.to_dict(),
        "metrics": {k: float(v) for k, v in best_row.items() if k.startswith(("val_", "train_"))},
        "checkpoint": join(best_row["checkpoint_path"], RayTrainReportCallback.CHECKPOINT_NAME),
        "trials": len(table),
    }
    (out / "best.json").write_text(json.dumps(best, indent=2) + "\n")
    # A local copy beside the tables: storage may be s3://, and the output folder should stand alone.
    (out / CHECKPOINT_NAME).write_bytes(read_bytes(best["checkpoint"]))
    return best

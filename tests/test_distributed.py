"""Ray Train and Ray Tune on a real local Ray instance (CPU workers, gloo), on synthetic files."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import ray
import torch
from ray import tune
from ray.train._internal.session import get_session
from ray.util.state import list_actors

from medvq.checkpoints import TRAINED_PRECISION, read_checkpoint
from medvq.config import Config, SweepConfig
from medvq.devices import resolve_precision
from medvq.errors import RunFailed
from medvq.module import VQVAEModule
from medvq.ray_train import CHECKPOINTS_KEPT, run_on_ray, train_on_ray
from medvq.run_files import EPOCHS_DONE, TRAIN_CHECKPOINT
from medvq.tune import TRIAL_DRIVER_MEMORY, read_trial_history, run_sweep, run_trial, trial_row, write_sweep_outputs

pytestmark = pytest.mark.integration


def test_two_worker_run_keeps_one_codebook_on_both_workers(ray_instance, tiny_config, tmp_path):
    config = tiny_config(workers=2, epochs=2)
    result = run_on_ray(config, storage=str(tmp_path / "storage"), name="two-workers")
    assert result.metrics["epoch"] == 1 and result.checkpoint is not None
    # The ranks' three codebook buffers, compared by the run itself every epoch (max - min over ranks): equal.
    assert result.metrics["val_codebook_rank_spread"] == 0
    with result.checkpoint.as_directory() as folder:
        saved = read_checkpoint(f"{folder}/{TRAIN_CHECKPOINT}")
    codebook = saved["state_dict"]
    assert saved[TRAINED_PRECISION] == resolve_precision("auto", "cpu")  # as the worker resolved the config's "auto"
    # The EMA really moved: the codebook is not still its random initialisation.
    assert not torch.allclose(codebook["model.quantizer.codebook.cluster_size"], torch.ones(config.codebook_size))
    # One node, no autoscaler: nothing for a preemption watcher to see, and none was started.
    actors = {actor.class_name for actor in list_actors(limit=10_000, raise_on_missing_output=False)}
    assert "RayTrainWorker" in actors and "PreemptionWatcher" not in actors


def test_only_the_workers_import_torch_not_a_runs_driver_or_its_controller(ray_instance, tiny_config, tmp_path):
    """Torch takes a second of a core to import, on the start path of every run (a trial's driver, Ray Train's
    controller): only the workers, which train, import it."""
    seen = tmp_path / "controller_imports"

    class ControllerImports(ray.train.UserCallback):  # Ray Train runs its callbacks in the controller
        def after_report(self, run_context, metrics, checkpoint) -> None:
            seen.write_text(" ".join(sorted({"torch", "lightning"} & set(sys.modules))) or "neither")

    @ray.remote(num_cpus=0)
    class Driver:  # a process of its own, as a Tune trial's driver is
        def run(self, config: Config, storage: str) -> list[str]:
            result = run_on_ray(config, storage=storage, name="imports", callbacks=[ControllerImports()])
            assert result.checkpoint is not None
            return sorted({"torch", "lightning"} & set(sys.modules))

    assert ray.get(Driver.remote().run.remote(tiny_config(), str(tmp_path / "storage"))) == []
    assert seen.read_text() == "neither"


def test_a_sweep_keeps_going_past_diverged_trials_and_repeats_differ_by_seed(ray_instance, tiny_config, tmp_path):
    # A commitment weight of 1e300 is inf in float32: those trials' loss is inf from their first step.
    # grace_period = epochs: ASHA has no rung to stop a usable trial at, whichever reaches it first.
    sweep = SweepConfig(
        tiny_config(epochs=2), codebook_sizes=(16,), commitment_grid=(0.25, 1e300), num_samples=2, grace_period=2
    )
    storage = str(tmp_path / "storage")
    results = run_sweep(sweep, storage, "keeps-going")
    best = write_sweep_outputs(results, sweep, storage, tmp_path)
    table = pd.read_csv(tmp_path / "trials.csv")
    assert (
        len(table) == 4
        and pd.read_parquet(tmp_path / "trials.parquet")["trial_id"].tolist() == table["trial_id"].tolist()
    )
    diverged = table[table["commitment_weight"] == 1e300]
    assert (diverged["status"] == "diverged").all() and diverged["error"].str.contains(
        "train_loss became (?:nan|inf) in epoch 0"
    ).all()
    assert (diverged["epochs_run"] == 1).all() and diverged["checkpoint_path"].isna().all()
    kept = table[table["commitment_weight"] == 0.25]
    assert kept["status"].tolist() == ["finished", "finished"] and sorted(kept["seed"]) == [0, 1]
    assert kept["val_nmse"].nunique() == 2, "two seeds trained the same model"
    # The best is the lowest final objective Tune itself saw, and model.ckpt is that trial's checkpoint.
    assert best["metrics"]["val_nmse"] == pytest.approx(
        min(r.metrics["val_nmse"] for r in results if r.config["commitment_weight"] == 0.25)
    )
    assert best["trials_by_status"] == {"finished": 2, "diverged": 2}
    restored = read_checkpoint(tmp_path / "model.ckpt")
    assert restored["hyper_parameters"]["config"]["seed"] == best["config"]["seed"]
    history = pd.read_csv(tmp_path / "best_metrics.csv")
    assert history["epoch"].tolist() == [0, 1] and history["val_nmse"].iloc[-1] == pytest.approx(
        best["metrics"]["val_nmse"]
    )
    # Every usable trial ran the grace epochs; its objective there is its own history's row of that epoch.
    assert history["val_nmse"][1] == pytest.approx(kept.set_index("trial_id")["val_nmse_at_grace"][best["trial_id"]])
    assert VQVAEModule.load_from_checkpoint(best["checkpoint"]).config.commitment_weight == 0.25


def test_a_sweep_whose_every_trial_diverged_fails_in_one_line_after_writing_its_table(
    ray_instance, tiny_config, tmp_path
):
    sweep = SweepConfig(tiny_config(), codebook_sizes=(16,), commitment_grid=(1e300,), num_samples=1, grace_period=1)
    results = run_sweep(sweep, str(tmp_path / "storage"), "all-diverged")
    with pytest.raises(
        RunFailed, match=r"no trial left a model \(1 diverged\); first reason: train_loss became (nan|inf) in epoch 0"
    ):
        write_sweep_outputs(results, sweep, str(tmp_path / "storage"), tmp_path)
    assert pd.read_csv(tmp_path / "trials.csv")["status"].tolist() == ["diverged"]
    assert not (tmp_path / "model.ckpt").exists() and not (tmp_path / "best.json").exists()


def test_a_ray_train_run_that_diverges_fails_in_one_line_and_leaves_no_model(ray_instance, tiny_config, tmp_path):
    config = tiny_config(workers=2, epochs=2, commitment_weight=1e300)
    with pytest.raises(RunFailed, match=r"train_loss became (nan|inf) in epoch 0; no checkpoint was written"):
        train_on_ray(config, tmp_path, str(tmp_path / "storage"), "diverges")
    assert not (tmp_path / "model.ckpt").exists()


def test_a_trial_tune_stops_keeps_the_checkpoint_tune_recorded_while_its_train_run_goes_on(
    ray_instance, tiny_config, tmp_path
):
    def trial_slow_to_stop(params: dict, base: Config, storage: str) -> None:
        """`run_trial`, in a trial process that takes seconds to stop (as on a busy node): Tune has taken its last
        report, and the trial's Train run goes on meanwhile."""
        session = get_session()
        finish = session.finish
        session.finish = lambda *args, **kwargs: time.sleep(4) or finish(*args, **kwargs)
        run_trial(params, base, storage)

    storage = str(tmp_path / "storage")
    trainable = tune.with_parameters(trial_slow_to_stop, base=tiny_config(epochs=30), storage=storage)
    (result,) = tune.Tuner(
        tune.with_resources(trainable, {"CPU": 0, "memory": TRIAL_DRIVER_MEMORY}),
        param_space={"codebook_size": 16, "commitment_weight": 0.25, "seed": 0},
        run_config=tune.RunConfig(name="stopped", storage_path=storage, stop={EPOCHS_DONE: 1}, verbose=0),
    ).fit()
    time.sleep(2)  # the Train run's end, after the trial's
    row = trial_row(result, grace_epochs=1, epochs=30, storage=storage)
    assert (row["status"], row["epochs_run"]) == ("stopped", 1), row["error"]
    assert read_trial_history(row["checkpoint_path"])["epoch"].tolist() == [0]
    written = sorted(Path(row["checkpoint_path"]).parent.glob("checkpoint_*"))  # named by the time they were written
    after = written[written.index(Path(row["checkpoint_path"])) + 1 :]
    # Two more epochs would have pruned it with one checkpoint fewer kept.
    assert len(after) >= CHECKPOINTS_KEPT - 1, "the run stopped with its trial: nothing was tested"

"""Ray Train and Ray Tune on a real local Ray instance (CPU workers, gloo), on synthetic files."""

from __future__ import annotations

import pandas as pd
import pytest
import ray
import torch

from medvq.config import SweepConfig
from medvq.module import VQVAEModule
from medvq.train import fit_worker, train_distributed
from medvq.tune import run_sweep, write_sweep_outputs

pytestmark = pytest.mark.integration


def save_codebook_per_rank(folder: str):
    def per_worker(config_dict: dict) -> None:
        module = fit_worker(config_dict)
        rank = ray.train.get_context().get_world_rank()
        torch.save(module.model.quantizer.codebook.state_dict(), f"{folder}/codebook-rank{rank}.pt")

    return per_worker


def test_two_worker_run_keeps_one_codebook_on_both_workers(ray_instance, tiny_config, tmp_path):
    config = tiny_config(workers=2, epochs=2)
    result = train_distributed(config, storage=str(tmp_path / "storage"), name="two-workers",
                               per_worker=save_codebook_per_rank(str(tmp_path)))
    assert result.metrics["epoch"] == 1 and result.checkpoint is not None
    rank0, rank1 = (torch.load(tmp_path / f"codebook-rank{rank}.pt") for rank in (0, 1))
    assert set(rank0) == {"embedding", "cluster_size", "embed_sum"}
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name
    # The EMA really moved: the codebook is not still its random initialisation on both ranks.
    assert not torch.allclose(rank0["cluster_size"], torch.ones_like(rank0["cluster_size"]))


def test_two_trial_sweep_writes_the_trial_table_and_the_best_trial(ray_instance, tiny_config, tmp_path):
    sweep = SweepConfig(tiny_config(epochs=2), codebook_sizes=(16, 32), commitment_grid=(0.25,), num_samples=1,
                        grace_period=1)
    results = run_sweep(sweep, str(tmp_path / "storage"))
    best = write_sweep_outputs(results, sweep, str(tmp_path / "storage"), tmp_path)
    table = pd.read_csv(tmp_path / "trials.csv")
    assert sorted(table["codebook_size"]) == [16, 32]
    assert table["val_nmse"].notna().all() and table["val_nmse"].is_monotonic_increasing
    assert pd.read_parquet(tmp_path / "trials.parquet")["trial_id"].tolist() == table["trial_id"].tolist()
    assert best["metrics"]["val_nmse"] == pytest.approx(table["val_nmse"].min())
    assert best["config"]["codebook_size"] == table["codebook_size"][0]
    history = pd.read_csv(tmp_path / "best_metrics.csv")
    assert len(history) == table["epochs_run"][0] and {"train_loss", "val_psnr"} <= set(history.columns)
    # Every trial ran the grace epoch; the best trial's objective there is its history's first row.
    assert (table["grace_epochs"] == 1).all() and table["val_nmse_at_grace"].notna().all()
    assert table["val_nmse_at_grace"][0] == pytest.approx(history["val_nmse"][0])
    for checkpoint in (best["checkpoint"], tmp_path / "model.ckpt"):  # in storage, and the copy beside the tables
        restored = VQVAEModule.load_from_checkpoint(checkpoint)
        assert restored.config.codebook_size == best["config"]["codebook_size"]

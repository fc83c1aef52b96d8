"""The typed config: what a resumed run must repeat (what shapes its results), and the seeds of a grid's repeats."""

from __future__ import annotations

import json

import pytest

from medvq.config import Config, SweepConfig, results_shaping


def sweep(**changes) -> SweepConfig:
    return SweepConfig(Config(datasets=("breastmnist",)), codebook_sizes=(64, 128), commitment_grid=(0.25,), **changes)


def shaping(config: Config | SweepConfig) -> str:
    return json.dumps(results_shaping(config), sort_keys=True)


@pytest.mark.parametrize("changes", [dict(max_concurrent_trials=4)])
def test_what_shapes_a_sweep_ignores_how_it_runs(changes):
    assert shaping(sweep(**changes)) == shaping(sweep())


@pytest.mark.parametrize(
    "base_changes",
    [
        dict(gpus_per_worker=1.0),
        dict(cpus_per_worker=4.0),
        dict(data_root="s3://bucket/medmnist"),
        dict(compile_model=True),
    ],
)
def test_what_shapes_a_run_ignores_where_its_data_lives_and_which_hardware_is_up(base_changes):
    plain = sweep()
    moved = SweepConfig(plain.base.with_changes(**base_changes), codebook_sizes=(64, 128), commitment_grid=(0.25,))
    assert shaping(moved) == shaping(plain) and moved.base.run_name() == plain.base.run_name()


@pytest.mark.parametrize(
    "base_changes",
    [
        dict(epochs=11),
        dict(seed=1),
        dict(codebook_size=256),
        dict(workers=2),
        dict(datasets=("bloodmnist",)),
        dict(size=64),
        dict(batch_size=32),
    ],
)
def test_a_runs_name_changes_with_what_shapes_its_results(base_changes):
    plain = Config(datasets=("breastmnist",))
    assert plain.with_changes(**base_changes).run_name() != plain.run_name()


def test_what_shapes_a_sweep_changes_with_its_search_space():
    assert (
        len(
            {
                shaping(sweep()),
                shaping(sweep(num_samples=2)),
                shaping(SweepConfig(sweep().base, codebook_sizes=(64,), commitment_grid=(0.25,))),
            }
        )
        == 3
    )


def test_repeats_of_a_grid_get_their_own_seeds_and_sampled_weights_share_one():
    grid = SweepConfig(Config(seed=5), commitment_grid=(0.1, 1.0), num_samples=3)
    assert grid.seeds == (5, 6, 7) and grid.trial_count == 3 * 5 * 2
    assert SweepConfig(Config(seed=5), num_samples=3).seeds == (5,)


def test_a_config_saved_before_a_setting_existed_reads_as_what_it_trained_with():
    """Checkpoints from before the SSIM term have no ssim_weight: they trained on the squared error alone."""
    saved = Config().to_dict()
    del saved["ssim_weight"]
    assert Config.from_dict(saved).ssim_weight == 0.0
    assert Config.from_dict(Config().to_dict()) == Config()  # today's saved config reads as it was
    assert Config().ssim_weight > 0
    del saved["error_loss"]
    assert Config.from_dict(saved).error_loss == "mse"

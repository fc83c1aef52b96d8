"""The order trials start in, and how a trial's outcome is named in the trial table, without running one."""

from __future__ import annotations

from collections import Counter
from types import SimpleNamespace

import pytest
from ray.tune.search.variant_generator import generate_variants

from medvq.config import Config, SweepConfig
from medvq.tune import SEARCHED, error_line, search_space, trial_order, trial_status


@pytest.mark.parametrize("sizes, weights", [((64, 128, 256, 512, 1024), (0.1, 0.5, 2.0)), ((64, 512), (0.1, 1.0))])
def test_grid_trials_start_interleaved_so_every_value_is_among_the_first(sizes, weights):
    sweep = SweepConfig(Config(seed=5), codebook_sizes=sizes, commitment_grid=weights, num_samples=2)
    order = trial_order(sweep)
    cells = [(t["codebook_size"], t["commitment_weight"], t["seed"]) for t in order]
    assert sorted(cells) == sorted((k, w, s) for k in sizes for w in weights for s in (5, 6))  # each trial once
    assert [t["seed"] for t in order] == [5] * (len(cells) // 2) + [6] * (len(cells) // 2)  # one repeat, then the next
    for start in range(1, len(order) + 1):  # any first trials hold each value as often as any other, give or take one
        for name in ("codebook_size", "commitment_weight"):
            counts = Counter(t[name] for t in order[:start])
            values = sizes if name == "codebook_size" else weights
            assert max(counts.values()) - min(counts.get(v, 0) for v in values) <= 1, (name, order[:start])


@pytest.mark.parametrize("grid", [(0.1, 1.0), ()], ids=["grid", "sampled"])
def test_tune_expands_the_search_space_into_exactly_those_trials_in_that_order(grid):
    sweep = SweepConfig(Config(), codebook_sizes=(64, 128, 256), commitment_grid=grid, num_samples=2)
    expanded = [{name: config[name] for name in SEARCHED} for _, config in generate_variants(search_space(sweep))]
    assert expanded == trial_order(sweep) and len(expanded) == sweep.trial_count


def test_sampled_weights_are_drawn_once_per_trial_in_range_and_the_same_on_every_run():
    sweep = SweepConfig(Config(seed=3), codebook_sizes=(64, 256), commitment_range=(0.05, 2.0), num_samples=3)
    order = trial_order(sweep)
    assert [t["codebook_size"] for t in order] == [64, 256] * 3 and {t["seed"] for t in order} == {3}
    weights = [t["commitment_weight"] for t in order]
    assert len(set(weights)) == 6 and all(0.05 <= w <= 2.0 for w in weights)
    assert trial_order(sweep) == order and trial_order(SweepConfig(Config(seed=4), codebook_sizes=(64, 256))) != order


def test_a_trials_error_is_its_last_line_without_terminal_colours():
    error = RuntimeError(
        "\x1b[36mray::ImplicitFunc.train()\x1b[39m (pid=1, ip=10.0.0.1)\n  File ...\nValueError: boom\n"
    )
    assert error_line(error) == "ValueError: boom"
    assert error_line(RuntimeError("")) == "RuntimeError"


def test_each_outcome_has_its_status_even_without_metrics():
    outcome = lambda error=None, metrics=None: trial_status(SimpleNamespace(error=error, metrics=metrics), epochs=6)
    assert outcome(error=RuntimeError("lost")) == ("error", "lost")
    assert outcome(metrics={"diverged": "train_loss became nan in epoch 2", "epochs_done": 3}) == (
        "diverged",
        "train_loss became nan in epoch 2",
    )
    assert outcome(metrics={"epochs_done": 2}) == ("stopped", "")
    assert outcome(metrics={"epochs_done": 6}) == ("finished", "")
    assert outcome() == ("error", "the trial reported no epoch")  # no model, though nothing failed

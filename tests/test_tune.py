"""The order trials start in, and how a trial's outcome is named in the trial table, without running one."""

from __future__ import annotations

from collections import Counter
from types import SimpleNamespace

import pytest
from ray.tune.search.variant_generator import generate_variants

from medvq.config import Config, SweepConfig
from medvq.tune import SEARCHED, error_line, progress_line, search_space, trial_order, trial_status


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


def test_the_search_says_as_each_trial_ends_how_many_are_done_the_best_so_far_and_the_time_left():
    trial = lambda n, status, size, **last: SimpleNamespace(
        trial_id=f"5e42f_0000{n}",
        status=status,
        config={"codebook_size": size, "commitment_weight": 0.3125, "seed": 0},
        last_result=last,
    )
    ended = [
        trial(0, "TERMINATED", 64, epochs_done=6, val_nmse=0.0874),
        trial(1, "ERROR", 128, epochs_done=6, val_nmse=0.01),  # failed later: no model, whatever it reported
        trial(2, "TERMINATED", 128, epochs_done=1, val_nmse=float("inf"), diverged="train_loss became inf"),
        trial(3, "RUNNING", 256, epochs_done=2, val_nmse=0.0931),  # the one that just ended
    ]
    # 11 trials left, 4 at once, 3 minutes each: about 8 minutes
    assert progress_line(ended, ("stopped", ""), 15, 4, [120.0, 240.0]) == (
        "search: 4 of 15 trials done; 5e42f_00003 stopped by ASHA at epoch 2 (val_nmse 0.0931); best so far val_nmse "
        "0.0874 (codebook 64, commitment 0.312, seed 0); about 8 min left"
    )
    assert progress_line(ended[1:3], ("diverged", "train_loss became inf"), 2, 1, []) == (
        "search: 2 of 2 trials done; 5e42f_00002 diverged: train_loss became inf"
    )

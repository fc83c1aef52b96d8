"""How a trial's outcome is named in the trial table, without running one."""

from __future__ import annotations

from types import SimpleNamespace

from medvq.tune import error_line, trial_status


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

"""Lightning takes seconds of a core to import (benchmarks/RESULTS.md), paid again by every process that imports it:
only the processes that train import it. Nor do Tune's trial drivers import medmnist (scikit-learn, 0.7 s)."""

import subprocess
import sys

import pytest


@pytest.mark.parametrize(
    "modules, unused",
    [
        # a Tune trial's driver (tune.run_trial) and Ray Train's controller, which unpickles ray_train.train_worker
        ("medvq.tune, medvq.ray_train", {"lightning", "torchmetrics", "medmnist"}),
        # the encoder's actors: they need only the model and the images
        ("medvq.encode, medvq.latent_space", {"lightning", "torchmetrics"}),
        # the jobs' driver (jobs/sweep.py, encode.py, plot.py, neighbours.py): the figures need only the model
        ("medvq.cli, medvq.plots, medvq.neighbours, medvq.report, medvq.tune", {"lightning", "torchmetrics"}),
    ],
)
def test_processes_that_do_not_train_do_not_import_lightning(modules, unused):
    assert imported_of(unused, modules) == "[]"


def imported_of(packages: set[str], modules: str) -> str:
    """Which of `packages` a fresh interpreter holds after importing `modules` (a comma-separated list), sorted."""
    check = f"import sys, {modules}; print(sorted(set({sorted(packages)!r}) & set(sys.modules)))"
    return subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, check=True).stdout.strip()

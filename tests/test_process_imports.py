"""Lightning takes seconds of a core to import (benchmarks/RESULTS.md), paid again by every process that imports it:
only the processes that train import it. No process imports medmnist's package (scikit-learn, 0.7 s): medvq reads
its table of datasets alone, and imports the package only to download."""

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
UNTRAINED = {"lightning", "torchmetrics", "medmnist", "sklearn"}


@pytest.mark.parametrize(
    "modules, unused",
    [
        # a Tune trial's driver (tune.run_trial) and Ray Train's controller, which unpickles ray_train.train_worker
        ("medvq.tune, medvq.ray_train", UNTRAINED),
        # the encoder's actors: they need only the model and the images
        ("medvq.encode, medvq.latent_space", UNTRAINED),
        # the jobs' driver: the figures need only the model
        ("jobs.sweep, jobs.encode, jobs.plot, jobs.neighbours", UNTRAINED),
        # a Ray Train worker (ray_train.train_worker)
        ("medvq.train", {"medmnist", "sklearn"}),
    ],
)
def test_each_process_imports_only_what_it_uses(modules, unused):
    assert imported_of(unused, modules) == "[]"


def imported_of(packages: set[str], modules: str) -> str:
    """Which of `packages` a fresh interpreter holds after importing `modules` (a comma-separated list), sorted."""
    check = f"import sys, {modules}; print(sorted(set({sorted(packages)!r}) & set(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", check], cwd=REPO, capture_output=True, text=True, check=True)
    return done.stdout.strip()

"""Lightning takes seconds of a core to import (benchmarks/RESULTS.md), paid again by every process that imports it:
only the processes that train import it. No process imports medmnist's package (scikit-learn, 0.7 s): medvq reads
its table of datasets alone, and imports the package only to download. And the garbage collector's full passes, a
quarter of a Train worker's imports, are spaced out in every process of a job."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from medvq.collector import FULL_PASS_EVERY

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


def test_the_driver_and_every_ray_worker_of_a_job_make_few_full_collections():
    """The job's driver (run_job) and each of its Ray workers (start_ray's setup hook) space the collector's full
    passes out and set aside what they imported: a new local Ray instance, as `python jobs/sweep.py` starts one."""
    check = (
        "import gc, ray; from medvq.cli import run_job, start_ray\n"
        "def main():\n"
        "    start_ray()\n"
        "    worker = ray.get(ray.remote(lambda: (gc.get_threshold()[2], gc.get_freeze_count() > 0)).remote())\n"
        "    print([(gc.get_threshold()[2], gc.get_freeze_count() > 0), worker])\n"
        "run_job(main)"
    )
    env = {name: value for name, value in os.environ.items() if name != "RAY_ADDRESS"}
    done = subprocess.run([sys.executable, "-c", check], cwd=REPO, capture_output=True, text=True, env=env, check=True)
    assert done.stdout.strip().splitlines()[-1] == f"[({FULL_PASS_EVERY}, True), ({FULL_PASS_EVERY}, True)]"

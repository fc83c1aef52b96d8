"""Lightning takes seconds of a core to import (benchmarks/RESULTS.md), paid again by every process that imports it:
only the processes that train import it. No process imports medmnist's package (scikit-learn, 0.7 s): medvq reads
its table of datasets alone, and imports the package only to download. Every process of a job spaces out the
garbage collector's full passes while it imports (medvq.collector). And a job stops the Ray it started as it ends."""

import ast
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import ray

from medvq.cli import ray_stopped_at_the_end
from medvq.collector import FULL_PASS_EVERY, PYTHONS_PACE
from tests.clusters import process_fields

REPO = Path(__file__).resolve().parents[1]
UNTRAINED = {"lightning", "torchmetrics", "medmnist", "sklearn"}


@pytest.mark.parametrize(
    "modules, unused",
    [
        # a Tune trial's driver (tune.run_trial) and Ray Train's controller, which unpickles ray_train's callbacks:
        # not even torch (tests/test_distributed.py runs them)
        ("medvq.tune, medvq.ray_train", UNTRAINED | {"torch"}),
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


@pytest.mark.integration  # starts Ray
def test_a_jobs_processes_space_out_full_collections_until_they_train(tiny_config, tmp_path):
    """The job's driver (run_job) and each of its Ray workers (start_ray's setup hook) space out the collector's full
    passes and set aside what they imported; a process that trains is back at Python's pace once it starts to.
    RAY_ADDRESS=local: a new instance, as `python jobs/sweep.py` starts on a machine running no other Ray."""
    config = tiny_config(epochs=1, limit_batches=1).to_dict()
    check = (
        "import gc, ray; from pathlib import Path\n"
        "from medvq.cli import run_job, start_ray; from medvq.config import Config\n"
        "pace = lambda: (gc.get_threshold()[2], gc.get_freeze_count() > 0)\n"
        "def trained(config, out):\n"
        "    from medvq.train import train_local\n"
        "    train_local(Config.from_dict(config), Path(out))\n"
        "    return pace()\n"
        "def main():\n"
        "    start_ray()\n"
        "    idle = ray.get(ray.remote(pace).remote())\n"
        f"    training = ray.get(ray.remote(trained).remote({config!r}, {str(tmp_path)!r}))\n"
        "    print([pace(), idle, training])\n"
        "run_job(main)"
    )
    env = {**os.environ, "RAY_ADDRESS": "local"}
    done = subprocess.run([sys.executable, "-c", check], cwd=REPO, capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    spaced, pythons = (FULL_PASS_EVERY, True), (PYTHONS_PACE[2], True)
    assert done.stdout.strip().splitlines()[-1] == str([spaced, spaced, pythons])


@pytest.mark.integration  # starts Ray
def test_a_job_stops_the_local_ray_it_started_before_pythons_exit_its_monitor_first():
    """run_job stops the local instance itself (medvq.cli.ray_stopped_at_the_end), not Ray's exit hook after it: when
    it returns, no process of the instance runs, and the autoscaler's monitor was stopped before the GCS."""
    check = (
        "import ray\n"
        "from ray._private.node import Node\n"
        "from medvq.cli import run_job, start_ray\n"
        "stopped, kill = [], Node._kill_process_type\n"
        "Node._kill_process_type = lambda node, kind, *a, **k: (stopped.append(kind), kill(node, kind, *a, **k))\n"
        "def main():\n"
        "    start_ray()\n"
        "    global pids\n"
        "    pids = {kind: [info.process.pid for info in infos] for kind, infos in\n"
        "            ray._private.worker._global_node.all_processes.items()}\n"
        "run_job(main)\n"
        "print([pids, ray.is_initialized(), stopped])"
    )
    env = {**os.environ, "RAY_ADDRESS": "local"}
    done = subprocess.run([sys.executable, "-c", check], cwd=REPO, capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    pids, initialised, stopped = ast.literal_eval(done.stdout.strip().splitlines()[-1])
    assert {"raylet", "gcs_server", "monitor"} <= set(pids) and not initialised
    assert [kind for kind, kind_pids in pids.items() if any(running(pid) for pid in kind_pids)] == []
    assert stopped.index("monitor") < stopped.index("gcs_server")


def running(pid: int) -> bool:
    """Whether `pid` is a process that has not exited (a zombie has)."""
    try:
        return process_fields(pid)[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("running_before", [True, False])
def test_a_job_stops_only_the_local_ray_it_started(monkeypatch, running_before):
    """A test's own local Ray, running in its process before a job's main runs there, is the test's to stop; one
    that the job started is the job's."""
    stopped = []
    local_instance = SimpleNamespace(
        all_processes={"raylet": [], "monitor": []}, kill_monitor=lambda check_alive: stopped.append("monitor")
    )
    monkeypatch.setattr(ray, "is_initialized", lambda: running_before)  # as the block starts
    monkeypatch.setattr(ray._private.worker, "_global_node", local_instance)
    monkeypatch.setattr(ray, "shutdown", lambda: stopped.append("ray"))
    with ray_stopped_at_the_end():
        pass
    assert stopped == ([] if running_before else ["monitor", "ray"])

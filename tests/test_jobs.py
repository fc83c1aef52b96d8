"""The jobs as users run them: a killed sweep driver resumes, and a Ray Train run of jobs/train.py that
resumes instead of starting over. (`ray job submit` against `ray start` clusters: tests/test_multinode.py.)"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from medvq.module import VQVAEModule
from tests.conftest import REPO, SYNTHETIC_DATASETS, smoke_command

pytestmark = pytest.mark.integration


def finished_trial_results(storage: Path) -> dict[str, int]:
    """Reports per trial whose Tune state says TERMINATED, read from the sweep's files on disk."""
    states = sorted(storage.glob("medvq-sweep-*/experiment_state-*.json"))
    if not states:
        return {}
    trials = json.loads(states[-1].read_text())["trial_data"]
    finished = [json.loads(state)["trial_id"] for state, _ in trials if '"TERMINATED"' in state]
    return {trial: len((next(storage.glob(f"medvq-sweep-*/run_trial_{trial}*")) / "result.json").read_text().splitlines())
            for trial in finished}


def test_killed_sweep_resumes_without_rerunning_the_finished_trial(synthetic_root, tmp_path):
    out = tmp_path / "out"
    command = [sys.executable, *smoke_command(synthetic_root, out, "--max-concurrent-trials", "1")[1:]]
    log = open(tmp_path / "first.log", "w")
    driver = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 300
    while not (finished := finished_trial_results(out / "ray_results")):
        assert driver.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "no trial finished within 5 minutes"
        time.sleep(1)
    os.killpg(driver.pid, signal.SIGKILL)  # the driver and the Ray instance it started, as if its node died
    driver.wait()
    assert not (out / "trials.csv").exists(), "the first run finished before it was killed: nothing was tested"

    rerun = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    for trial, reports in finished.items():
        assert finished_trial_results(out / "ray_results")[trial] == reports, f"trial {trial} ran again"
    assert len(pd.read_csv(out / "trials.csv")) == 2


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--datasets", "breastmnist,nosuchmnist"], "unknown dataset 'nosuchmnist'"),
        (["--codebook-sizes", ","], "the search space is empty"),
        (["--commitment-weights", "2:0.5"], "commitment range must satisfy"),
        (["--commitment-weights", "1:2:3"], "--commitment-weights takes LOW:HIGH (two numbers)"),
        (["--commitment-weights", ":2"], "--commitment-weights takes LOW:HIGH (two numbers)"),
        (["--codebook-size", "256"], "unrecognized arguments: --codebook-size 256"),  # not --codebook-sizes
        (["--smoke", "--codebook-sizes", "16", "--num-samples", "0"], "drop --codebook-sizes, --num-samples"),
        (["--gpus-per-trial", "4"], "but the cluster has"),
        (["--storage", "/proc/medvq-cannot-write-here"], "storage /proc/medvq-cannot-write-here is not writable"),
        (["--out", "file:///proc/medvq-cannot-write-here"], "medvq-cannot-write-here/ray_results is not writable"),
    ],
)
def test_sweep_rejects_bad_input_before_any_worker_starts(synthetic_root, tmp_path, flags, message):
    out = tmp_path / "out"
    command = [sys.executable, "jobs/sweep.py", "--data-root", str(synthetic_root), "--out", str(out),
               "--datasets", ",".join(SYNTHETIC_DATASETS), *flags]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not out.exists()


def test_train_job_on_ray_train_workers_resumes_instead_of_starting_over(synthetic_root, tmp_path):
    out = tmp_path / "out"
    command = [sys.executable, "jobs/train.py", "--data-root", str(synthetic_root), "--datasets", ",".join(SYNTHETIC_DATASETS),
               "--workers", "2", "--accelerator", "cpu", "--epochs", "2", "--limit-batches", "2", "--batch-size", "32",
               "--out", str(out)]
    checkpoints = []
    for _ in range(2):
        job = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
        assert job.returncode == 0, job.stderr[-3000:]
        checkpoints.append(sorted(p.name for p in out.glob("ray_results/medvq-train-*/checkpoint_*") if p.is_dir()))
        assert pd.read_csv(out / "metrics.csv")["epoch"].tolist() == [0, 1]  # as a local run writes it
    assert len(checkpoints[0]) == 2 and checkpoints[1] == checkpoints[0]  # the second run trained nothing new
    assert VQVAEModule.load_from_checkpoint(out / "model.ckpt").config.workers == 2

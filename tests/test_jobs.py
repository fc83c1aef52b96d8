"""The jobs as users run them: a killed sweep driver resumes, `ray job submit` against `ray start --head`,
and a Ray Train run of jobs/train.py that resumes instead of starting over."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pandas as pd
import pytest

from medvq.module import VQVAEModule
from tests.conftest import REPO, SYNTHETIC_DATASETS

pytestmark = pytest.mark.integration
RAY = str(Path(sys.executable).parent / "ray")


def smoke_command(data_root: Path, out: Path | str, *extra: str) -> list[str]:
    return ["python", "jobs/sweep.py", "--smoke", "--data-root", str(data_root),
            "--datasets", ",".join(SYNTHETIC_DATASETS), "--out", str(out), *extra]


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


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def started_cluster(env: dict[str, str]) -> Iterator[str]:
    """`ray start --head --block`, stopped by signalling it alone (`ray stop` would stop every Ray instance
    on the machine); yields the job API's address once it answers.

    Its own temp dir: `ray start` records its address there for later `ray.init()` calls, and only `ray stop`
    removes the record, so in the shared /tmp/ray every later job on this machine would wait for the dead
    cluster. (Short, in /tmp: Ray's socket paths inside it must stay under 108 characters.)
    """
    port, dashboard = free_port(), free_port()
    temp_dir = tempfile.mkdtemp(prefix="ray-")
    head = subprocess.Popen(
        [RAY, "start", "--head", "--block", f"--port={port}", f"--dashboard-port={dashboard}", "--num-cpus=4",
         "--include-dashboard=true", f"--temp-dir={temp_dir}"],
        # RAY_ADDRESS where the cluster starts: its workers then find it even if other instances run here.
        env={**env, "RAY_ADDRESS": f"127.0.0.1:{port}"}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    address = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.monotonic() + 120
        while not answers(address):
            assert head.poll() is None and time.monotonic() < deadline, "ray start --head did not come up"
            time.sleep(1)
        yield address
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        head.wait(timeout=60)
        shutil.rmtree(temp_dir, ignore_errors=True)


def answers(address: str) -> bool:
    try:
        urllib.request.urlopen(f"{address}/api/version", timeout=5)
    except urllib.error.HTTPError:
        return True  # up, and asking for the token
    except OSError:
        return False
    return True


def test_ray_job_submit_runs_the_smoke_sweep_on_a_started_cluster(synthetic_root, tmp_path):
    # Token auth, as Ray's local clusters default to; and this interpreter's `python` for the job's entrypoint.
    env = {**os.environ, "RAY_AUTH_MODE": "token", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    out = tmp_path / "out"
    with started_cluster(env) as address:
        submit = subprocess.run(  # --out as a URI: the outputs are uploaded there at the end
            [RAY, "job", "submit", "--address", address, "--working-dir", ".", "--",
             *smoke_command(synthetic_root, f"file://{out}")],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
        )
    assert submit.returncode == 0, submit.stdout[-3000:] + submit.stderr[-3000:]
    assert "succeeded" in submit.stdout
    best = json.loads((out / "best.json").read_text())
    assert Path(best["checkpoint"]).exists() and (out / "model.ckpt").exists()
    assert len(pd.read_parquet(out / "trials.parquet")) == 2
    assert (out / "summary.md").read_text().startswith("2 trials")
    latents = pd.read_parquet(out / "latents")
    assert sorted(latents["dataset"].unique()) == sorted(SYNTHETIC_DATASETS)
    assert [record["dataset"] for record in json.loads((out / "summary.json").read_text())] == list(SYNTHETIC_DATASETS)
    assert {"latent_space.png", "curves.png", "sweep.png", "reconstructions.png"} <= {p.name for p in (out / "plots").iterdir()}


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

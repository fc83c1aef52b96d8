"""The jobs as users run them: a sweep driver stopped by signals resumes, and a Ray Train run of jobs/train.py
survives a killed worker and resumes instead of starting over. (`ray job submit` against `ray start` clusters:
tests/test_multinode.py.)"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from contextlib import suppress
from pathlib import Path

import pandas as pd
import pytest

from medvq.module import VQVAEModule
from medvq.provenance import PROVENANCE_FILE
from medvq.tune import read_trial_history
from tests.clusters import process_fields, wait_for
from tests.conftest import REPO, SYNTHETIC_DATASETS, slow_sweep_flags

pytestmark = pytest.mark.integration


def finished_trial_results(storage: Path) -> dict[str, int]:
    """Reports per trial whose Tune state says TERMINATED, read from the sweep's files on disk. Tune rewrites its state
    file in place: read in the middle of that (empty, or cut short), it says no trial has finished yet."""
    states = sorted(storage.glob("medvq-sweep-*/experiment_state-*.json"))
    if not states:
        return {}
    try:
        trials = json.loads(states[-1].read_text())["trial_data"]
    except json.JSONDecodeError:
        return {}
    finished = [json.loads(state)["trial_id"] for state, _ in trials if '"TERMINATED"' in state]
    return {
        trial: len((next(storage.glob(f"medvq-sweep-*/run_trial_{trial}*")) / "result.json").read_text().splitlines())
        for trial in finished
    }


def epochs_saved(storage: Path, trial: int) -> int:
    """Epochs in the newest checkpoint of the `trial`-th trial's Train run (0 before its first)."""
    histories = storage.glob(f"medvq-sweep-*-*_{trial:05d}/checkpoint_*/metrics.csv")
    return max((len(pd.read_csv(path)) for path in histories), default=0)


def stop_when(driver: subprocess.Popen, condition, what: str, signum: int, group: bool) -> int:
    """Send `signum` to the driver (or its whole process group, as Ctrl-C in a terminal does) once `condition()`
    holds; returns the driver's exit code."""
    deadline = time.monotonic() + 300
    while not condition():
        assert driver.poll() is None, f"the driver ended before {what}"
        assert time.monotonic() < deadline, f"not {what} within 5 minutes"
        time.sleep(0.2)
    (os.killpg if group else os.kill)(driver.pid, signum)
    return driver.wait(timeout=300)


def test_a_sweep_stopped_by_ctrl_c_sigterm_or_sigkill_resumes_with_each_epoch_once(synthetic_root, tmp_path):
    out, storage = tmp_path / "out", tmp_path / "out" / "ray_results"
    command = [
        sys.executable,
        "jobs/sweep.py",
        "--data-root",
        str(synthetic_root),
        "--datasets",
        ",".join(SYNTHETIC_DATASETS),
        "--out",
        str(out),
        *slow_sweep_flags(epochs=6, codebook_sizes="16,32"),
        "--max-concurrent-trials",
        "1",
    ]
    start = lambda name: subprocess.Popen(
        command, cwd=REPO, stdout=open(tmp_path / f"{name}.log", "w"), stderr=subprocess.STDOUT, start_new_session=True
    )
    # Ctrl-C once the first trial has saved an epoch; SIGTERM (as `ray job stop` sends) once it has saved one more.
    first = stop_when(
        start("sigint"), lambda: epochs_saved(storage, 0) >= 1, "a first checkpoint", signal.SIGINT, group=True
    )
    saved = epochs_saved(storage, 0)
    second = stop_when(
        start("sigterm"),
        lambda: epochs_saved(storage, 0) > saved,
        "a checkpoint after the resume",
        signal.SIGTERM,
        group=False,
    )
    for code, name in ((first, "sigint"), (second, "sigterm")):
        log = (tmp_path / f"{name}.log").read_text()
        assert code == 130, log[-3000:]
        assert "the same command resumes it" in log.strip().splitlines()[-1] and "Traceback" not in log, log[-3000:]
    assert epochs_saved(storage, 0) < 6, "the first trial finished before the second stop: nothing was tested"
    # SIGKILL of the driver and the Ray instance it started (as if its node died) in the middle of the second trial.
    stop_when(
        start("sigkill"),
        lambda: finished_trial_results(storage) and epochs_saved(storage, 1) >= 1,
        "the first trial finished and the second saved an epoch",
        signal.SIGKILL,
        group=True,
    )
    assert not (out / "trials.csv").exists(), "the run finished before it was killed: nothing was tested"
    finished = finished_trial_results(storage)
    assert finished, "no finished trial on disk after the kill: the rerun's check below would check nothing"

    rerun = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    (wrote,) = [line for line in rerun.stdout.splitlines() if line.startswith("wrote ")]
    assert "model.ckpt, latents/" in wrote and not (out / "metrics.csv").exists()  # --final-epochs 0: no history
    for trial, reports in finished.items():
        assert finished_trial_results(storage)[trial] == reports, f"trial {trial} ran again"
    table = pd.read_csv(out / "trials.csv").set_index("trial_id")
    assert len(table) == 2
    for trial, row in table.iterrows():
        history = read_trial_history(row["checkpoint_path"])
        assert history["epoch"].tolist() == list(range(row["epochs_run"])), f"trial {trial}: each epoch once"
        assert row["val_nmse_at_grace"] == history.loc[1, "val_nmse"]
        # ASHA's only rung is epoch 2: a trial it stopped stopped there, however often its sweep was resumed.
        assert (row["status"], row["epochs_run"]) in {("finished", 6), ("stopped", 2)}, (trial, row["status"])
    assert table["epochs_run"].max() == 6  # the first trial had no peer at the rung, and ran to the end
    assert json.loads((out / PROVENANCE_FILE).read_text())["hardware"].startswith(
        f"Ray cluster of {os.cpu_count()} CPUs"
    )


@pytest.mark.parametrize(  # the refusals that need the cluster; every other bad flag: tests/test_flags.py
    "flags, message",
    [
        (["--gpus-per-trial", "4"], "but the cluster has"),
        (["--storage", "/proc/medvq-cannot-write-here"], "storage /proc/medvq-cannot-write-here is not writable"),
        (["--out", "file:///proc/medvq-cannot-write-here"], "medvq-cannot-write-here/ray_results is not writable"),
    ],
)
def test_sweep_rejects_bad_input_before_any_worker_starts(synthetic_root, tmp_path, flags, message):
    out = tmp_path / "out"
    command = [
        sys.executable,
        "jobs/sweep.py",
        "--data-root",
        str(synthetic_root),
        "--out",
        str(out),
        "--datasets",
        ",".join(SYNTHETIC_DATASETS),
        *flags,
    ]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not out.exists()


def parent_pid(pid: int) -> int:
    """The parent of a process (0 once it is gone): the fourth field of /proc/PID/stat, after the name's ")"."""
    try:
        return int(process_fields(pid)[1])
    except (OSError, IndexError, ValueError):
        return 0


def train_worker_pids(ancestor: int) -> list[int]:
    """The Ray Train worker processes (Ray names them after the actor) that `ancestor` started: its local Ray
    instance's, never another Ray's on this machine."""
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        with suppress(OSError):
            if cmdline.read_bytes().startswith(b"ray::RayTrainWorker"):
                pids.append(int(cmdline.parent.name))
    return [pid for pid in pids if ancestor in _ancestors(pid)]


def _ancestors(pid: int) -> list[int]:
    chain = []
    while pid > 1:
        pid = parent_pid(pid)
        chain.append(pid)
    return chain


def test_a_train_worker_killed_mid_run_restarts_from_the_last_checkpoint_and_a_rerun_trains_nothing(
    synthetic_root, tmp_path
):
    out = tmp_path / "out"
    command = [
        sys.executable,
        "jobs/train.py",
        "--data-root",
        str(synthetic_root),
        "--datasets",
        ",".join(SYNTHETIC_DATASETS),
        "--workers",
        "2",
        "--accelerator",
        "cpu",
        "--epochs",
        "5",
        "--limit-batches",
        "8",
        "--batch-size",
        "32",
        "--out",
        str(out),
    ]
    saved = lambda: max(
        (len(pd.read_csv(path)) for path in out.glob("ray_results/medvq-train-*/checkpoint_*/metrics.csv")), default=0
    )
    job = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for(lambda: saved() >= 2 and train_worker_pids(job.pid), "two epochs saved", 300, job)
    os.kill(train_worker_pids(job.pid)[-1], signal.SIGKILL)
    assert saved() < 5, "the run finished before its worker was killed: nothing was tested"
    log = job.communicate(timeout=600)[0]
    assert job.returncode == 0, log[-3000:]
    assert re.search(r"medvq-train-out-\w+: epoch 5/5, val PSNR [\d.]+ dB", log), log[-3000:]  # progress, on the driver
    history = pd.read_csv(out / "metrics.csv")
    assert history["epoch"].tolist() == list(range(5))  # each epoch once, across the restart
    assert (history["val_codebook_rank_spread"] == 0).all()  # both ranks' codebooks equal, after the restart too
    checkpoints = sorted(p.name for p in out.glob("ray_results/medvq-train-*/checkpoint_*") if p.is_dir())

    again = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert sorted(p.name for p in out.glob("ray_results/medvq-train-*/checkpoint_*") if p.is_dir()) == checkpoints
    assert VQVAEModule.load_from_checkpoint(out / "model.ckpt").config.workers == 2

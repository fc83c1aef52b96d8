"""A run is what its --out names: the same command resumes it, a new --out is a new run (also with a shared
--storage), and a resumed run must repeat its first start's settings. With an s3:// --out, what a failed or stopped
job wrote is in the bucket, and its error names the bucket. The jobs run as users run them, on a local Ray instance,
against the S3-compatible server of the multi-node tests."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pyarrow.fs as pafs
import pytest

from medvq.cli import check_same_run, run_record
from medvq.config import Config, SweepConfig
from medvq.errors import UserError
from medvq.provenance import PROVENANCE_FILE, write_provenance
from medvq.storage import ERROR_FILE, is_file, read_bytes
from tests.clusters import Processes, s3_filesystem, start_s3, wait_for
from tests.conftest import REPO, SYNTHETIC_DATASETS, slow_sweep_flags

BUCKET = "medvq-identity"


def sweep(**base_changes) -> SweepConfig:
    return SweepConfig(Config(**{"datasets": ("breastmnist",), **base_changes}), codebook_sizes=(64, 128))


def test_a_runs_name_comes_from_its_out_location(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    name = lambda out: run_record("sweep", out, sweep())["name"]
    assert name("runs/a") == name(str(tmp_path / "runs" / "a")) == name(f"{tmp_path}/runs/a/")  # one location
    assert name("runs/a").startswith("medvq-sweep-a-") and name("runs/a") != name("runs/b")
    assert name("s3://bucket/run 1/") == name("s3://bucket/run 1") != name("s3://other/run 1")
    assert name("s3://bucket/run 1").startswith("medvq-sweep-run-1-")
    assert run_record("train", "runs/a", Config())["name"].startswith("medvq-train-a-")


def test_a_resumed_run_must_repeat_its_first_starts_settings(tmp_path):
    out = str(tmp_path / "out")
    first = run_record("sweep", out, sweep())
    check_same_run(out, first)  # nothing there yet
    write_provenance(tmp_path / "out", "hardware", out, first)
    check_same_run(out, run_record("sweep", out, sweep()))
    check_same_run(out, run_record("sweep", out, sweep(data_root="/elsewhere", cpus_per_worker=4.0)))  # how, not what
    with pytest.raises(UserError) as refused:
        check_same_run(out, run_record("sweep", out, sweep(seed=1, datasets=("breastmnist", "bloodmnist"))))
    assert str(refused.value) == (
        f"--out {out} holds a run of jobs/sweep.py started with other settings: --datasets breastmnist,bloodmnist "
        "(it has breastmnist); --seed 1 (it has 0); repeat its flags to continue it, or give a new --out"
    )
    with pytest.raises(UserError, match=f"^--out {out} holds a run of jobs/sweep.py: give a new --out$"):
        check_same_run(out, run_record("train", out, Config()))
    write_provenance(tmp_path / "out", "hardware", out, run_record("sweep", out, sweep(seed=1)))  # a later start
    assert json.loads((tmp_path / "out" / PROVENANCE_FILE).read_text())["run"] == first  # the first start's stays


def test_a_setting_added_by_an_upgrade_does_not_refuse_a_resume(tmp_path):
    out = str(tmp_path / "out")
    first = run_record("sweep", out, sweep())
    older = {**first, "settings": {flag: value for flag, value in first["settings"].items() if flag != "--seed"}}
    write_provenance(tmp_path / "out", "hardware", out, older)  # as a version without --seed would have recorded
    check_same_run(out, run_record("sweep", out, sweep(seed=1)))  # nothing to compare --seed with


@pytest.fixture(scope="module")
def s3():
    """moto's S3 server, its environment set in this process too (read the outputs back through pyarrow)."""
    processes = Processes()
    try:
        env = start_s3(processes, BUCKET)
        with pytest.MonkeyPatch.context() as patch:
            for name, value in env.items():
                patch.setenv(name, value)
            yield env
    finally:
        processes.stop()


def sweep_command(data_root: Path, out: str, storage: str, *extra: str) -> list[str]:
    """One tiny trial of one epoch, no final fit: a commitment weight of 1e300 is inf in float32, so it diverges."""
    return [
        *(sys.executable, "jobs/sweep.py", "--data-root", str(data_root), "--datasets", ",".join(SYNTHETIC_DATASETS)),
        *("--out", out, "--storage", storage, "--codebook-sizes", "16", "--commitment-weights", "1e300"),
        *("--num-samples", "1", "--epochs", "1", "--grace-period", "1", "--final-epochs", "0"),
        *("--limit-batches", "2", "--batch-size", "32", "--hidden-channels", "16", "--embedding-dim", "8"),
        *("--accelerator", "cpu", *extra),
    ]


def run(command: list[str], s3: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=REPO, env={**os.environ, **s3}, capture_output=True, text=True, timeout=600)


def error_line(job: subprocess.CompletedProcess) -> str:
    lines = [line for line in job.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in job.stderr, job.stderr[-3000:]
    return lines[0]


def listed(location: str, recursive: bool = False) -> list[str]:
    """The paths under an s3:// location."""
    selector = pafs.FileSelector(location.removeprefix("s3://"), recursive=recursive, allow_not_found=True)
    return [info.path for info in s3_filesystem().get_file_info(selector)]


def sweeps_in(storage: str) -> set[str]:
    """The Tune experiments in `storage` (each trial's Train run beside them ends in its trial id, 5e42f_00000)."""
    return {Path(path).name for path in listed(storage) if "_" not in Path(path).name}


@pytest.mark.integration
def test_a_failed_sweep_on_s3_leaves_its_outputs_and_the_same_out_resumes_a_new_one_starts(s3, synthetic_root):
    storage, out, other = (f"s3://{BUCKET}/{path}" for path in ("storage", "runs/a", "runs/b"))
    first = run(sweep_command(synthetic_root, out, storage), s3)
    assert first.returncode == 1, first.stdout[-3000:] + first.stderr[-3000:]
    assert "new sweep medvq-sweep-a-" in first.stdout
    assert "search: 1 of 1 trials done; " in first.stdout and " diverged: train_loss became " in first.stdout
    # What the job wrote is in the bucket, and its error names it there, not the local folder it wrote from.
    assert error_line(first).endswith(f"see {out}/trials.csv") and "medvq-out-" not in first.stderr
    assert pd.read_csv(io.BytesIO(read_bytes(f"{out}/trials.csv")))["status"].tolist() == ["diverged"]
    assert read_bytes(f"{out}/{ERROR_FILE}").decode().strip().endswith(f"see {out}/trials.csv")
    assert json.loads(read_bytes(f"{out}/{PROVENANCE_FILE}"))["run"]["name"].startswith("medvq-sweep-a-")

    again = run(sweep_command(synthetic_root, out, storage), s3)
    assert again.returncode == 1, again.stderr[-3000:]
    assert "resuming sweep medvq-sweep-a-" in again.stdout and ": 1 of 1 trials done;" in again.stdout
    assert "search: " not in again.stdout  # no trial ran again

    new = run(sweep_command(synthetic_root, other, storage), s3)  # the same flags and storage, another --out
    assert new.returncode == 1 and "new sweep medvq-sweep-b-" in new.stdout, new.stdout[-3000:]
    assert "search: 1 of 1 trials done; " in new.stdout
    assert {name.split("-")[2] for name in sweeps_in(storage)} == {"a", "b"}

    before = read_bytes(f"{out}/{PROVENANCE_FILE}")
    changed = run(sweep_command(synthetic_root, out, storage, "--seed", "3"), s3)
    assert changed.returncode == 2, changed.stderr[-3000:]
    assert error_line(changed) == (
        f"error: --out {out} holds a run of jobs/sweep.py started with other settings: --seed 3 (it has 0); "
        "repeat its flags to continue it, or give a new --out"
    )
    assert read_bytes(f"{out}/{PROVENANCE_FILE}") == before and "new sweep" not in changed.stdout


@pytest.mark.integration
def test_a_sweep_on_s3_stopped_by_sigterm_leaves_its_record_and_why_in_the_bucket(s3, synthetic_root, tmp_path):
    out = f"s3://{BUCKET}/runs/stopped"
    command = [
        *(sys.executable, "jobs/sweep.py", "--data-root", str(synthetic_root)),
        *("--datasets", ",".join(SYNTHETIC_DATASETS), "--out", out),
        *slow_sweep_flags(epochs=6, codebook_sizes="16"),
    ]
    log = tmp_path / "sweep.log"
    with open(log, "w") as output:
        job = subprocess.Popen(command, cwd=REPO, env={**os.environ, **s3}, stdout=output, stderr=subprocess.STDOUT)
    saved = lambda: any(path.endswith("/metrics.csv") for path in listed(f"{out}/ray_results", recursive=True))
    wait_for(saved, "the trial's first checkpoint", 300, job)
    job.send_signal(signal.SIGTERM)
    assert job.wait(timeout=300) == 130, log.read_text()[-3000:]
    said = log.read_text()
    stopped = [line for line in said.splitlines() if line.startswith("error:")]
    assert len(stopped) == 1 and f"saved in {out}/ray_results/medvq-sweep-stopped-" in stopped[0], said[-3000:]
    assert (
        is_file(f"{out}/{PROVENANCE_FILE}")
        and "Stopped: the sweep was stopped by SIGTERM" in read_bytes(f"{out}/{ERROR_FILE}").decode()
    )

"""benchmarks/run.py --smoke on the synthetic files, as CI runs it to keep the scripts working. No speed
assertions: the figures of a smoke run on a shared CI machine mean nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from jobs.sweep import sweep_summary
from tests.conftest import REPO, SYNTHETIC_DATASETS

pytestmark = pytest.mark.integration

CONTENDERS = (
    "seed pipeline",
    "medvq model, seed data path",
    "medvq as shipped",
    "Ray Train, 1 CPU worker",
    "Ray Train, 2 CPU workers",
    "plain torch loop",
    "Ray Data, end to end",
    "Ray Data, Ray already running",
    "Ray Data, steady",
    "UMAP",
    "draw_run",
    "medvq as shipped, batch 32",
    "this process / a Ray Train worker",
)
TRAINING = ("seed_pipeline", "medvq_model_seed_data", "lightning")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> tuple[str, dict]:
    """(stdout, the JSON) of one smoke run on the CPU; the whole-job row is left out (tests/test_jobs.py runs
    that job, and the line it is read from is tested below)."""
    out = tmp_path_factory.mktemp("benchmark") / "benchmark.json"
    command = [
        sys.executable,
        "benchmarks/run.py",
        "--smoke",
        "--no-sweep",
        "--accelerator",
        "cpu",
        "--synthetic",
        "--datasets",
        ",".join(SYNTHETIC_DATASETS),
        "--batch-sizes",
        "32",
        "--out",
        str(out),
    ]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout, json.loads(out.read_text())


def test_the_table_lists_every_contender(smoke):
    stdout, results = smoke
    table = [line for line in stdout.splitlines() if line.startswith("| ")]
    for contender in CONTENDERS:
        assert any(contender in line for line in table), f"no row for {contender!r} in:\n" + "\n".join(table)
    assert results["table"] in stdout


def test_every_contender_has_positive_figures(smoke):
    _, results = smoke
    training, encoding = results["training"], results["encoding"]
    for contender in TRAINING:
        assert training[contender]["images_per_second"] > 0
    # Without --compile (its compiling alone is most of a smoke run; tests/test_train.py trains a compiled model).
    assert [run["compiled"] for run in training["batches"].values()] == [False]
    assert all(run["batch_size"] == 32 and run["images_per_second"] > 0 for run in training["batches"].values())
    for run in ("ray_1_worker", "ray_2_cpu_workers"):
        assert training[run]["epoch_seconds"] > 0
    assert encoding["plain_loop"]["images"] == encoding["ray_data"]["images"] > 0
    assert encoding["plain_loop"]["steady_images_per_second"] > 0
    # Ray Data's steady figure is a difference of two timings, which noise may leave undefined: not asserted.
    assert encoding["ray_data"]["end_to_end_seconds"] > 0 and encoding["ray_data"]["warm_seconds"] > 0
    assert results["projection"]["umap_seconds"] > 0
    for result in results["ray_overhead"].values():
        assert result["plain"]["step_seconds"] > 0 and result["ray_worker"]["step_seconds"] > 0
    assert sorted(result["threads"] for result in results["ray_overhead"].values()) == sorted({os.cpu_count(), 1})
    assert {"cpu", "cpus", "torch", "ray", "lightning", "commit"} <= set(results["hardware"])


def test_the_sweep_row_reads_the_seconds_the_sweep_job_writes(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    from sweep_job import step_seconds

    best = {
        "trials": 2,
        "trials_by_status": {"finished": 2},
        "trial_id": "a",
        "checkpoint": "model.ckpt",
        "config": {"codebook_size": 32, "commitment_weight": 0.25, "seed": 0},
        "metrics": {"val_nmse": 0.5, "val_psnr": 20.0, "val_ssim": 0.5, "val_codes_used": 0.5},
    }
    seconds = {"ray_init": 3.14, "search": 50.2, "encode": 10.0, "umap": 20.0, "probes": 3.0, "plots": 5.0}
    summary = sweep_summary(best, seconds) + "\n| dataset | ... |\n"
    assert step_seconds(summary) == {step: round(value, 1) for step, value in seconds.items()}


def test_timing_steps_on_one_thread_leaves_the_process_thread_count(monkeypatch, tiny_config):
    """The benchmark's later sections (the plain encoding loop) run in the same process on every core."""
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    from ray_overhead import time_steps

    threads = torch.get_num_threads()
    result = time_steps(tiny_config().to_dict(), threads=1 if threads > 1 else 2, steps=2)
    assert torch.get_num_threads() == threads
    assert result["step_seconds"] > 0

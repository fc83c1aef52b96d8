"""Every benchmark script with --smoke on the synthetic files, as CI runs them to keep the scripts working. No
speed assertions: the figures of a smoke run on a shared CI machine mean nothing."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import pandas as pd
import pytest

from jobs.sweep import sweep_summary
from medvq.errors import RunFailed
from medvq.train import train_local
from tests.conftest import REPO, SYNTHETIC_DATASETS

pytestmark = pytest.mark.integration

CONTENDERS = {
    "train_speed": (
        "seed pipeline",
        "medvq model, seed data path",
        "medvq as shipped",
        "Ray Train, 1 CPU worker",
        "Ray Train, 2 CPU workers",
        "medvq as shipped, batch 32",
    ),
    "encode_speed": (
        "plain torch loop",
        "Ray Data, end to end",
        "Ray Data, Ray already running",
        "Ray Data, steady",
        "UMAP",
        "draw_run",
    ),
    "ray_cost": ("this process / a Ray Train worker",),
}
# The whole-job row is left out: tests/test_jobs.py runs that job, and the line it is read from is tested below.
# --batch-sizes without --compile: compiling is most of a smoke run; tests/test_train.py trains a compiled model.
FLAGS = {"train_speed": ("--batch-sizes", "32"), "encode_speed": (), "ray_cost": ("--sweep", "none")}


def smoke_run(script: str, out) -> tuple[str, dict]:
    """(stdout, the JSON) of `benchmarks/<script>.py --smoke` on the CPU."""
    command = [
        sys.executable,
        f"benchmarks/{script}.py",
        "--smoke",
        "--accelerator",
        "cpu",
        "--synthetic",
        "--datasets",
        ",".join(SYNTHETIC_DATASETS),
        *FLAGS[script],
        "--out",
        str(out),
    ]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout, json.loads(out.read_text())


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """Each script's smoke run, once, when a test first asks for it."""
    runs = {}

    def run(script: str) -> tuple[str, dict]:
        if script not in runs:
            runs[script] = smoke_run(script, tmp_path_factory.mktemp(script) / "raw.json")
        return runs[script]

    return run


@pytest.mark.parametrize("script", CONTENDERS)
def test_the_table_lists_every_contender(smoke, script):
    stdout, results = smoke(script)
    table = [line for line in stdout.splitlines() if line.startswith("| ")]
    for contender in CONTENDERS[script]:
        assert any(contender in line for line in table), f"no row for {contender!r} in:\n" + "\n".join(table)
    assert results["table"] in stdout
    assert {"cpu", "cpus", "torch", "ray", "lightning", "commit"} <= set(results["hardware"])


def test_every_training_contender_has_positive_figures(smoke):
    _, results = smoke("train_speed")
    for contender in ("seed_pipeline", "medvq_model_seed_data", "lightning"):
        assert results[contender]["images_per_second"] > 0
    assert [run["compiled"] for run in results["batches"].values()] == [False]
    assert all(run["batch_size"] == 32 and run["images_per_second"] > 0 for run in results["batches"].values())
    for run in ("ray_1_worker", "ray_2_cpu_workers"):
        assert results[run]["epoch_seconds"] > 0


def test_every_encoding_contender_has_positive_figures(smoke):
    _, results = smoke("encode_speed")
    plain, ray_data = results["plain_loop"], results["ray_data"]
    assert plain["images"] == ray_data["images"] > 0 and plain["steady_images_per_second"] > 0
    # Ray Data's steady figure is a difference of two timings, which noise may leave undefined: not asserted.
    assert ray_data["end_to_end_seconds"] > 0 and ray_data["warm_seconds"] > 0
    assert results["projection"]["umap_seconds"] > 0 and results["projection"]["figures"]


def test_the_step_is_timed_here_and_in_a_ray_worker(smoke):
    _, results = smoke("ray_cost")
    for result in results["train_step"].values():
        assert result["plain"]["step_seconds"] > 0 and result["ray_worker"]["step_seconds"] > 0
    assert sorted(result["threads"] for result in results["train_step"].values()) == sorted({os.cpu_count(), 1})


def test_the_sweep_row_reads_the_seconds_the_sweep_job_writes(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    from ray_cost import step_seconds

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


def test_after_training_times_the_jobs_steps_and_compares_each_probe_with_the_runs_summary(tiny_config, tmp_path):
    run, config = tmp_path / "run", tiny_config(limit_batches=2)
    train_local(config, run)
    # A summary of accuracies all 0: each probe's change is then its accuracy now, in points
    probes = ("knn_features", "knn_pixels", "linear_features", "linear_pixels", "dataset_recovered")
    zeros = [{"dataset": name, **dict.fromkeys(probes, 0.0)} for name in config.datasets]
    (run / "summary.json").write_text(json.dumps(zeros))
    before, out = sorted(run.iterdir()), tmp_path / "raw.json"
    data = ["--data-root", config.data_root, "--datasets", ",".join(config.datasets)]
    command = [sys.executable, "benchmarks/after_training.py", "--run", str(run), *data, "--out", str(out)]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads(out.read_text())
    steps = ["encode", "neighbours", "probes", "umap", "training_plots", "plots"]
    assert list(results["steps"]) == steps and all(value > 0 for value in results["steps"].values())
    assert results["total_seconds"] >= max(results["steps"].values())
    changes = results["probe_changes"]
    assert len(changes) == len(probes) * len(config.datasets) and all(0 <= value <= 100 for value in changes.values())
    assert max(changes.values()) > 0 and f"| probes | {len(changes)} accuracies against" in done.stdout
    assert sorted(run.iterdir()) == before  # the run itself is not touched: the work happens in a copy


def test_a_benchmark_refuses_to_time_the_medvq_of_another_checkout(tmp_path):
    """A benchmark copied into a second checkout, whose medvq is not the one installed, says so instead of timing it."""
    other = tmp_path / "older-checkout"
    shutil.copytree(REPO / "benchmarks", other / "benchmarks")
    command = [sys.executable, str(other / "benchmarks" / "quick_start.py"), "--synthetic", "--smoke"]
    env = {name: value for name, value in os.environ.items() if name != "PYTHONPATH"}
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 2 and not (tmp_path / "quick-start.json").exists()
    assert done.stderr.strip() == (
        f"error: medvq is imported from {REPO}, not from this benchmark's checkout {other}: run it with "
        f"PYTHONPATH={other}, or pip install -e {other}"
    )


def test_the_quick_start_is_compared_with_its_lower_floor(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    from quick_start import floor_seconds, rows

    assert floor_seconds() > 0  # the floor's own process: the job's imports and a Ray start, for real
    table = rows({"floor_seconds": [15.0, 12.5], "total_seconds": 50.0, "steps": {"ray_init": 3.0, "search": 20.0}})
    assert table[0][2] == "15.0 and 12.5 s" and table[1][2:] == ("50.0 s wall", "4.0x")
    assert table[2][2] == "ray_init 3.0 s, search 20.0 s"


def test_rate_distortion_rows_are_every_grid_and_codebook_size_at_their_bits(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    from rate_distortion import CODEBOOK_SIZES, rows

    table = rows((28, 64))
    assert len(table) == 4 * len(CODEBOOK_SIZES)
    assert table["28px-14x14-K64"]["bits"] == 14 * 14 * 6 and table["64px-4x4-K256"]["bits"] == 4 * 4 * 8
    assert table["28px-7x7-K1024"]["flags"] == ["--size", "28", "--downsample", "2", "--codebook-size", "1024"]
    assert table["64px-8x8-K256"]["flags"][:4] == ["--size", "64", "--downsample", "3"]


def test_ablation_rows_of_the_same_model_share_one_epoch_time(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    from ablations import ROWS, shared_epoch_seconds

    probed = {name: 10.0 for name in ROWS} | {"defaults": 8.0, "cosine": 9.0, "rotation": 30.0, "width-64": 6.0}
    probed |= {"ssim-0.3": 40.0, "no-ssim": 7.0}
    # defaults, cosine, constant-lr, rotation, k-means, lr, EMA and SSIM-0.3 train one model: the median of their probes
    assert shared_epoch_seconds("rotation", probed) == shared_epoch_seconds("ssim-0.3", probed) == 10.0
    assert shared_epoch_seconds("defaults", probed) == 10.0
    assert shared_epoch_seconds("width-64", probed) == 6.0  # a narrower model is its own
    assert shared_epoch_seconds("no-ssim", probed) == 7.0  # without the SSIM term: a cheaper step


def test_long_runs_time_an_epoch_from_one_rewrite_of_metrics_to_the_next(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    from long_runs import SAFETY, epochs_that_fit, seconds_per_epoch

    # The first epoch (warm-up) is left out; an epoch the watcher missed (3) does not count twice.
    written = {1: 100.0, 2: 102.5, 4: 107.5}
    assert seconds_per_epoch(written, "row") == 2.5
    with pytest.raises(RunFailed, match="too few epochs"):
        seconds_per_epoch({1: 100.0, 2: 102.5}, "row")
    assert epochs_that_fit(seconds_left=300, start_seconds=20, epoch_seconds=2.5) == int(280 / (2.5 * SAFETY))
    assert epochs_that_fit(seconds_left=10, start_seconds=20, epoch_seconds=2.5) == 1


def test_long_runs_train_every_row_side_by_side_within_the_budget(synthetic_root, tmp_path):
    rows, minutes = ("batch-256-width-64", "batch-128-width-128"), 1.0
    # Epochs of a few tenths of a second: long enough for the probe's watcher to see each one written.
    tiny = "--limit-batches 8 --hidden-channels 16 --embedding-dim 8 --batch-size 32"
    command = [sys.executable, "benchmarks/long_runs.py", "--data-root", str(synthetic_root)]
    command += ["--datasets", ",".join(SYNTHETIC_DATASETS), "--rows", ",".join(rows), "--minutes", str(minutes)]
    command += ["--row-flags", tiny, "--out", str(tmp_path)]
    started = time.monotonic()
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    # The budget, plus the grace a run stopped at its end has to write its checkpoint, plus this process's start.
    assert time.monotonic() - started < minutes * 60 + 30 + 30
    table = pd.read_csv(tmp_path / "long_runs.csv")
    assert list(table["row"]) == list(rows)
    for name, epochs in zip(table["row"], table["epochs"]):
        trained = pd.read_csv(tmp_path / "runs" / name / "metrics.csv")
        assert epochs.startswith(f"{len(trained)} of ") and "failed" not in epochs
        assert tiny in table.set_index("row").loc[name, "command"]  # the row flags reach every row's command
    assert "| batch-128-width-128 |" in (tmp_path / "long_runs.md").read_text()
    again = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and "is not empty" in again.stderr  # its runs would be continued, not timed


def test_long_runs_stop_every_late_run_at_once_and_say_which_failed(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import long_runs

    monkeypatch.setattr(long_runs, "STOP_GRACE_SECONDS", 2)

    def run(code: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-c", code])

    # Late runs that ignore SIGTERM: each is killed once the one grace after the deadline is over.
    deaf = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"
    runs = {"late": run(deaf), "late too": run(deaf), "failed": run("raise SystemExit(3)"), "ok": run("")}
    started = time.monotonic()
    endings = long_runs.wait_all(runs, deadline=started + 3)
    assert time.monotonic() - started < 3 + 2 + 1.5  # one grace for both, not one after the other
    assert endings == {
        "late": "stopped at the budget",
        "late too": "stopped at the budget",
        "failed": "failed, exit status 3",
    }
    assert all(process.poll() is not None for process in runs.values())

"""The job on a real multi-node Ray cluster: a 0-CPU head (every trial, Train worker and encoder actor runs
elsewhere) and two worker nodes that cannot see the head's /tmp, storage on an S3-compatible server reached
through AWS_ENDPOINT_URL, as `cluster/` sets it up. The cluster is shared by every test here."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pyarrow.fs as pafs
import pytest
from medmnist import INFO

from medvq.checkpoints import read_checkpoint
from medvq.module import VQVAEModule
from medvq.storage import read_bytes
from medvq.synthetic import write_synthetic_npz
from medvq.tune import read_trial_history
from tests.clusters import (
    Cluster,
    Processes,
    client_env,
    process_fields,
    s3_filesystem,
    start_head,
    start_private_node,
    start_s3,
    wait_for,
)
from tests.conftest import REPO, SYNTHETIC_DATASETS, slow_sweep_flags, smoke_command
from tests.test_readme import assert_prints_like_the_readme

pytestmark = pytest.mark.integration
BUCKET = "medvq-test"
ENDED = ("SUCCEEDED", "FAILED", "STOPPED")  # a Ray job's final states
SHARED_VOLUME = "/var/tmp"  # seen by every node (only /tmp is private to each): a shared volume's stand-in


@dataclass
class MultiNode:
    processes: Processes  # the nodes' process groups among them
    cluster: Cluster
    s3_data: str  # the synthetic files in the bucket
    shared_data: Path  # ... and on the "shared volume"


@pytest.fixture(scope="module")
def multinode(synthetic_root):
    processes = Processes()
    try:
        s3 = start_s3(processes, BUCKET)
        with pytest.MonkeyPatch.context() as patch:
            for name, value in s3.items():  # this process reads the outputs back through pyarrow too
                patch.setenv(name, value)
            cluster = start_head(processes, client_env(**s3), "--num-cpus=0")
            for _ in range(2):
                start_private_node(processes, cluster, cpus=2)
            shared = Path(processes.folder("medvq-shared-", SHARED_VOLUME))
            for seed, name in enumerate(SYNTHETIC_DATASETS):
                write_synthetic_npz(shared, name, seed=seed)
            pafs.copy_files(str(shared), f"s3://{BUCKET}/medmnist")
            yield MultiNode(processes, cluster, f"s3://{BUCKET}/medmnist", shared)
    finally:
        processes.stop()


def driver(cluster: Cluster, *command: str) -> subprocess.CompletedProcess:
    """A job's driver started here (the head's node), joining the cluster by RAY_ADDRESS."""
    return subprocess.run(
        [sys.executable, *command],
        cwd=REPO,
        env={**cluster.env, "RAY_ADDRESS": cluster.address},
        capture_output=True,
        text=True,
        timeout=600,
    )


def s3_path(uri: str) -> str:
    return uri.removeprefix("s3://")


def read_latents(location: str | Path) -> pd.DataFrame:
    """The Parquet latents with pandas, sorted by image: from S3 through pyarrow's filesystem, or a folder."""
    if str(location).startswith("s3://"):
        latents = pd.read_parquet(s3_path(str(location)), filesystem=s3_filesystem())
    else:
        latents = pd.read_parquet(location)
    return latents.sort_values(["dataset", "split", "index"]).reset_index(drop=True)


def test_the_sweep_with_data_and_outputs_on_s3(multinode, tmp_path):
    out = f"s3://{BUCKET}/runs/all-on-s3"
    job = multinode.cluster.submit(*smoke_command(multinode.s3_data, out))
    assert job.returncode == 0, job.stdout[-4000:] + job.stderr[-2000:]

    best = json.loads(read_bytes(f"{out}/best.json"))
    assert best["checkpoint"].startswith(f"{out}/ray_results/")  # the full URI, scheme and all
    trials = pd.read_parquet(s3_path(f"{out}/trials.parquet"), filesystem=s3_filesystem())
    assert len(trials) == 2 and trials["checkpoint_path"].str.startswith(f"{out}/ray_results/").all()
    restored = VQVAEModule.load_from_checkpoint(best["checkpoint"])  # as best.json names it
    assert restored.config.codebook_size == best["config"]["codebook_size"]
    # The shipped model is the final fit of the best trial's settings (the smoke's: one epoch), on the cluster too
    shipped = read_checkpoint(f"{out}/model.ckpt")
    assert shipped["epoch"] == 0 and best["final_fit"]["epochs"] == 1
    trained = shipped["hyper_parameters"]["config"]
    assert all(trained[name] == best["config"][name] for name in ("codebook_size", "commitment_weight", "seed"))
    latents = read_latents(f"{out}/latents")
    assert sorted(latents["dataset"].unique()) == sorted(SYNTHETIC_DATASETS)

    # Another process re-encodes from the shipped checkpoint's URI: the same codes for every image.
    encode = driver(
        multinode.cluster,
        "jobs/encode.py",
        "--checkpoint",
        f"{out}/model.ckpt",
        "--data-root",
        multinode.s3_data,
        "--out",
        str(tmp_path / "again"),
    )
    assert encode.returncode == 0, encode.stderr[-3000:]
    again = read_latents(tmp_path / "again" / "latents")
    assert again[["dataset", "split", "index"]].equals(latents[["dataset", "split", "index"]])
    assert all((a == b).all() for a, b in zip(again["codes"], latents["codes"], strict=True))

    # The figures are redrawn from the run's URI, no Ray needed.
    s3_filesystem().delete_file(s3_path(f"{out}/plots/latent_space.png"))
    plot = subprocess.run(
        [sys.executable, "jobs/plot.py", "--run", out],
        cwd=REPO,
        env=multinode.cluster.env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert plot.returncode == 0 and f"wrote {out}/plots/latent_space.png" in plot.stdout, plot.stderr[-3000:]
    assert s3_filesystem().get_file_info(s3_path(f"{out}/plots/latent_space.png")).size > 0


def test_the_sweep_with_outputs_on_the_head_and_ray_storage_on_s3(multinode, tmp_path):
    out, storage = tmp_path / "out", f"s3://{BUCKET}/storage/head-out"
    job = multinode.cluster.submit(*smoke_command(multinode.shared_data, out, "--storage", storage))
    assert job.returncode == 0, job.stdout[-4000:] + job.stderr[-2000:]
    best = json.loads((out / "best.json").read_text())
    assert best["checkpoint"].startswith(f"{storage}/") and (out / "model.ckpt").stat().st_size > 0
    assert pd.read_csv(out / "trials.csv")["checkpoint_path"].str.startswith(f"{storage}/").all()
    images = sum(sum(INFO[name]["n_samples"].values()) for name in SYNTHETIC_DATASETS)
    assert len(read_latents(out / "latents")) == images
    figures = {path.name for path in (out / "plots").iterdir()}
    assert {"latent_space.png", "curves.png", "sweep.png", "reconstructions.png"} <= figures
    assert not (out / "ray_results").exists()


def test_the_sweep_with_everything_on_a_shared_volume(multinode):
    """cluster/kuberay's form: data, outputs and Ray's storage (OUT/ray_results by default) on one volume."""
    out = multinode.shared_data / "runs" / "sweep"  # removed with the volume's folder
    job = multinode.cluster.submit(*smoke_command(multinode.shared_data, out))
    assert job.returncode == 0, job.stdout[-4000:] + job.stderr[-2000:]
    assert_prints_like_the_readme(job.stdout)  # the README's quick-start sample: this run's lines, in their shape
    best = json.loads((out / "best.json").read_text())
    assert best["checkpoint"].startswith(f"{out}/ray_results/") and Path(best["checkpoint"]).is_file()
    assert (out / "model.ckpt").is_file() and len(read_latents(out / "latents")) > 0


@pytest.mark.parametrize("what", ["out", "data-root"])
def test_a_local_folder_the_other_nodes_cannot_see_is_refused_before_any_trial(
    multinode, synthetic_root, tmp_path, what
):
    if what == "out":  # head-local --out and no --storage: Ray's storage would be OUT/ray_results, here only
        out, expected = tmp_path / "out", "is a folder only this node has"
        flags = smoke_command(multinode.shared_data, out)
    else:  # the data in this node's /tmp only
        out = f"s3://{BUCKET}/runs/refused"
        flags, expected = smoke_command(synthetic_root, out), f"--data-root {synthetic_root} is not on every node"
    job = driver(multinode.cluster, *flags[1:])
    assert job.returncode == 2, job.stderr[-3000:]
    error_lines = [line for line in job.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and expected in error_lines[0] and "Traceback" not in job.stderr
    if what == "out":
        assert not out.exists()
    else:
        assert s3_filesystem().get_file_info(s3_path(out)).type == pafs.FileType.NotFound


def parent(pid: int) -> int:
    return int(process_fields(pid)[1])


def started_ancestor(pid: int, started: set[int]) -> int:
    """The process among `started` that `pid` descends from."""
    while pid not in started:
        assert pid > 1, "not a process of this test's cluster"
        pid = parent(pid)
    return pid


def kill_tree(root: int) -> None:
    """SIGKILL `root` and every process under it, as a machine that dies takes them all (Ray's raylet and its
    workers have process groups of their own, so killing the node's group alone would leave them running)."""
    tree, changed = {root}, True
    while changed:
        children = set()
        for stat in Path("/proc").glob("[0-9]*/stat"):
            with suppress(OSError, ValueError):
                if parent(int(stat.parent.name)) in tree:
                    children.add(int(stat.parent.name))
        changed, tree = not children <= tree, tree | children
    for pid in tree:
        with suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def test_a_node_lost_mid_trial_its_trial_resumes_on_another_and_the_sweep_finishes(multinode):
    """Last in this file: the cluster has one worker node fewer after it."""
    cluster, out = multinode.cluster, f"s3://{BUCKET}/runs/node-lost"
    submitted = cluster.submit(
        "python",
        "jobs/sweep.py",
        "--data-root",
        multinode.s3_data,
        "--datasets",
        ",".join(SYNTHETIC_DATASETS),
        "--out",
        out,
        *slow_sweep_flags(epochs=8, codebook_sizes="16"),
        wait=False,
    )
    assert submitted.returncode == 0, submitted.stderr[-2000:]
    job_id = re.search(r"raysubmit_[A-Za-z0-9]+", submitted.stdout)[0]
    checkpoints = pafs.FileSelector(s3_path(f"{out}/ray_results"), recursive=True, allow_not_found=True)
    saved = lambda: [
        info.path for info in s3_filesystem().get_file_info(checkpoints) if info.path.endswith("/metrics.csv")
    ]
    workers = []  # the trial's Train worker, once it has saved an epoch
    found = lambda: saved() and workers.extend(a for a in cluster.actors("RayTrainWorker") if a["state"] == "ALIVE")
    wait_for(lambda: found() or workers or cluster.job_status(job_id) in ENDED, "the trial's first checkpoint", 300)
    assert workers, cluster.job_logs(job_id)[-3000:]
    lost = workers[0]
    kill_tree(started_ancestor(lost["pid"], {process.pid for process in multinode.processes.started}))

    try:
        wait_for(lambda: cluster.job_status(job_id) in ENDED, "the sweep's end", 600)
    except AssertionError:
        raise AssertionError(f"the sweep did not end; its log:\n{cluster.job_logs(job_id)[-6000:]}") from None
    assert cluster.job_status(job_id) == "SUCCEEDED", cluster.job_logs(job_id)[-4000:]
    trial = pd.read_parquet(s3_path(f"{out}/trials.parquet"), filesystem=s3_filesystem()).iloc[0]
    assert (trial["status"], trial["epochs_run"]) == ("finished", 8)
    assert read_trial_history(trial["checkpoint_path"])["epoch"].tolist() == list(range(8))  # each epoch once
    nodes = {actor["node_id"] for actor in cluster.actors("RayTrainWorker")}
    assert lost["node_id"] in nodes and len(nodes) >= 2, "the trial did not move to another node"

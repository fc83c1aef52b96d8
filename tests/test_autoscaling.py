"""The job on Ray's own local autoscaler (`RAY_FAKE_CLUSTER=1 ray start --head --autoscaling-config=...`): a
0-CPU head and node types that start at 0 nodes, as cluster/'s autoscaling clusters have. The sweep is
measured against what the cluster can grow to, not the nodes up now; the autoscaler adds the nodes."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import yaml

from tests.clusters import RAY, Cluster, Processes, client_env, free_port, start_head, wait_for
from tests.conftest import REPO, smoke_command

pytestmark = pytest.mark.integration
CPU_NODES = {"cpu": {"resources": {"CPU": 2}, "min_workers": 0, "max_workers": 2}}
GPU_NODES = {**CPU_NODES, "gpu": {"resources": {"CPU": 1, "GPU": 1}, "min_workers": 0, "max_workers": 1}}


def fake_cluster_config(port: int, node_types: dict) -> dict:
    """Ray's fake multi-node provider: each node it adds is a `ray start` on this machine. The v1 monitor reads
    the file as it is, with no defaults filled in, so every key the launcher knows is given."""
    empty = (
        "initialization_commands",
        "setup_commands",
        "head_setup_commands",
        "worker_setup_commands",
        "head_start_ray_commands",
        "worker_start_ray_commands",
        "cluster_synced_files",
        "rsync_exclude",
        "rsync_filter",
    )
    types = {"ray.head.default": {"resources": {"CPU": 0}, "max_workers": 0}, **node_types}
    return {
        "cluster_name": "medvq-test",
        "max_workers": sum(t["max_workers"] for t in node_types.values()),
        "provider": {
            "type": "fake_multinode",
            "gcs_address": f"127.0.0.1:{port}",
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
        },
        "available_node_types": {name: {"node_config": {}, **t} for name, t in types.items()},
        "head_node_type": "ray.head.default",
        "auth": {},
        "docker": {},
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": 2,
        "file_mounts": {},
        "file_mounts_sync_continuously": False,
        **{key: [] for key in empty},
    }


@contextmanager
def autoscaling_cluster(node_types: dict) -> Iterator[Cluster]:
    processes = Processes()
    try:
        port, config = free_port(), processes.folder("medvq-autoscaler-") / "autoscaling.yaml"
        config.write_text(yaml.safe_dump(fake_cluster_config(port, node_types)))
        env = client_env(RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S="1")  # scale within seconds
        yield start_head(processes, env, "--num-cpus=0", f"--autoscaling-config={config}", port=port)
    finally:
        processes.stop()


def test_the_smoke_sweep_starts_with_no_worker_up_and_the_autoscaler_adds_them(synthetic_root, tmp_path):
    with autoscaling_cluster(CPU_NODES) as cluster:
        assert [node["resources_total"].get("CPU", 0) for node in cluster.nodes()] == [0]  # the head alone
        job = cluster.submit(*smoke_command(synthetic_root, tmp_path / "out"), working_dir=False)
        assert job.returncode == 0, job.stdout[-4000:] + job.stderr[-2000:]
        assert "2 trials; up to 2 at once on the CPU," in job.stdout  # counted on the 2 x 2 CPUs it can grow to
        added = [node for node in cluster.nodes() if node["resources_total"].get("CPU", 0) == 2]
        assert added, "the autoscaler added no node"
    assert (tmp_path / "out" / "model.ckpt").is_file() and (tmp_path / "out" / "latents").is_dir()


def test_a_gpu_sweep_is_not_refused_for_want_of_a_gpu_node_up_and_the_autoscaler_adds_one(synthetic_root, tmp_path):
    with autoscaling_cluster(GPU_NODES) as cluster:
        driver = lambda *flags: subprocess.run(
            [sys.executable, *smoke_command(synthetic_root, tmp_path / "out", *flags)[1:]],
            cwd=REPO,
            env={**cluster.env, "RAY_ADDRESS": cluster.address},
            capture_output=True,
            text=True,
            timeout=300,
        )
        too_big = driver("--gpus-per-trial", "2")  # no node type has two GPUs
        assert too_big.returncode == 2 and "can grow to 5 CPUs and 1 GPUs" in too_big.stderr, too_big.stderr
        assert "Traceback" not in too_big.stderr and not (tmp_path / "out").exists()

        submitted = cluster.submit(
            *smoke_command(synthetic_root, tmp_path / "out", "--gpus-per-trial", "1"), working_dir=False, wait=False
        )
        assert submitted.returncode == 0, submitted.stderr[-2000:]
        job_id = re.search(r"raysubmit_[A-Za-z0-9]+", submitted.stdout)[0]
        try:  # the fake GPU cannot train: the test ends once the autoscaler has added the GPU node
            wait_for(
                lambda: any(node["resources_total"].get("GPU") for node in cluster.nodes()),
                "the autoscaler adding a GPU node",
                seconds=180,
            )
            logs = lambda: subprocess.run(
                [RAY, "job", "logs", "--address", cluster.dashboard, job_id],
                env=cluster.env,
                capture_output=True,
                text=True,
                timeout=60,
            )
            wait_for(
                lambda: "2 trials; up to 1 at once" in logs().stdout + logs().stderr,
                "the sweep's start in its log",
                seconds=60,
            )
            assert not [line for line in logs().stdout.splitlines() if line.startswith("error:")]  # not refused
        finally:
            subprocess.run(
                [RAY, "job", "stop", "--address", cluster.dashboard, "--no-wait", job_id],
                env=cluster.env,
                capture_output=True,
                timeout=60,
            )

"""What the cluster can hold: the nodes up now, or what an autoscaler can grow it to (Ray's fake autoscaler
in tests/test_autoscaling.py; the folder checks across nodes in tests/test_multinode.py); and whether a node can leave
it, for Ray Train's preemption watcher."""

from __future__ import annotations

import os

import pytest

from medvq import nodes, ray_train
from medvq.errors import UserError
from medvq.nodes import Capacity


def test_a_trial_larger_than_the_cluster_is_a_clear_error(tiny_config):
    one_node = lambda resources: Capacity((resources,), resources, autoscaling=False)
    with pytest.raises(UserError, match="needs 2 CPUs and 4 GPUs .* the cluster has 8 CPUs and 1 GPUs"):
        one_node({"CPU": 8, "GPU": 1}).runs_at_once(tiny_config(workers=2, gpus_per_worker=2))
    assert one_node({"CPU": 16, "GPU": 1}).runs_at_once(tiny_config(gpus_per_worker=0.25)) == 4
    assert one_node({"CPU": 5}).runs_at_once(tiny_config(workers=2)) == 2


def test_an_autoscaling_cluster_is_measured_by_what_it_can_grow_to(tiny_config):
    # A 0-CPU head up, node types of 2 CPUs (up to 2 nodes) and of 1 CPU + 1 GPU (1 node) to be added.
    cluster = Capacity(({"CPU": 0}, {"CPU": 2}, {"CPU": 1, "GPU": 1}), {"CPU": 5, "GPU": 1}, autoscaling=True)
    assert cluster.runs_at_once(tiny_config(gpus_per_worker=1)) == 1
    assert cluster.runs_at_once(tiny_config(cpus_per_worker=2)) == 2
    # Five CPUs in all, but no node type has three for one worker.
    with pytest.raises(UserError, match="can grow to 5 CPUs and 1 GPUs, at most 2 CPUs and 1 GPUs on one node"):
        cluster.runs_at_once(tiny_config(cpus_per_worker=3))


def test_an_autoscaler_whose_node_types_cannot_be_read_refuses_nothing(tiny_config, monkeypatch, caplog):
    monkeypatch.setattr(nodes, "autoscaler_node_types", lambda: [])  # KubeRay's: it runs beside the head
    monkeypatch.setattr(nodes.ray, "nodes", lambda: [{"Alive": True, "Resources": {"CPU": 4}}])
    monkeypatch.setattr(nodes.ray, "cluster_resources", lambda: {"CPU": 4})
    cluster = nodes.capacity()
    assert cluster.runs_at_once(tiny_config(gpus_per_worker=1, workers=2)) >= 1
    assert any("cannot be read from here" in message for message in caplog.messages)


@pytest.mark.parametrize(
    "monitor, expected",
    [
        (["python", "monitor.py", "--gcs-address", "10.0.0.1:6379"], None),  # Ray's own monitor, no autoscaler
        (["python", "monitor.py", "--autoscaling-config", "CONFIG"], [({"CPU": 8, "GPU": 1}, 4), ({"CPU": 2}, 3)]),
    ],
)
def test_the_node_types_come_from_the_autoscaler_monitors_config_file(monkeypatch, tmp_path, monitor, expected):
    config = tmp_path / "bootstrap.yaml"
    config.write_text(
        "max_workers: 3\nhead_node_type: head\navailable_node_types:\n"
        "  head: {resources: {CPU: 8, GPU: 0}}\n"
        "  gpu_worker: {resources: {CPU: 8, GPU: 1}, max_workers: 4}\n"
        "  cpu_worker: {resources: {CPU: 2}}\n"
    )  # no limit of its own: the cluster's
    monkeypatch.setattr(nodes.ray_state, "get_cluster_config", lambda: None)
    monkeypatch.setattr(nodes, "_local_monitor_command", lambda: [str(config) if w == "CONFIG" else w for w in monitor])
    assert nodes.autoscaler_node_types() == expected


@pytest.mark.parametrize(
    "alive, node_types, can_leave",
    [
        (1, None, False),  # one node that no autoscaler runs: `python jobs/sweep.py` on a machine
        (1, [], True),  # an autoscaler elsewhere (KubeRay's) may add nodes, then drain them
        (1, [({"CPU": 2}, 3)], True),
        (2, None, True),  # a node but the head may be drained (`ray drain-node`, a cloud's notice)
    ],
)
def test_nodes_can_leave_unless_one_node_runs_without_an_autoscaler(monkeypatch, alive, node_types, can_leave):
    dead = {"Alive": False, "Resources": {"CPU": 2}}  # a node gone before: it leaves no more
    monkeypatch.setattr(nodes.ray, "nodes", lambda: [{"Alive": True, "Resources": {"CPU": 2}}] * alive + [dead])
    monkeypatch.setattr(nodes, "autoscaler_node_types", lambda: node_types)
    assert nodes.nodes_can_leave() is can_leave


@pytest.mark.parametrize(
    "users, can_leave, during",
    [(None, False, "0"), (None, True, "1"), ("1", False, "1"), ("0", True, "0")],  # a value the user set is kept
)
def test_ray_train_watches_for_preemption_only_where_a_node_can_leave(monkeypatch, users, can_leave, during):
    """Ray Train reads the variable as a run starts (fit()); the job sets it for that run only."""
    monkeypatch.delenv(ray_train.PREEMPTION_WATCHER_ENV, raising=False)
    if users is not None:
        monkeypatch.setenv(ray_train.PREEMPTION_WATCHER_ENV, users)
    monkeypatch.setattr(ray_train, "nodes_can_leave", lambda: can_leave)
    with ray_train.preemption_watched_where_nodes_can_leave():
        assert os.environ[ray_train.PREEMPTION_WATCHER_ENV] == during
    assert os.environ.get(ray_train.PREEMPTION_WATCHER_ENV) == users

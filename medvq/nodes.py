"""The Ray cluster a job runs on: what it can hold, counting the nodes its autoscaler can add, and which of
this node's folders its other nodes can see. Needs Ray initialised."""

from __future__ import annotations

import logging
import math
import os
import shutil
import sys
import uuid
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

import ray
import yaml
from ray._private.ray_constants import DEBUG_AUTOSCALING_STATUS
from ray._private.state import state as ray_state
from ray.experimental.internal_kv import _internal_kv_get
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from medvq.config import Config
from medvq.data import ensure_file
from medvq.errors import UserError
from medvq.storage import is_uri

log = logging.getLogger(__name__)

NODE_CHECK_SECONDS = 120  # a worker process per node, and the job's working_dir unpacked there first
PROBE_PREFIX = ".medvq-visible-"


NodeType = tuple[dict[str, float], int]  # the resources of one node, and how many such nodes at most (-1: any)


@dataclass(frozen=True)
class Capacity:
    """The most the cluster can hold: the nodes up now, and the node types its autoscaler can add up to
    their limits (Ray Train checks a run against the same limits before it waits for the nodes).
    `known` is False when an autoscaler runs whose node types cannot be read from here: then anything fits."""

    node_shapes: tuple[dict[str, float], ...]  # the resources of each node up now and of each node type
    totals: dict[str, float]  # of the nodes up now, or of the whole cluster grown to the autoscaler's limits
    autoscaling: bool = False
    known: bool = True

    def holds(self, total: dict[str, float], each: dict[str, float]) -> bool:
        """Whether the cluster can hold `total`, made of pieces of `each` that must each fit on one node."""
        on_one_node = any(
            all(shape.get(kind, 0) + 1e-9 >= amount for kind, amount in each.items()) for shape in self.node_shapes
        )
        fits = on_one_node and all(self.totals.get(kind, 0) + 1e-9 >= amount for kind, amount in total.items())
        return fits or not self.known

    def runs_at_once(self, config: Config) -> int:
        """How many runs of `config` (Ray Train workers) fit at once; a clear error if not even one does."""
        worker = {"CPU": config.cpus_per_worker, "GPU": config.gpus_per_worker}
        run = {kind: config.workers * amount for kind, amount in worker.items()}
        if not self.holds(run, worker):
            raise UserError(
                f"one run needs {run['CPU']:g} CPUs and {run['GPU']:g} GPUs ({config.workers} workers of "
                f"{worker['CPU']:g} CPUs and {worker['GPU']:g} GPUs), but {self.describe()}"
            )
        if not self.known:
            return sys.maxsize
        return min(math.floor(self.totals.get(kind, 0) / amount + 1e-9) for kind, amount in run.items() if amount > 0)

    def describe(self) -> str:
        largest = {kind: max((shape.get(kind, 0) for shape in self.node_shapes), default=0) for kind in ("CPU", "GPU")}
        grows = "can grow to" if self.autoscaling else "has"
        return (
            f"the cluster {grows} {self.totals.get('CPU', 0):g} CPUs and {self.totals.get('GPU', 0):g} GPUs, "
            f"at most {largest['CPU']:g} CPUs and {largest['GPU']:g} GPUs on one node"
        )


def capacity() -> Capacity:
    """The cluster's capacity: with an autoscaler, what it can grow to; without, the nodes up now."""
    alive = tuple(dict(node["Resources"]) for node in ray.nodes() if node["Alive"])
    totals = dict(ray.cluster_resources())
    node_types = autoscaler_node_types()
    if node_types is None:
        return Capacity(alive, totals)
    if not node_types:
        log.warning(
            "an autoscaler runs, but its node types cannot be read from here: trials are not checked "
            "against them and wait for the nodes it adds (give --gpus-per-trial for GPU trials)"
        )
        return Capacity(alive, totals, autoscaling=True, known=False)
    for resources, most in node_types:
        for kind, amount in resources.items():
            totals[kind] = totals.get(kind, 0) + amount * (sys.maxsize if most < 0 else most)
    return Capacity(alive + tuple(resources for resources, most in node_types if most != 0), totals, autoscaling=True)


def nodes_can_leave() -> bool:
    """Whether Ray may drain one of the cluster's nodes, warning before it takes the node away (an autoscaler scaling
    down, a cloud's preemption notice): unless it is one node that no autoscaler runs. A single node that leaves ends
    the job whatever Ray Train's preemption watcher (a process per run) sees."""
    alive = sum(node["Alive"] for node in ray.nodes())
    return alive > 1 or autoscaler_node_types() is not None


def autoscaler_node_types() -> list[NodeType] | None:
    """The worker node types an autoscaler can add, with their limits: as it publishes them in Ray's GCS
    (where Ray Train reads them), else from the config file of the autoscaler monitor on this node (Ray's
    cluster launcher, `ray start --head --autoscaling-config`). [] when an autoscaler runs elsewhere, whose
    node types cannot be read from here (KubeRay's, in a container of its own); None without an autoscaler
    (a monitor without a config file only reports the nodes there are)."""
    published = ray_state.get_cluster_config()
    if published is not None and published.node_group_configs:
        return [
            (dict(group.resources), group.max_count)
            for group in published.node_group_configs
            if "node:__internal_head__" not in group.resources
        ]
    monitor = _local_monitor_command()
    if monitor is None:
        return [] if _internal_kv_get(DEBUG_AUTOSCALING_STATUS) else None
    if "--autoscaling-config" not in monitor:
        return None
    config = yaml.safe_load(Path(monitor[monitor.index("--autoscaling-config") + 1]).read_text())
    return [
        (dict(node_type.get("resources", {})), int(node_type.get("max_workers", config.get("max_workers", 0))))
        for name, node_type in config["available_node_types"].items()
        if name != config["head_node_type"]
    ]


def _local_monitor_command() -> list[str] | None:
    """The command line, split at spaces and "=", of this cluster's autoscaler monitor if it runs on this node."""
    gcs = ray.get_runtime_context().gcs_address
    for command_line in Path("/proc").glob("[0-9]*/cmdline"):
        with suppress(OSError):  # processes come and go while this reads
            words = command_line.read_bytes().decode(errors="replace").replace("\0", " ").replace("=", " ").split()
            if any(word.endswith("monitor.py") for word in words) and gcs in words:
                return words
    return None


def _unseen(probes: list[str], files: dict[str, int]) -> list[str]:
    """On one node: which of the probe files and of the files (with their sizes) this node cannot see."""
    missing = [path for path in probes if not os.path.exists(path)]
    return missing + [path for path, size in files.items() if not os.path.isfile(path) or os.path.getsize(path) != size]


def _other_nodes() -> list[dict]:
    here = ray.get_runtime_context().get_node_id()
    return [node for node in ray.nodes() if node["Alive"] and node["NodeID"] != here]


def check_nodes_see(config: Config, storage: str | None = None, storage_flag: str = "--storage") -> None:
    """Refuse, before any worker starts, a local data root or Ray storage folder that another node up now
    cannot see. Workers read the data root: each file must be on every node with the same size (a copy per
    node will do). Workers write to the storage: a probe file made here must show there. URIs are skipped
    (every node reaches them alike); a folder this made is removed again on refusal."""
    nodes = _other_nodes()
    files = (
        []
        if is_uri(config.data_root)
        else [ensure_file(name, config.data_root, config.size) for name in config.datasets]
    )
    folder = None if storage is None or is_uri(storage) else Path(storage)
    if not nodes or not (files or folder):
        return
    made, probe = _first_missing(folder) if folder else None, None
    try:
        if folder:
            probe = folder / f"{PROBE_PREFIX}{uuid.uuid4().hex}"
            try:
                folder.mkdir(parents=True, exist_ok=True)
                probe.write_text("medvq checks that every node sees this folder\n")
            except OSError as error:
                raise UserError(f"storage {storage} is not writable: {error}") from None
        for node, missing in _unseen_by_node(nodes, [str(probe)] if probe else [], files).items():
            if probe and str(probe) in missing:
                raise UserError(
                    f"{storage_flag} is a folder only this node has (node {node} cannot see it): "
                    f"use a folder every node mounts (a shared volume) or a URI such as s3://bucket/path"
                )
            raise UserError(
                f"--data-root {config.data_root} is not on every node (node {node} lacks {missing[0]}): "
                f"use a folder every node has (a shared volume) or a URI such as s3://bucket/medmnist"
            )
    except UserError:
        if made:
            shutil.rmtree(made, ignore_errors=True)
        raise
    finally:
        if probe:
            probe.unlink(missing_ok=True)
    log.info("checked that %d other node(s) see the data root%s", len(nodes), " and the storage" if folder else "")


def _unseen_by_node(nodes: list[dict], probes: list[str], files: list[Path]) -> dict[str, list[str]]:
    """One tiny task pinned to each node: {node address and id: what it cannot see} for the nodes that miss any."""
    sizes = {str(path): path.stat().st_size for path in files}
    check = ray.remote(num_cpus=0)(_unseen)
    refs = {
        f"{node['NodeManagerAddress']} ({node['NodeID'][:8]})": check.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)
        ).remote(probes, sizes)
        for node in nodes
    }
    missing = dict(zip(refs, ray.get(list(refs.values()), timeout=NODE_CHECK_SECONDS), strict=True))
    return {node: paths for node, paths in missing.items() if paths}


def _first_missing(folder: Path) -> Path | None:
    """The outermost folder of `folder`'s path that does not exist yet (None if it all exists)."""
    missing = None
    for path in [folder, *folder.parents]:
        if path.exists():
            return missing
        missing = path
    return missing

"""The torch process group of a Ray Train run (gloo on CPUs, NCCL on GPUs), set up by Ray's own functions as its
TorchConfig does, from a config that imports torch only on the workers. Ray's TorchConfig imports torch wherever a
run's config is unpickled: in a Tune trial's driver and in Ray Train's controller, a second of a core each on the
start path of every run (benchmarks/RESULTS.md). The workers import torch anyway, to train."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import ray
from ray._private.ray_constants import env_integer
from ray.exceptions import GetTimeoutError
from ray.train._internal.utils import get_address_and_port
from ray.train.backend import Backend, BackendConfig
from ray.train.constants import DEFAULT_TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S, TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S
from ray.train.v2._internal.util import TrainingFramework

log = logging.getLogger(__name__)


def on_worker(function: str, **kwargs):
    """Ray's own `ray.train.torch.config.<function>`, called on a Train worker."""
    from ray.train.torch import config  # torch: on the workers alone (see the module's docstring)

    return getattr(config, function)(**kwargs)


@contextmanager
def workers_device() -> Iterator[None]:
    """Ray's context of the training function: on a GPU worker, its own GPU made the current device."""
    from ray.train.torch.config import TorchConfigContextManager

    with TorchConfigContextManager():
        yield


def set_master(address: str, port: int) -> None:
    """On every worker: where the process group meets (rank 0's node, a free port there)."""
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = address, str(port)


@dataclass
class TorchProcessGroup(BackendConfig):
    """Ray's `TorchConfig(backend=...)`, its defaults kept: the group met through environment variables."""

    backend: str  # "gloo" or "nccl"
    timeout_s: int = 1800

    @property
    def backend_cls(self) -> type[Backend]:
        return ProcessGroupBackend

    @property
    def train_func_context(self):
        return workers_device

    @property
    def framework(self) -> TrainingFramework:
        return TrainingFramework.TORCH

    def to_dict(self) -> dict:
        return {"backend": self.backend, "init_method": "env", "timeout_s": self.timeout_s}


class ProcessGroupBackend(Backend):
    """What Ray's `_TorchBackend` does for CPU and GPU workers, run from the controller: one process group over the
    run's workers, on rank 0's address; torn down with the workers."""

    share_cuda_visible_devices = True

    def on_start(self, workers, config: TorchProcessGroup) -> None:
        address, port = workers.execute_single(0, get_address_and_port)
        workers.execute(set_master, address=address, port=port)
        workers.execute(on_worker, "_set_torch_distributed_env_vars")
        joined = [
            workers.execute_single_async(
                rank,
                on_worker,
                "_setup_torch_process_group",
                backend=config.backend,
                world_rank=rank,
                world_size=len(workers),
                init_method="env://",
                timeout_s=config.timeout_s,
            )
            for rank in range(len(workers))
        ]
        ray.get(joined)

    def on_shutdown(self, workers, config: TorchProcessGroup) -> None:
        done = workers.execute_async(on_worker, "_shutdown_torch", destroy_process_group=len(workers) > 1)
        timeout = env_integer(TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S, DEFAULT_TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S)
        try:
            ray.get(done, timeout=timeout)
        except GetTimeoutError:
            log.warning("the torch process group did not shut down in %d s", timeout)

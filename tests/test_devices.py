"""medvq/devices.py: which device and precision a run gets, on Apple silicon too.

There is no Mac here: "Apple silicon" below is this machine with PyTorch's and Lightning's checks for it patched
to say yes (torch.backends.mps.is_available, platform.processor) and no CUDA GPU. So these tests show what the
resolver decides and that Lightning accepts it when it builds a Trainer, not that a model trains on an Apple GPU.
"""

from __future__ import annotations

import platform

import pytest
import torch
from lightning.fabric.accelerators.mps import MPSAccelerator as FabricMPS
from lightning.pytorch.accelerators import CPUAccelerator, MPSAccelerator
from ray.train.lightning import RayDDPStrategy

from jobs.sweep import with_gpus
from medvq.config import SweepConfig
from medvq.devices import (
    has_mps,
    local_device_line,
    resolve_accelerator,
    resolve_precision,
    uses_gpu,
    workers_device,
)
from medvq.errors import UserError
from medvq.train import build_trainer


@pytest.fixture
def apple_silicon(monkeypatch):
    """This process as on a Mac with Apple silicon: MPS reported, an arm processor, no CUDA device."""
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    monkeypatch.setattr(platform, "processor", lambda: "arm")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.delenv("DISABLE_MPS", raising=False)
    FabricMPS.is_available.cache_clear()  # Lightning caches its answer for the process
    yield
    FabricMPS.is_available.cache_clear()


def test_this_machine_is_no_mac():
    assert not has_mps()  # else the tests below would not be patching anything
    assert resolve_accelerator("auto") in ("gpu", "cpu")
    assert workers_device(0.0) == "the CPU"


@pytest.mark.parametrize("reported", [True, False])
@pytest.mark.parametrize("processor", ["arm", "i386"])
@pytest.mark.parametrize("disabled", ["1", "0"])
def test_has_mps_says_what_lightning_says(monkeypatch, reported, processor, disabled):
    """has_mps repeats Lightning's test so that the job's driver need not import Lightning: they agree."""
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: reported)
    monkeypatch.setattr(platform, "processor", lambda: processor)
    monkeypatch.setenv("DISABLE_MPS", disabled)
    FabricMPS.is_available.cache_clear()
    try:
        assert has_mps() == MPSAccelerator.is_available()
    finally:
        FabricMPS.is_available.cache_clear()


@pytest.mark.usefixtures("apple_silicon")
@pytest.mark.parametrize(("asked", "device"), [("auto", "mps"), ("gpu", "mps"), ("cpu", "cpu")])
def test_a_run_in_this_process_takes_apples_gpu_unless_told_cpu(asked, device):
    assert has_mps()
    assert resolve_accelerator(asked) == device


@pytest.mark.usefixtures("apple_silicon")
@pytest.mark.parametrize(("precision", "expected"), [("auto", "32-true"), ("32", "32-true"), ("bf16", "bf16-mixed")])
def test_apples_gpu_trains_in_float32_unless_bf16_is_asked_for(monkeypatch, precision, expected):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)  # a CPU's AMX says nothing of the GPU
    assert resolve_precision(precision, "mps") == expected


@pytest.mark.usefixtures("apple_silicon")
def test_the_run_says_first_that_it_trains_on_apples_gpu():
    assert local_device_line("auto", "auto") == "training here on Apple's GPU (MPS) in float32"
    assert local_device_line("cpu", "32") == "training here on the CPU in float32"


@pytest.mark.usefixtures("apple_silicon")
def test_lightning_builds_an_mps_trainer_for_a_local_run(tiny_config):
    trainer = build_trainer(tiny_config(accelerator="auto", precision="auto"), progress_bar=False)
    assert isinstance(trainer.accelerator, MPSAccelerator)
    assert trainer.precision == "32-true"


@pytest.mark.usefixtures("apple_silicon")
def test_a_ray_worker_on_a_mac_trains_on_its_cpu(tiny_config):
    """ray_train.run_on_ray tells a CPU worker "cpu"; Lightning refuses DDP on MPS, and Ray has no MPS resource."""
    trainer = build_trainer(tiny_config(accelerator="cpu"), strategy=RayDDPStrategy(), progress_bar=False)
    assert isinstance(trainer.accelerator, CPUAccelerator)
    assert "Ray has no resource for Apple's GPU (MPS)" in workers_device(0.0)
    assert workers_device(0.25) == "0.25 GPU each"


@pytest.mark.usefixtures("apple_silicon")
def test_a_ray_run_that_insists_on_a_gpu_on_a_mac_is_told_why_not():
    """jobs/sweep.py and jobs/train.py --workers count the cluster's GPUs through uses_gpu: a Mac has none for Ray."""
    with pytest.raises(UserError, match=r"the cluster has no GPUs; Ray has no resource for Apple's GPU \(MPS\)"):
        uses_gpu("gpu", 0, "the cluster has no GPUs")
    assert not uses_gpu("auto", 0, "the cluster has no GPUs")


@pytest.mark.parametrize(
    ("workers", "size", "cluster_gpus", "asked", "per_worker"),
    [
        (1, 28, 8, None, 0.25),  # small images: four trials share a GPU
        (1, 64, 1, None, 0.25),
        (1, 128, 8, None, 1.0),  # larger ones fill a GPU
        (2, 28, 8, None, 1.0),  # DDP: NCCL needs a whole GPU per rank
        (1, 28, 8, 1.0, 1.0),  # what the user asks for stands
        (1, 28, 0, None, 0.0),  # no GPUs: CPU trials
    ],
)
def test_trials_of_small_images_share_a_gpu_by_default(tiny_config, workers, size, cluster_gpus, asked, per_worker):
    sweep = SweepConfig(tiny_config(workers=workers, size=size, accelerator="auto"))
    assert with_gpus(sweep, asked, cluster_gpus).base.gpus_per_worker == per_worker

"""CPU or GPU, and in what precision: decided here, by one rule each, for a local run, a Ray Train run and a sweep's
trials. Ray schedules CUDA GPUs only, so Apple's GPU (MPS) serves a run in this process alone; a Ray run's
workers on a Mac train on its CPU."""

from __future__ import annotations

import os
import platform

import torch

from medvq.errors import UserError

PRECISION_WORDS = {"32-true": "float32", "bf16-mixed": "bf16 mixed precision"}  # Lightning's names, said in words
NOT_FOR_RAY = "Ray has no resource for Apple's GPU (MPS): jobs/train.py without --workers trains on it"


def uses_gpu(accelerator: str, gpus: float, if_none: str) -> bool:
    """Whether a run asking for `accelerator` ("auto", "cpu", "gpu") trains on GPUs when `gpus` are there: "auto"
    takes them when there are any; "gpu" without any is refused in one line, saying `if_none`."""
    if accelerator == "gpu" and gpus == 0:
        raise UserError(f"--accelerator gpu was asked for, but {if_none}" + (f"; {NOT_FOR_RAY}" if has_mps() else ""))
    return accelerator != "cpu" and gpus > 0


def resolve_accelerator(accelerator: str) -> str:
    """This process's device, as Lightning names it: "gpu" (CUDA), "mps" (Apple's GPU) or "cpu". "auto" and "gpu"
    take a CUDA GPU, else Apple's. A Ray Train worker is told "gpu" or "cpu" by its job (ray_train.run_on_ray), so it
    never gets "mps"."""
    cuda = torch.cuda.device_count()
    if accelerator != "cpu" and not cuda and has_mps():
        return "mps"
    return "gpu" if uses_gpu(accelerator, cuda, "no CUDA GPU is visible here, nor Apple's (MPS)") else "cpu"


def resolve_precision(precision: str, accelerator: str) -> str:
    """The Lightning precision of a run asking for `precision` ("auto", "32", "bf16") on `accelerator` ("gpu",
    "mps" or "cpu"): "auto" takes bf16 where matrix units make it pay, a CUDA GPU or a CPU with AMX
    (benchmarks/RESULTS.md)."""
    # Apple's GPU: float32 for "auto", since its bf16 autocast needs macOS 14 and nobody has timed it for medvq.
    matrix_units = accelerator == "gpu" or (accelerator == "cpu" and has_amx())
    bf16 = precision == "bf16" or (precision == "auto" and matrix_units)
    return "bf16-mixed" if bf16 else "32-true"


def has_mps() -> bool:
    """Whether Apple's GPU can train here: PyTorch reports MPS (torch.backends.mps) and Lightning accepts it (Apple
    silicon, DISABLE_MPS unset), so a run never asks Lightning for a device it refuses. Lightning's own test
    (MPSAccelerator.is_available), without importing Lightning: the job's driver would pay seconds for it."""
    disabled = os.getenv("DISABLE_MPS", "0") == "1"
    return not disabled and torch.backends.mps.is_available() and platform.processor() in ("arm", "arm64")


def has_amx() -> bool:
    """Whether this CPU has AMX tiles (Intel Sapphire Rapids and later). torch's check is private: a torch without it
    counts as no AMX, and so trains in float32."""
    return getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()


def device_words(accelerator: str) -> str:
    """A resolved accelerator in words: the CUDA GPU's own name, "Apple's GPU (MPS)" or "the CPU"."""
    if accelerator == "gpu":
        return torch.cuda.get_device_name(0)
    return {"mps": "Apple's GPU (MPS)", "cpu": "the CPU"}[accelerator]


def local_device_line(accelerator: str, precision: str) -> str:
    """What a run in this process says first: 'training here on Apple's GPU (MPS) in float32', for the flags given."""
    device = resolve_accelerator(accelerator)
    return f"training here on {device_words(device)} in {PRECISION_WORDS[resolve_precision(precision, device)]}"


def workers_device(gpus_per_worker: float) -> str:
    """Where a Ray run's workers train, for its first line: '1 GPU each', or the CPU (on a Mac, saying why)."""
    if gpus_per_worker:
        return f"{gpus_per_worker:g} GPU each"
    return "the CPU" + (f" ({NOT_FOR_RAY})" if has_mps() else "")


# A one-worker trial's default share of a GPU at MedMNIST's small sides (28 and 64 px): a 28 px step is launch-bound
# and 28 px runs shared one H200 well (docs/behaviour.md, "On a GPU"). Larger images, and DDP trials (NCCL needs
# whole GPUs), take whole ones.
SHARED_GPU, SHARED_UP_TO_SIZE = 0.25, 64


def default_gpus_per_trial(workers: int, size: int) -> float:
    """GPUs a trial of `workers` DDP workers on `size` px images holds when the user does not say."""
    return SHARED_GPU if workers == 1 and size <= SHARED_UP_TO_SIZE else float(workers)

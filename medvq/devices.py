"""CPU or GPU: decided here, by one rule, for a local run, a Ray Train run and a sweep's trials."""

from __future__ import annotations

import torch

from medvq.errors import UserError


def uses_gpu(accelerator: str, gpus: float, if_none: str) -> bool:
    """Whether a run asking for `accelerator` ("auto", "cpu", "gpu") trains on GPUs when `gpus` are there: "auto"
    takes them when there are any; "gpu" without any is refused in one line, saying `if_none`."""
    if accelerator == "gpu" and gpus == 0:
        raise UserError(f"--accelerator gpu was asked for, but {if_none}")
    return accelerator != "cpu" and gpus > 0


def resolve_accelerator(accelerator: str) -> str:
    """This process's device, as Lightning names it: "gpu" or "cpu"."""
    return "gpu" if uses_gpu(accelerator, torch.cuda.device_count(), "no CUDA GPU is visible here") else "cpu"

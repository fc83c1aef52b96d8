"""CPU or GPU, and in what precision: decided here, by one rule each, for a local run, a Ray Train run and a sweep's
trials."""

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


def resolve_precision(precision: str, accelerator: str) -> str:
    """The Lightning precision of a run asking for `precision` ("auto", "32", "bf16") on `accelerator` ("gpu" or
    "cpu"): "auto" takes bf16 where matrix units make it pay, a GPU or a CPU with AMX (benchmarks/RESULTS.md)."""
    bf16 = precision == "bf16" or (precision == "auto" and (accelerator == "gpu" or has_amx()))
    return "bf16-mixed" if bf16 else "32-true"


def has_amx() -> bool:
    """Whether this CPU has AMX tiles (Intel Sapphire Rapids and later). torch's check is private: a torch without it
    counts as no AMX, and so trains in float32."""
    return getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()

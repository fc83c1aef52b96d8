"""Reading a checkpoint safely (plain tensors and data only, through torch's weights-only unpickler), and the model
it holds without Lightning: the encoder's actors and the job's driver (its figures) need only the model, and Lightning
takes seconds to import. The names of a run's files: medvq.run_files."""

from __future__ import annotations

import io
import pickle
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from medvq.config import Config
from medvq.errors import UserError
from medvq.model import VQVAE
from medvq.storage import read_bytes

MODEL_PREFIX = "model."  # the VQVAE's weights in a checkpoint of medvq.module.VQVAEModule
TRAINED_PRECISION = "trained_precision"  # checkpoint key: the Lightning precision the weights were trained in


@contextmanager
def refused_if_unsafe(source: str | Path):
    """A file torch's weights-only loader refuses (it holds objects, not only tensors and plain data) or cannot
    read (not a checkpoint, cut short) becomes one line naming it and why."""
    try:
        yield
    except pickle.UnpicklingError as error:
        cause = error.__context__ or error  # torch's own message leads with advice to load it unsafely
        reason = str(cause).strip().splitlines()[0].split(". Please use")[0]
        raise UserError(
            f"{source} is not a checkpoint of plain tensors and data, which is all medvq loads ({reason})"
        ) from None
    except RuntimeError as error:  # torch's zip reader: not a checkpoint file at all, or a truncated one
        raise UserError(f"{source} is not a readable checkpoint ({str(error).split('. ')[0]})") from None


def read_checkpoint(checkpoint: str | Path | bytes) -> dict:
    """A Lightning checkpoint (a path, a URI or its bytes) as plain data, through torch's safe unpickler."""
    source = "the checkpoint" if isinstance(checkpoint, bytes) else checkpoint
    data = checkpoint if isinstance(checkpoint, bytes) else read_bytes(checkpoint)
    with refused_if_unsafe(source):
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def checkpoint_config(checkpoint: str | Path | bytes) -> Config:
    """The Config a checkpoint of `VQVAEModule` was trained with (its saved hyperparameters)."""
    return _saved_config(read_checkpoint(checkpoint))


def _saved_config(saved: dict) -> Config:
    return Config.from_dict(saved["hyper_parameters"]["config"])


@dataclass(frozen=True)
class Trained:
    """A checkpoint's model, on the CPU in eval mode, channels-last as it trained, with the settings it was trained
    with and the Lightning precision of each stretch of its training (None in a checkpoint from before it was kept)."""

    model: VQVAE
    config: Config
    precision: str | None


def trained(checkpoint: str | Path | bytes) -> Trained:
    """What a checkpoint of `VQVAEModule` (a path, a URI or its bytes) holds, without Lightning."""
    saved = read_checkpoint(checkpoint)
    config = _saved_config(saved)
    model = VQVAE(config).to(memory_format=torch.channels_last)
    weights = {k.removeprefix(MODEL_PREFIX): v for k, v in saved["state_dict"].items() if k.startswith(MODEL_PREFIX)}
    model.load_state_dict(weights)
    return Trained(model.eval(), config, saved.get(TRAINED_PRECISION))

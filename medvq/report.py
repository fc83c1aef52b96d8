"""After training, for any checkpoint: latents (Ray Data) -> UMAP -> the per-dataset measures.

The latents are written to a staging folder and moved into place only once complete, so a failed
or interrupted run never leaves a half-written `latents/` behind, and a re-run replaces the old one
without a moment in which neither is whole.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pandas as pd

from medvq.config import Config
from medvq.encode import encode_to_parquet
from medvq.latent_space import add_umap_, dataset_records
from medvq.module import checkpoint_config

LATENTS_DIR = "latents"


def replace_folder(new: Path, target: Path) -> None:
    """Move the complete folder `new` to `target`. The old `target` is moved aside first and deleted only once
    the new one is in place: whenever this stops, one of the two is whole (as `target`, or `target`.old)."""
    old = target.with_name(f"{target.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        target.rename(old)
    new.rename(target)
    shutil.rmtree(old, ignore_errors=True)


def describe_checkpoint(checkpoint: str, config: Config, out: Path, *, actors: int | None = None,
                        gpus_per_actor: float | None = None) -> tuple[list[dict], dict[str, float]]:
    """Encode every image of `config.datasets` to OUT/latents/ and project it; returns the per-dataset
    records (see `dataset_records`) and the seconds each step took. Needs Ray initialised."""
    staging, latents = out / f"{LATENTS_DIR}.partial", out / LATENTS_DIR
    seconds, started = {}, time.monotonic()
    rows = encode_to_parquet(checkpoint, config, staging, actors=actors, gpus_per_actor=gpus_per_actor)
    seconds["encode"] = time.monotonic() - started
    seconds["umap"] = add_umap_(staging, seed=config.seed)
    replace_folder(staging, latents)
    started = time.monotonic()
    records = dataset_records(pd.read_parquet(latents), config.datasets, config.data_root, config.size,
                              checkpoint_config(checkpoint).codebook_size)
    seconds["probes"] = time.monotonic() - started
    print(f"encoded {rows} images to {latents} in {seconds['encode']:.1f} s; UMAP {seconds['umap']:.1f} s; "
          f"probes {seconds['probes']:.1f} s", flush=True)
    return records, seconds

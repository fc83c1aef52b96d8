"""Encoding every image (all datasets, all splits) to Parquet: medvq's Ray Data pipeline (`encode_to_parquet`)
against a plain torch loop over the same read step (`read_split`) and encoder (`ImageEncoder`), writing the
same columns to one Parquet file."""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
from common import Row, SteadyClock, ray_session, timed

from medvq.config import Config
from medvq.data import SPLITS
from medvq.devices import resolve_accelerator
from medvq.encode import PIXELS_PER_BATCH, ImageEncoder, encode_to_parquet, encoder_pool, read_split


def _split(config: Config, name: str, split: str) -> dict[str, np.ndarray]:
    return read_split({"dataset": np.array([name]), "split": np.array([split])}, config.data_root, config.size)


def plain_loop(checkpoint: Path, config: Config, path: Path, gpu: bool) -> dict:
    """Read, encode and write in one process. Steady state: the encoder's batches after the first."""
    started = time.perf_counter()
    encoder = ImageEncoder(checkpoint.read_bytes(), use_gpu=gpu)
    batch_size = max(1, PIXELS_PER_BATCH // config.size**2)  # the Ray pipeline's batch size
    clock, tables = SteadyClock(warmup=1, device=encoder.device), []
    for name in config.datasets:
        for split in SPLITS:
            columns = _split(config, name, split)
            for start in range(0, len(columns["index"]), batch_size):
                clock.resume()  # time the encoder only, not the reads between batches
                tables.append(encoder({key: column[start : start + batch_size] for key, column in columns.items()}))
                clock.tick(len(tables[-1]))
    pq.write_table(pa.concat_tables(tables), path)
    return {
        "images": sum(len(table) for table in tables),
        "end_to_end_seconds": time.perf_counter() - started,
        "steady_images_per_second": clock.images_per_second,
    }


def actor_start_up(checkpoint: Path, config: Config, gpus_per_actor: float | None) -> None:
    """What every Ray Data run pays before its first batch: start the encoder's actor pool, load the checkpoint
    in every actor, and push one image through."""
    actors, gpus, cpu_threads = encoder_pool(None, gpus_per_actor)
    first = _split(config, config.datasets[0], "val")
    one = ray.data.from_items([{key: column[0] for key, column in first.items()}])
    one.map_batches(
        ImageEncoder,
        fn_constructor_kwargs={
            "checkpoint": ray.put(checkpoint.read_bytes()),
            "use_gpu": gpus > 0,
            "cpu_threads": cpu_threads,
        },
        batch_size=1,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=1,
        num_gpus=gpus,
    ).materialize()


def ray_data(checkpoint: Path, config: Config, latents: Path, work: Path, gpu: bool) -> dict:
    """Cold (ray.init, then the first run), warm (Ray running), and steady (warm minus the actor start-up)."""
    gpus_per_actor = None if gpu else 0.0  # None: encoder_pool's default, one GPU per actor
    with ray_session() as init_seconds:
        cold, images = timed(encode_to_parquet, str(checkpoint), config, latents, gpus_per_actor=gpus_per_actor)
        warm, _ = timed(
            encode_to_parquet, str(checkpoint), config, work / "latents_warm", gpus_per_actor=gpus_per_actor
        )
        start_up, _ = timed(actor_start_up, checkpoint, config, gpus_per_actor)
    return {
        "images": images,
        "ray_init_seconds": init_seconds,
        "end_to_end_seconds": init_seconds + cold,
        "warm_seconds": warm,
        "actor_start_up_seconds": start_up,
        # Noise can make the start-up look as long as the whole run on a small data set: then there is no figure.
        "steady_images_per_second": images / (warm - start_up) if warm > start_up else float("nan"),
    }


def measure(checkpoint: Path, config: Config, latents: Path, work: Path) -> dict:
    """Leaves the Ray Data run's Parquet folder at `latents` for the UMAP and plots."""
    gpu = resolve_accelerator(config.accelerator) == "gpu"
    print("encoding: plain torch loop", flush=True)
    plain = plain_loop(checkpoint, config, work / "plain.parquet", gpu)
    print("encoding: Ray Data", flush=True)
    return {"plain_loop": plain, "ray_data": ray_data(checkpoint, config, latents, work, gpu)}


def rows(results: dict) -> list[Row]:
    plain, ray_run = results["plain_loop"], results["ray_data"]
    step = f"encoding {plain['images']:,} images to Parquet"
    versus_plain = lambda seconds: f"{seconds / plain['end_to_end_seconds']:.2f}x the plain loop's time (goal <= 2x)"
    return [
        (
            step,
            "plain torch loop, one process, one file",
            f"{plain['end_to_end_seconds']:.1f} s end to end; {plain['steady_images_per_second']:,.0f} images/s steady",
            "1.00x (baseline)",
        ),
        (
            step,
            "Ray Data, end to end with ray.init",
            f"{ray_run['end_to_end_seconds']:.1f} s (ray.init {ray_run['ray_init_seconds']:.1f} s)",
            versus_plain(ray_run["end_to_end_seconds"]),
        ),
        (
            step,
            "Ray Data, Ray already running",
            f"{ray_run['warm_seconds']:.1f} s",
            versus_plain(ray_run["warm_seconds"]),
        ),
        (
            step,
            f"Ray Data, steady (minus {ray_run['actor_start_up_seconds']:.1f} s actor start-up)",
            *_steady(plain, ray_run),
        ),
    ]


def _steady(plain: dict, ray_run: dict) -> tuple[str, str]:
    speed = ray_run["steady_images_per_second"]
    if math.isnan(speed):
        return "not measurable", "the warm run took no longer than the actor start-up"
    return f"{speed:,.0f} images/s", f"{plain['steady_images_per_second'] / speed:.2f}x the plain loop's time per image"

"""How fast medvq encodes every image to Parquet, against a plain torch loop; and its UMAP and plots.

Every image (all datasets, all splits) with medvq's Ray Data pipeline (`encode_latents`), against a plain torch
loop over the same read step (`read_split`) and encoder (`ImageEncoder`) writing the same columns to one file;
then the UMAP and the neighbours (`layout`) and the figures (`draw_run`) of the result.
The model encoded is medvq as shipped, trained as in train_speed.py (60 s, or --seconds).

    python benchmarks/encode_speed.py --data-root DATA --datasets bloodmnist,pneumoniamnist,retinamnist,breastmnist
"""

from __future__ import annotations

import argparse
import importlib
import math
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
from common import Row, SteadyClock, benchmark_parser, ray_session, run_benchmark, timed, torch_device
from train_speed import add_budget_flag, budget, lightning_run

from medvq.cli import run_job
from medvq.config import Config
from medvq.data import SPLITS
from medvq.encode import PIXELS_PER_BATCH, ImageEncoder, encode_latents, encoder_pool, read_split
from medvq.latent_space import layout, neighbour_search, vectors, with_layout
from medvq.plots import draw_run
from medvq.projection import umap_projection
from medvq.report import write_latents
from medvq.run_files import CHECKPOINT_NAME


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


def encode_to_parquet(checkpoint: Path, config: Config, out: Path, gpus_per_actor: float | None) -> pa.Table:
    """What jobs/encode.py does but the UMAP and the probes: Ray Data's rows, written to OUT/latents/."""
    table = encode_latents(str(checkpoint), config, gpus_per_actor=gpus_per_actor)
    write_latents(table, out)
    return table


def ray_data(checkpoint: Path, config: Config, work: Path, gpu: bool) -> tuple[dict, pa.Table]:
    """Cold (ray.init, then the first run), warm (Ray running), and steady (warm minus the actor start-up);
    and the cold run's rows, for the UMAP."""
    gpus_per_actor = None if gpu else 0.0  # None: encoder_pool's default, one GPU per actor
    with ray_session() as init_seconds:
        cold, table = timed(encode_to_parquet, checkpoint, config, work / "cold", gpus_per_actor)
        warm, _ = timed(encode_to_parquet, checkpoint, config, work / "warm", gpus_per_actor)
        start_up, _ = timed(actor_start_up, checkpoint, config, gpus_per_actor)
    result = {
        "images": table.num_rows,
        "ray_init_seconds": init_seconds,
        "end_to_end_seconds": init_seconds + cold,
        "warm_seconds": warm,
        "actor_start_up_seconds": start_up,
        # Noise can make the start-up look as long as the whole run on a small data set: then there is no figure.
        "steady_images_per_second": table.num_rows / (warm - start_up) if warm > start_up else float("nan"),
    }
    return result, table


def umap_and_plots(table: pa.Table, run: Path, config: Config) -> dict:
    """The UMAP of the encoded rows, timed with importing umap (numba compiles then), and the run's figures."""
    print("UMAP and plots", flush=True)
    import_seconds, _ = timed(importlib.import_module, "umap")
    features = vectors(table.column("features"))
    search_seconds, (others, distances) = timed(neighbour_search, features)
    fit_seconds, projection = timed(umap_projection, features, others, distances, config.seed)
    table = with_layout(table, layout(projection, others, distances))
    write_latents(table, run)  # the latents draw_run plots, beside the trained model's checkpoint and metrics
    plots_seconds, written = timed(draw_run, run, config.data_root)
    return {
        "umap_seconds": import_seconds + search_seconds + fit_seconds,
        "neighbour_search_seconds": search_seconds,
        "umap_fit_seconds": fit_seconds,
        "plots_seconds": plots_seconds,
        "figures": [Path(path).name for path in written],
    }


def measure(config: Config, args: argparse.Namespace, work: Path) -> dict:
    seconds, warmup = budget(args.smoke, args.seconds)
    print(f"encoding: training the model to encode for {seconds:g} s", flush=True)
    lightning_run(config, seconds, warmup, torch_device(config), work / "run")
    checkpoint, gpu = work / "run" / CHECKPOINT_NAME, torch_device(config).type == "cuda"
    print("encoding: plain torch loop", flush=True)
    plain = plain_loop(checkpoint, config, work / "plain.parquet", gpu)
    print("encoding: Ray Data", flush=True)
    ray_run, table = ray_data(checkpoint, config, work, gpu)
    return {"plain_loop": plain, "ray_data": ray_run, "projection": umap_and_plots(table, work / "run", config)}


def rows(results: dict) -> list[Row]:
    plain, ray_run, projection = results["plain_loop"], results["ray_data"], results["projection"]
    encoding = lambda *cells: (f"encoding {plain['images']:,} images to Parquet", *cells)
    plots = lambda *cells: (f"UMAP and plots of {plain['images']:,} images", *cells)
    versus_plain = lambda seconds: f"{seconds / plain['end_to_end_seconds']:.2f}x the plain loop's time (goal <= 2x)"
    return [
        encoding(
            "plain torch loop, one process, one file",
            f"{plain['end_to_end_seconds']:.1f} s end to end; {plain['steady_images_per_second']:,.0f} images/s steady",
            "1.00x (baseline)",
        ),
        encoding(
            "Ray Data, end to end with ray.init",
            f"{ray_run['end_to_end_seconds']:.1f} s (ray.init {ray_run['ray_init_seconds']:.1f} s)",
            versus_plain(ray_run["end_to_end_seconds"]),
        ),
        encoding(
            "Ray Data, Ray already running", f"{ray_run['warm_seconds']:.1f} s", versus_plain(ray_run["warm_seconds"])
        ),
        encoding(
            f"Ray Data, steady (minus {ray_run['actor_start_up_seconds']:.1f} s actor start-up)",
            *_steady(plain, ray_run),
        ),
        plots(
            "UMAP and neighbours (layout)",
            f"{projection['umap_seconds']:.1f} s",
            f"neighbour search {projection['neighbour_search_seconds']:.1f} s, "
            f"fit {projection['umap_fit_seconds']:.1f} s; the rest imports umap (numba)",
        ),
        plots(f"{len(projection['figures'])} figures (draw_run)", f"{projection['plots_seconds']:.1f} s", ""),
    ]


def _steady(plain: dict, ray_run: dict) -> tuple[str, str]:
    speed = ray_run["steady_images_per_second"]
    if math.isnan(speed):
        return "not measurable", "the warm run took no longer than the actor start-up"
    return f"{speed:,.0f} images/s", f"{plain['steady_images_per_second'] / speed:.2f}x the plain loop's time per image"


def main() -> None:
    parser = benchmark_parser(__doc__, "encode-speed.json")
    add_budget_flag(parser)  # of training the model to encode
    run_benchmark(parser, measure, rows)


if __name__ == "__main__":
    run_job(main)

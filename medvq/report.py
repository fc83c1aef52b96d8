"""After training, for any checkpoint: latents (Ray Data) -> UMAP -> one Parquet file -> the per-dataset measures.

The latents are written once, to a staging folder moved into place only once complete, so a failed
or interrupted run never leaves a half-written `latents/` behind, and a re-run replaces the old one
without a moment in which neither is whole.
"""

from __future__ import annotations

import importlib
import shutil
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray

from medvq.config import Config
from medvq.encode import RECONSTRUCTION, encoded_batches, encoder_pool
from medvq.latent_space import dataset_records, layout, neighbour_search, vectors, with_layout
from medvq.probes import threads_left_for
from medvq.projection import Projector

LATENTS_DIR, PARQUET_FILE = "latents", "latents.parquet"
# The explorer's thumbnails of the reconstructions: "_" keeps the file out of pandas.read_parquet("latents").
RECONSTRUCTIONS_FILE = "_reconstructions.parquet"
ROW_KEY = ["dataset", "split", "index"]  # what names an image


def replace_folder(new: Path, target: Path) -> None:
    """Move the complete folder `new` to `target`. The old `target` is moved aside first and deleted only once
    the new one is in place: whenever this stops, one of the two is whole (as `target`, or `target`.old)."""
    old = target.with_name(f"{target.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        target.rename(old)
    new.rename(target)
    shutil.rmtree(old, ignore_errors=True)


def write_latents(table: pa.Table, out: Path) -> Path:
    """OUT/latents/latents.parquet, and the reconstructions' thumbnails beside it, written once, whole: staged
    beside, then moved into place."""
    staging, latents = out / f"{LATENTS_DIR}.partial", out / LATENTS_DIR
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    pq.write_table(table.drop_columns([RECONSTRUCTION]), staging / PARQUET_FILE)
    pq.write_table(table.select([*ROW_KEY, RECONSTRUCTION]), staging / RECONSTRUCTIONS_FILE, compression="zstd")
    replace_folder(staging, latents)
    return latents


def start_projector() -> ray.actor.ActorHandle:
    """The UMAP's process. One CPU: UMAP is seeded, so single-threaded. Restarted, and its call retried, if its
    process or node dies, as a Ray task would be."""
    return ray.remote(num_cpus=1, max_restarts=3, max_task_retries=3)(Projector).remote()


def encoded_while_the_umap_starts(
    checkpoint: str, config: Config, pool: tuple[int, float, int], free_cpus: float
) -> tuple[pa.Table, ray.actor.ActorHandle]:
    """Every image encoded (`encoded_batches` on `pool`), and the UMAP's process, started beside the encoding so that
    its imports are done by the time the neighbours are. On a CPU it starts before the encoding when the encoder's
    actors leave one of the `free_cpus` free (its imports then fill the core their own leave idle); else as the
    first batch comes back, when those actors, which read the images too, hold their CPUs: it cannot take one they
    wait for. With GPUs the reads are tasks of their own, which it could starve of a CPU: it starts once the
    encoding is done."""
    batches = encoded_batches(checkpoint, config, pool)
    # torch.optim imports torch._dynamo as the probes build their first optimizer (0.9 s): here, while this waits
    threading.Thread(target=importlib.import_module, args=("torch._dynamo",), daemon=True).start()
    actors, gpus_per_actor, _ = pool
    parts = []
    if gpus_per_actor > 0:
        parts.extend(batches)
    elif free_cpus < actors + 1:
        parts.append(next(batches))
    projector = start_projector()
    parts.extend(batches)  # what is left: a CPU's batches, all or but the first; none of a GPU's
    return pa.concat_tables(parts), projector


def first_caller_runs(work: Callable[[], object]) -> Callable[[], None]:
    """`work` as a call that only its first caller carries out, whichever thread that is: the later ones return."""
    claimed = threading.Lock()

    def run() -> None:
        if claimed.acquire(blocking=False):  # never released: taken once
            work()

    return run


def encode_and_measure(
    checkpoint: str,
    config: Config,
    out: Path,
    *,
    actors: int | None = None,
    gpus_per_actor: float | None = None,
    meanwhile: Callable[[], object] = lambda: None,
    with_the_latents: Callable[[], object] = lambda: None,
) -> tuple[list[dict], dict[str, float]]:
    """Encode every image of `config.datasets` (Ray Data), project the latents (UMAP), write them to OUT/latents/ and
    measure them per dataset. `config` is the one the checkpoint was trained with (its data root may differ).
    Returns the per-dataset records (see `dataset_records`) and the seconds each step took.

    After the neighbour search (on every core), two lanes of one core each: the probes here, and the UMAP's actor,
    whose layout a thread then writes before it runs `with_the_latents` (work that needs them: their figures).
    `meanwhile` (work that needs neither: the figures of training) goes to whichever lane is free first.
    ("umap": the actor's own seconds.) Needs Ray initialised."""
    seconds, started = {}, time.monotonic()
    pool, free_cpus = encoder_pool(actors, gpus_per_actor), ray.available_resources().get("CPU", 0)
    table, projector = encoded_while_the_umap_starts(checkpoint, config, pool, free_cpus)
    spare = first_caller_runs(meanwhile)

    def umap_lane(mapped: ray.ObjectRef, others: np.ndarray, distances: np.ndarray) -> tuple[Path, float]:
        """Once the UMAP (`mapped`) comes back: the latents with its layout and their neighbours written, then the
        work on them; returns their folder and the UMAP's own seconds."""
        projection, umap_seconds = ray.get(mapped)
        latents = write_latents(with_layout(table, layout(projection, others, distances)), out)
        with_the_latents()
        spare()
        return latents, umap_seconds

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="medvq-umap-lane") as lane:
        try:
            seconds["encode"], started = time.monotonic() - started, time.monotonic()
            features = vectors(table.column("features"))
            others, distances = neighbour_search(features)  # here, on every core: the UMAP's process has one
            seconds["neighbours"], started = time.monotonic() - started, time.monotonic()
            mapped = projector.project.remote(features, others, distances, config.seed)
            umap = lane.submit(umap_lane, mapped, others, distances)
            frame = table.drop_columns([RECONSTRUCTION]).to_pandas()
            with threads_left_for(other_work=1):  # the UMAP's core, then its lane's
                records = dataset_records(frame, config.datasets, config.data_root, config.size, config.codebook_size)
                seconds["probes"] = time.monotonic() - started
                spare()
            latents, seconds["umap"] = umap.result()
        finally:
            ray.kill(projector)  # at once if the probes failed: the lane's wait for the UMAP then ends too
    print(
        f"encoded {table.num_rows} images to {latents} in {seconds['encode']:.1f} s; nearest neighbours "
        f"{seconds['neighbours']:.1f} s, then probes {seconds['probes']:.1f} s beside the UMAP {seconds['umap']:.1f} s",
        flush=True,
    )
    return records, seconds

"""The images nearest one image in a run's latent space, as the explorer page lists them: a table, and a PNG
grid of them in RUN/plots/ (jobs/neighbours.py; the grid is drawn by medvq/plots.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from medvq.checkpoints import trained
from medvq.config import Config
from medvq.data import SPLITS, load_split, rgb
from medvq.errors import UserError
from medvq.latent_space import vectors
from medvq.plots import draw_neighbours, find_checkpoint, run_caption, shipped_history
from medvq.probes import nearest
from medvq.report import LATENTS_DIR
from medvq.storage import join, local_folder

TABLE_COLUMNS = ["dataset", "split", "index", "label", "label_name", "distance"]


def neighbour_table(latents: pd.DataFrame, dataset: str, split: str, index: int, k: int) -> pd.DataFrame:
    """The image `index` of `dataset`'s `split` and its k nearest images by their features (Euclidean, over
    all datasets), nearest first: TABLE_COLUMNS, the image itself first, at distance 0."""
    names = sorted(latents["dataset"].unique())
    if dataset not in names:
        raise UserError(f"--dataset {dataset!r} is not in this run's latents: choose from {', '.join(names)}")
    if split not in SPLITS:
        raise UserError(f"--split takes {', '.join(SPLITS)}, got {split!r}")
    in_split = (latents["dataset"] == dataset) & (latents["split"] == split)
    row = np.flatnonzero(in_split & (latents["index"] == index))
    if len(row) == 0:
        raise UserError(
            f"--index {index} is out of range: the run has {in_split.sum()} images of {dataset} {split}, "
            f"0 to {in_split.sum() - 1}"
        )
    if not 1 <= k < len(latents):
        raise UserError(f"--k takes 1 to {len(latents) - 1} (the run's other images), got {k}")
    found, distances = nearest(vectors(latents["features"]), k, row)
    table = latents.iloc[[row[0], *found[0]]].assign(distance=[0.0, *distances[0]])
    return table[TABLE_COLUMNS].reset_index(drop=True)


def neighbours_of(
    run_dir: str | Path, dataset: str, split: str, index: int, k: int, data_root: str | Path | None = None
) -> tuple[pd.DataFrame, str]:
    """`neighbour_table` of a run folder (or URI) with latents/, and where its grid was drawn:
    RUN/plots/neighbours_<dataset>_<split>_<index>.png, the images read from `data_root` (default: the
    model's own)."""
    name = f"neighbours_{dataset}_{split}_{index}.png"
    with local_folder(str(run_dir), skip=("ray_results",)) as run:
        if not any((run / LATENTS_DIR).glob("*.parquet")):
            raise UserError(
                f"{run_dir} has no {LATENTS_DIR}/: point --run at the --out folder of jobs/sweep.py or jobs/encode.py"
            )
        table = neighbour_table(pd.read_parquet(run / LATENTS_DIR), dataset, split, index, k)
        checkpoint = find_checkpoint(run)
        # The model's own data root and image size, unless the run has no checkpoint to say them.
        shipped = trained(checkpoint) if checkpoint else None
        config = shipped.config if shipped is not None else Config()
        splits = {
            key: rgb(load_split(*key, data_root or config.data_root, config.size)[0])
            for key in set(zip(table["dataset"], table["split"]))
        }
        images = np.stack([splits[key][i] for key, i in zip(zip(table["dataset"], table["split"]), table["index"])])
        (run / "plots").mkdir(exist_ok=True)
        draw_neighbours(table, images, run / "plots" / name, run_caption(run, shipped, shipped_history(run)))
    return table, join(str(run_dir), "plots", name)

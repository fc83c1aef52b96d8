"""What the latent space holds: a 2-D UMAP of every image's latent vector, and per-dataset measures on
the test split (reconstruction, codebook use, k-nearest-neighbour probes of class and of dataset)."""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
from sklearn.neighbors import KNeighborsClassifier, NearestNeighbors

from medvq.data import load_split

log = logging.getLogger(__name__)

KNN_NEIGHBOURS = 10
NEIGHBOURS = 8  # the images listed as nearest one image: on the explorer page, and by jobs/neighbours.py
SUMMARY_COLUMNS = {  # record key -> column title in summary.md
    "dataset": "dataset",
    "test_images": "test images",
    "psnr": "PSNR dB",
    "ssim": "SSIM",
    "mae": "MAE",
    "codes_used": "codes used",
    "perplexity": "perplexity",
    "knn_latent": "k-NN class (latent)",
    "knn_pixels": "k-NN class (pixels)",
    "majority_class": "majority class",
    "dataset_recovered": "dataset recovered",
}


def vectors(column: pa.ChunkedArray | pd.Series) -> np.ndarray:
    """A fixed-length vector column (Arrow, or pandas' one-array-per-row) -> an (N, D) array."""
    if isinstance(column, pd.Series):
        return np.stack(column.to_numpy())
    flat = column.combine_chunks()
    return flat.flatten().to_numpy().reshape(len(flat), -1)


def with_umap(table: pa.Table, seed: int = 0) -> pa.Table:
    """The latents table with `umap_x`, `umap_y`: a 2-D UMAP fit on every row's latent vector."""
    import umap  # imported here: numba compiles on import, which only this step needs

    points = vectors(table.column("latent"))
    log.info("UMAP of %d latent vectors of dimension %d", *points.shape)
    # Seeded, so a re-run draws the same picture; that makes UMAP single-threaded, which costs little beside
    # numba's compiling in a fresh process (benchmarks/RESULTS.md).
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.filterwarnings("ignore", message=".*overridden to 1 by setting random_state")  # chosen above
        projection = umap.UMAP(n_components=2, n_neighbors=15, min_dist=0.1, random_state=seed).fit_transform(points)
    _log_once(caught)
    projection = projection.astype(np.float32)
    return table.append_column("umap_x", pa.array(projection[:, 0])).append_column("umap_y", pa.array(projection[:, 1]))


def _log_once(caught: list[warnings.WarningMessage]) -> None:
    """UMAP repeats some warnings many times (a collapsed, barely trained codebook fails its spectral
    start on every component): one log line each instead of a wall of them."""
    for message in dict.fromkeys(" ".join(str(warning.message).split()) for warning in caught):
        log.warning("UMAP: %s", message)


def code_usage(codes: np.ndarray, codebook_size: int) -> tuple[np.ndarray, float]:
    """Uses per code (K,) and perplexity: exp(entropy) of the usage, K when every code is used evenly."""
    counts = np.bincount(codes.ravel(), minlength=codebook_size)
    p = counts[counts > 0] / counts.sum()
    return counts, float(np.exp(-(p * np.log(p)).sum()))


def knn_accuracy(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray) -> float:
    probe = KNeighborsClassifier(n_neighbors=min(KNN_NEIGHBOURS, len(train_y)))
    return float(probe.fit(train_x, train_y).score(test_x, test_y))


def nearest(points: np.ndarray, k: int, rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The k nearest other points (Euclidean) of each of `rows` (default: every point), nearest first: their
    row numbers and distances, both (R, k)."""
    rows = np.arange(len(points)) if rows is None else np.asarray(rows)
    distances, found = NearestNeighbors(n_neighbors=k + 1, algorithm="brute").fit(points).kneighbors(points[rows])
    # Drop each query itself: usually its first hit, but an exact duplicate of it may come first.
    itself = found == rows[:, None]
    itself[~itself.any(axis=1), -1] = True
    return found[~itself].reshape(len(rows), k), distances[~itself].reshape(len(rows), k)


def _pixels(name: str, split: str, data_root: str, size: int) -> np.ndarray:
    images, _ = load_split(name, split, data_root, size)
    return images.reshape(len(images), -1).astype(np.float32) / 255


def _split_rows(latents: pd.DataFrame, name: str, split: str) -> pd.DataFrame:
    rows = latents[(latents["dataset"] == name) & (latents["split"] == split)]
    return rows.sort_values("index")  # the order of the .npz file, to line up with its pixels


def dataset_records(
    latents: pd.DataFrame, datasets: tuple[str, ...], data_root: str, size: int, codebook_size: int
) -> list[dict]:
    """One record per dataset, in the order of `datasets` (not the rows' order, which Ray Data does not fix), on
    its test split: reconstruction scores, codebook use, a k-NN class probe on the latent vectors (fit on
    train) beside the same probe on raw pixels, the majority-class share for scale, and the share of test
    images whose dataset a k-NN on latents recovers among all datasets."""
    names = [name for name in datasets if name in set(latents["dataset"])]
    train_all = latents[latents["split"] == "train"]
    dataset_probe = KNeighborsClassifier(n_neighbors=KNN_NEIGHBOURS).fit(
        vectors(train_all["latent"]), train_all["dataset"]
    )
    records = []
    for name in names:
        train, test = _split_rows(latents, name, "train"), _split_rows(latents, name, "test")
        train_y, test_y = train["label"].to_numpy(), test["label"].to_numpy()
        test_latents = vectors(test["latent"])
        counts, perplexity = code_usage(vectors(test["codes"]), codebook_size)
        records.append(
            {
                "dataset": name,
                "test_images": len(test),
                **{score: float(test[score].mean()) for score in ("psnr", "ssim", "mae", "mse")},
                "codes_used": float((counts > 0).mean()),
                "perplexity": perplexity,
                "knn_latent": knn_accuracy(vectors(train["latent"]), train_y, test_latents, test_y),
                "knn_pixels": knn_accuracy(
                    _pixels(name, "train", data_root, size), train_y, _pixels(name, "test", data_root, size), test_y
                ),
                "majority_class": float(np.bincount(test_y).max() / len(test_y)),
                "dataset_recovered": float((dataset_probe.predict(test_latents) == name).mean()),
            }
        )
    return records


def summary_markdown(records: list[dict]) -> str:
    """The per-dataset table as Markdown; shares and accuracies as percentages."""
    percent = {"codes_used", "knn_latent", "knn_pixels", "majority_class", "dataset_recovered"}

    def cell(key: str, value) -> str:
        if key in percent:
            return f"{value:.1%}"
        return f"{value:.3f}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(SUMMARY_COLUMNS.values()) + " |", "|" + " --- |" * len(SUMMARY_COLUMNS)]
    lines += ["| " + " | ".join(cell(key, record[key]) for key in SUMMARY_COLUMNS) + " |" for record in records]
    return "\n".join(lines) + "\n"


def write_summary(records: list[dict], out: Path, preface: str = "") -> None:
    """summary.json (the records) and summary.md (a preface, then the table with what its columns mean)."""
    (out / "summary.json").write_text(json.dumps(records, indent=2) + "\n")
    notes = (
        f"Test split of each dataset. k-NN: {KNN_NEIGHBOURS} neighbours fit on the train split, on the "
        "latent vectors or on raw pixels; majority class: the accuracy of always guessing the commonest "
        "class; dataset recovered: share of test images a k-NN on latents assigns to their own dataset.\n"
    )
    (out / "summary.md").write_text(preface + ("\n" if preface else "") + summary_markdown(records) + "\n" + notes)

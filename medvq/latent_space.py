"""What the latent space holds: a 2-D UMAP of every image's features, and per-dataset measures on
the test split (reconstruction, codebook use, k-nearest-neighbour probes of class and of dataset)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from medvq.baselines import PIXEL_PROBES, PIXEL_PROBES_PROTOCOL, RESNET18_28
from medvq.data import is_medmnists_own, load_split
from medvq.encode import fixed_size_list
from medvq.probes import (
    KNN_NEIGHBOURS,
    LINEAR_STRENGTHS,
    closest,
    knn_accuracy,
    linear_probe_accuracy,
    nearest,
    protocol,
)
from medvq.projection import UMAP_NEIGHBOURS

PROBE_SPLITS = ("train", "val", "test")  # the probes' fit, the linear probe's choice of strength, the score
NEIGHBOURS = 8  # the images listed as nearest one image: on the explorer page, and by jobs/neighbours.py
SUMMARY_COLUMNS = {  # record key -> column title in summary.md
    "dataset": "dataset",
    "test_images": "test images",
    "psnr": "PSNR dB",
    "ssim": "SSIM",
    "mae": "MAE",
    "codes_used": "codes used",
    "perplexity": "perplexity",
    "knn_features": "11-NN class (features)",
    "knn_pixels": "11-NN class (pixels)",
    "linear_features": "linear class (features)",
    "linear_pixels": "linear class (pixels)",
    "majority_class": "majority class",
    "supervised_ceiling": "ResNet-18 (28)",
    "dataset_recovered": "dataset recovered",
}


def vectors(column: pa.ChunkedArray | pd.Series) -> np.ndarray:
    """A fixed-length vector column (Arrow, or pandas' one-array-per-row) -> an (N, D) array."""
    if isinstance(column, pd.Series):
        return np.stack(column.to_numpy())
    flat = column.combine_chunks()
    return flat.flatten().to_numpy().reshape(len(flat), -1)


def neighbour_search(points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each row of `points` (N, D)'s nearest other rows, as many as the UMAP and the explorer use, nearest first: row
    numbers and distances, both (N, k). One exact search serves both."""
    return nearest(points, min(max(UMAP_NEIGHBOURS - 1, NEIGHBOURS), len(points) - 1))


def layout(projection: np.ndarray, others: np.ndarray, distances: np.ndarray) -> dict[str, np.ndarray]:
    """The 2-D UMAP (`umap_projection`) and each row's NEIGHBOURS nearest other rows with their distances (from
    `neighbour_search`): columns of the latents table, by name (see `with_layout`)."""
    return {
        "umap_x": projection[:, 0],
        "umap_y": projection[:, 1],
        "neighbours": others[:, :NEIGHBOURS].astype(np.int32),
        "neighbour_distances": distances[:, :NEIGHBOURS],
    }


def with_layout(table: pa.Table, columns: dict[str, np.ndarray]) -> pa.Table:
    """The latents table with the columns of `layout`, one row per table row; a 2-D one as fixed-size lists."""
    for name, values in columns.items():
        table = table.append_column(name, pa.array(values) if values.ndim == 1 else fixed_size_list(values))
    return table


def code_usage(codes: np.ndarray, codebook_size: int) -> tuple[np.ndarray, float]:
    """Uses per code (K,) and perplexity: exp(entropy) of the usage, K when every code is used evenly."""
    counts = np.bincount(codes.ravel(), minlength=codebook_size)
    p = counts[counts > 0] / counts.sum()
    return counts, float(np.exp(-(p * np.log(p)).sum()))


def class_probes(x: dict[str, np.ndarray], y: dict[str, np.ndarray]) -> dict:
    """{"knn": ..., "linear": ...}: the test accuracy of both class probes, fit on x["train"]; x["val"] only
    chooses the linear probe's strength. x and y: one array per split of PROBE_SPLITS."""
    return {"knn": knn_accuracy(x["train"], y["train"], x["test"], y["test"]), "linear": linear_probe_accuracy(x, y)}


def dataset_recovered(latents: pd.DataFrame, names: list[str]) -> dict[str, float]:
    """Per dataset: the share of its test images whose KNN_NEIGHBOURS nearest training images (of every dataset)
    mostly come from it; a tie goes to the first name in alphabetical order, as in scikit-learn."""
    train, test = latents[latents["split"] == "train"], latents[latents["split"] == "test"]
    found, _ = closest(vectors(train["features"]), vectors(test["features"]), KNN_NEIGHBOURS)
    names = sorted(names)
    train_ids = pd.Categorical(train["dataset"], categories=names).codes
    votes = np.zeros((len(test), len(names)))
    np.add.at(votes, (np.arange(len(test))[:, None], train_ids[found]), 1)
    recovered = np.asarray(names)[votes.argmax(1)] == test["dataset"].to_numpy()
    return {name: float(recovered[test["dataset"].to_numpy() == name].mean()) for name in names}


def pixel_probes(name: str, labels: dict[str, np.ndarray], data_root: str, size: int) -> dict:
    """`class_probes` on the dataset's raw pixels: those PIXEL_PROBES keeps for MedMNIST's own file (measured with
    today's probes), else measured. labels: one array per split of PROBE_SPLITS, in the file's order."""
    kept = PIXEL_PROBES.get((name, size)) if PIXEL_PROBES_PROTOCOL == protocol() else None
    if kept is not None and is_medmnists_own(name, data_root, size):
        return dict(kept)
    return class_probes({split: _pixels(name, split, data_root, size) for split in PROBE_SPLITS}, labels)


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
    its test split: reconstruction scores, codebook use, an 11-NN and a linear class probe on the features (fit
    on train; the linear one's strength chosen on val) beside the same probes on raw pixels, the majority-class
    share (floor) and the supervised ResNet-18 (28) accuracy (ceiling; None for a set it has none for) for scale,
    and the share of test images whose dataset a k-NN on features recovers among all datasets."""
    names = [name for name in datasets if name in set(latents["dataset"])]
    recovered = dataset_recovered(latents, names)
    records = []
    for name in names:
        rows = {split: _split_rows(latents, name, split) for split in PROBE_SPLITS}
        labels = {split: rows[split]["label"].to_numpy() for split in PROBE_SPLITS}
        features = {split: vectors(rows[split]["features"]) for split in PROBE_SPLITS}
        test, test_y = rows["test"], labels["test"]
        counts, perplexity = code_usage(vectors(test["codes"]), codebook_size)
        on_features, on_pixels = class_probes(features, labels), pixel_probes(name, labels, data_root, size)
        records.append(
            {
                "dataset": name,
                "test_images": len(test),
                **{score: float(test[score].mean()) for score in ("psnr", "ssim", "mae", "mse")},
                "codes_used": float((counts > 0).mean()),
                "perplexity": perplexity,
                **{f"{probe}_features": accuracy for probe, accuracy in on_features.items()},
                **{f"{probe}_pixels": accuracy for probe, accuracy in on_pixels.items()},
                "majority_class": float(np.bincount(test_y).max() / len(test_y)),
                "supervised_ceiling": RESNET18_28.get(name),
                "dataset_recovered": recovered[name],
            }
        )
    return records


def summary_markdown(records: list[dict]) -> str:
    """The per-dataset table as Markdown; shares and accuracies as percentages."""
    percent = {"codes_used", "majority_class", "supervised_ceiling", "dataset_recovered"}
    percent |= {f"{probe}_{features}" for probe in ("knn", "linear") for features in ("features", "pixels")}

    def cell(key: str, value) -> str:
        if value is None:
            return "n/a"
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
        f"Test split of each dataset. Class probes, fit on the train split, on the features (the encoder's, pooled) "
        f"or on raw pixels (of MedMNIST's own files: as kept in medvq/baselines.py): {KNN_NEIGHBOURS}-NN, and a "
        "logistic regression on standardised features (linear) whose inverse regularisation strength C is the one of "
        f"{', '.join(f'{strength:g}' for strength in LINEAR_STRENGTHS)} that scores best on the val split; majority "
        "class: the accuracy of always guessing the commonest class (a floor); ResNet-18 (28): the supervised "
        "accuracy of MedMNIST v2's benchmark (Yang et al., Scientific Data 2023, Table 3; a ceiling); dataset "
        "recovered: share of test images a k-NN on features assigns to their own dataset.\n"
    )
    (out / "summary.md").write_text(preface + ("\n" if preface else "") + summary_markdown(records) + "\n" + notes)

"""Synthetic files in the exact MedMNIST npz layout, for tests and smoke runs; never real data.

Shapes, split sizes and class counts come from `medmnist.INFO`, so a synthetic file passes the same
structure check as a real one (its md5 differs, which medvq accepts with a warning). Images are smooth
blobs with a per-class brightness, so a model can learn something and a probe can find the classes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medvq.data import SPLITS, dataset_info, file_name


def synthetic_images(n: int, size: int, channels: int, labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(n, size, size[, channels]) uint8 Gaussian blobs whose brightness follows the label."""
    grid = np.linspace(-1, 1, size, dtype=np.float32)
    yy, xx = np.meshgrid(grid, grid, indexing="ij")
    centres = rng.uniform(-0.5, 0.5, size=(n, 2, 1, 1)).astype(np.float32)
    blobs = np.exp(-((yy - centres[:, 0]) ** 2 + (xx - centres[:, 1]) ** 2) / 0.2)  # (n, size, size)
    brightness = (0.3 + 0.7 * (labels + 1) / (labels.max() + 1)).reshape(n, 1, 1)
    images = (255 * blobs * brightness).astype(np.uint8)
    if channels == 1:
        return images
    tint = rng.uniform(0.6, 1.0, size=(1, 1, 1, channels)).astype(np.float32)
    return (images[..., None] * tint).astype(np.uint8)


def write_synthetic_npz(root: str | Path, name: str, size: int = 28, seed: int = 0, flat_labels: bool = False) -> Path:
    """Write `root/<medmnist file name>` for dataset `name` and return its path.

    flat_labels writes labels as (N,) instead of the official (N, 1), a layout seen in re-saved copies.
    """
    info = dataset_info(name)
    rng = np.random.default_rng(seed)
    n_classes = len(info["label"])
    arrays = {}
    for split in SPLITS:
        n = info["n_samples"][split]
        labels = rng.integers(0, n_classes, size=n).astype(np.uint8)
        arrays[f"{split}_images"] = synthetic_images(n, size, info["n_channels"], labels, rng)
        arrays[f"{split}_labels"] = labels if flat_labels else labels[:, None]
    path = Path(root) / file_name(name, size)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **arrays)
    return path

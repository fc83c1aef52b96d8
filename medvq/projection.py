"""The 2-D UMAP of the latents, given each point's nearest: a Ray actor of its own beside the probes (report.py), so it
imports umap-learn and numpy only: not torch or medmnist, seconds of the actor's start (benchmarks/RESULTS.md)."""

from __future__ import annotations

import importlib
import logging
import time
import warnings

import numpy as np

log = logging.getLogger(__name__)

UMAP_NEIGHBOURS = 15  # umap-learn's default, counting the point itself


class Projector:
    """The UMAP's process (report.py makes it a one-CPU Ray actor): it imports umap-learn as it starts, so the job
    starts it while the encoding runs and the UMAP need not wait for its imports (benchmarks/RESULTS.md)."""

    def __init__(self) -> None:
        load_umap()

    def project(
        self, points: np.ndarray, others: np.ndarray, distances: np.ndarray, seed: int = 0
    ) -> tuple[np.ndarray, float]:
        """`umap_projection`, and the seconds it took: the driver, busy with the probes, cannot see when it ends."""
        started = time.monotonic()
        return umap_projection(points, others, distances, seed), time.monotonic() - started


def umap_projection(points: np.ndarray, others: np.ndarray, distances: np.ndarray, seed: int = 0) -> np.ndarray:
    """A 2-D UMAP of the rows of `points` (N, D) -> (N, 2) float32, given each row's nearest other rows (N, k)."""
    umap = load_umap()
    log.info("UMAP of %d feature vectors of dimension %d", *points.shape)
    # Exact neighbours handed to UMAP: its own search (NN-descent) compiled and ran for most of its time
    # (benchmarks/RESULTS.md). UMAP counts each point as its own nearest, at distance 0.
    k = min(UMAP_NEIGHBOURS - 1, others.shape[1])
    itself = np.arange(len(points))[:, None]
    known = (np.hstack([itself, others[:, :k]]), np.hstack([np.zeros(itself.shape, np.float32), distances[:, :k]]))
    # Seeded, so a re-run draws the same picture; that makes UMAP single-threaded.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.filterwarnings("ignore", message=".*overridden to 1 by setting random_state")  # chosen above
        warnings.filterwarnings("ignore", message=".*precomputed_knn.*knn_search_index")  # only fit, never transform
        umap_model = umap.UMAP(
            n_components=2, n_neighbors=k + 1, min_dist=0.1, random_state=seed, precomputed_knn=(*known, None)
        )
        projection = umap_model.fit_transform(points)
    _log_once(caught)
    return projection.astype(np.float32)


# umap-learn's numba functions that it compiles anew in every process: seconds of each UMAP (benchmarks/RESULTS.md)
UNCACHED_UMAP_FUNCTIONS = {
    "umap.umap_": ("smooth_knn_dist", "compute_membership_strengths"),
    "umap.layouts": ("_nb_optimize_layout_euclidean_single_epoch",),
}


def load_umap():
    """umap-learn, imported here: numba compiles on import, which only the UMAP's process needs; with its
    compilations cached on disk."""
    import umap

    cache_umaps_compilations()
    return umap


def cache_umaps_compilations() -> None:
    """numba caches on disk what these functions compile, as it does umap-learn's others: a node compiles them once,
    not once per run. A function an umap-learn version renames or no longer has is left as it is."""
    for module, names in UNCACHED_UMAP_FUNCTIONS.items():
        for name in names:
            function = getattr(importlib.import_module(module), name, None)
            if hasattr(function, "enable_caching"):  # a numba dispatcher
                function.enable_caching()


def _log_once(caught: list[warnings.WarningMessage]) -> None:
    """UMAP repeats some warnings many times (a collapsed, barely trained codebook fails its spectral
    start on every component): one log line each instead of a wall of them."""
    for message in dict.fromkeys(" ".join(str(warning.message).split()) for warning in caught):
        log.warning("UMAP: %s", message)

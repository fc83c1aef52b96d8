"""The UMAP's process: what its warnings become, what it imports and what it leaves compiled for the next one."""

from __future__ import annotations

import importlib
import logging
import os
import subprocess
import sys
import warnings

from medvq.projection import UNCACHED_UMAP_FUNCTIONS, _log_once
from tests.test_process_imports import imported_of


def test_repeated_umap_warnings_become_one_line_each(caplog):
    spectral = (
        "Spectral initialisation failed! The eigenvector solver\nfailed.\n\nFalling back to random initialisation!"
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for message in (spectral, spectral, "another warning", spectral):
            warnings.warn(message, UserWarning, stacklevel=1)
    with caplog.at_level(logging.WARNING, logger="medvq.projection"):
        _log_once(caught)
    assert caplog.messages == [
        "UMAP: Spectral initialisation failed! The eigenvector solver failed. Falling back to random initialisation!",
        "UMAP: another warning",
    ]


def test_the_umaps_process_imports_neither_torch_nor_medmnist():
    """Its own module, numpy and umap-learn: the actor starts during the encoding, beside it on a small machine."""
    assert imported_of({"torch", "medmnist", "lightning"}, "medvq.projection, umap") == "[]"


def test_umaps_compilations_are_cached_on_disk_for_the_next_process(tmp_path):
    """The functions umap-learn compiles anew in every process leave numba's cache behind them (NUMBA_CACHE_DIR
    here, else beside umap-learn's code): the next UMAP on the node loads them instead."""
    project = (
        "import numpy as np; from medvq.latent_space import neighbour_search; "
        "from medvq.projection import umap_projection; "
        "points = np.random.default_rng(0).normal(size=(300, 8)).astype(np.float32); "
        "umap_projection(points, *neighbour_search(points))"
    )
    subprocess.run([sys.executable, "-c", project], env={**os.environ, "NUMBA_CACHE_DIR": str(tmp_path)}, check=True)
    cached = {path.name.split("-")[0] for path in tmp_path.rglob("*.nbi")}
    expected = set()
    for module, names in UNCACHED_UMAP_FUNCTIONS.items():
        for name in names:  # numba names a cache file after the module and the compiled Python function
            compiled = getattr(importlib.import_module(module), name).py_func.__name__
            expected.add(f"{module.split('.')[-1]}.{compiled}")
    assert expected <= cached, cached

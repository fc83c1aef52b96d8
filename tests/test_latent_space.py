"""Measures of the latent space that need no model: codebook usage, the class probes, the summary table, and what
UMAP's warnings and compilations become."""

from __future__ import annotations

import importlib
import logging
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest

from medvq.latent_space import SUMMARY_COLUMNS, class_probes, code_usage, summary_markdown
from medvq.projection import UNCACHED_UMAP_FUNCTIONS, _log_once


def test_perplexity_is_the_number_of_evenly_used_codes():
    counts, perplexity = code_usage(np.arange(8).repeat(5), codebook_size=16)
    assert counts.shape == (16,) and perplexity == pytest.approx(8.0)
    assert code_usage(np.zeros(10, dtype=np.int16), 16)[1] == pytest.approx(1.0)


def test_repeated_umap_warnings_become_one_line_each(caplog):
    spectral = (
        "Spectral initialisation failed! The eigenvector solver\nfailed.\n\nFalling back to random initialisation!"
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for message in (spectral, spectral, "another warning", spectral):
            warnings.warn(message, UserWarning, stacklevel=1)
    with caplog.at_level(logging.WARNING, logger="medvq.latent_space"):
        _log_once(caught)
    assert caplog.messages == [
        "UMAP: Spectral initialisation failed! The eigenvector solver failed. Falling back to random initialisation!",
        "UMAP: another warning",
    ]


def by_split(values: np.ndarray) -> dict[str, np.ndarray]:
    """250 train, 50 val and 100 test rows."""
    return {"train": values[:250], "val": values[250:300], "test": values[300:]}


def test_both_class_probes_separate_separable_classes_and_not_random_labels():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 400)
    separable = rng.normal(size=(400, 8)) + 6 * labels[:, None]
    assert class_probes(by_split(separable), by_split(labels)) == {"knn": 1.0, "linear": 1.0}
    noise = rng.normal(size=(400, 8))
    assert all(0.3 < accuracy < 0.7 for accuracy in class_probes(by_split(noise), by_split(labels)).values())


def test_the_summary_table_shows_a_missing_ceiling_as_n_a():
    record = {key: 0.5 for key in SUMMARY_COLUMNS} | {
        "dataset": "octmnist",
        "test_images": 10,
        "supervised_ceiling": None,
    }
    row = summary_markdown([record]).splitlines()[2]
    assert row.startswith("| octmnist | 10 | 0.500 |") and row.endswith("| 50.0% | n/a | 50.0% |")


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

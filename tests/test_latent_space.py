"""Measures of the latent space that need no model: codebook usage, the class probes, the summary table, and what
UMAP's warnings become."""

from __future__ import annotations

import numpy as np
import pytest

from medvq.latent_space import SUMMARY_COLUMNS, class_probes, code_usage, summary_markdown


def test_perplexity_is_the_number_of_evenly_used_codes():
    counts, perplexity = code_usage(np.arange(8).repeat(5), codebook_size=16)
    assert counts.shape == (16,) and perplexity == pytest.approx(8.0)
    assert code_usage(np.zeros(10, dtype=np.int16), 16)[1] == pytest.approx(1.0)


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

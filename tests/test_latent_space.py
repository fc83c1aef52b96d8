"""Measures of the latent space that need no model: codebook usage, and what UMAP's warnings become."""

from __future__ import annotations

import logging
import warnings

import numpy as np
import pytest

from medvq.latent_space import _log_once, code_usage


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

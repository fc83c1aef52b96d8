"""The probes against scikit-learn, whose KNeighborsClassifier and LogisticRegression they replace: the same
neighbours, the same votes, the same optimum."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import KNeighborsClassifier, NearestNeighbors

from medvq import probes
from medvq.probes import LINEAR_STRENGTHS, closest, fit_linear_probes, knn_accuracy, linear_probe_accuracy, nearest


@pytest.fixture(params=[True, False], ids=["bfloat16 candidates", "float32"])
def candidates_in(request, monkeypatch):
    """Both ways of finding candidates, whatever this CPU has."""
    monkeypatch.setattr(probes, "native_bfloat16", lambda: request.param)


def test_nearest_neighbours_are_scikit_learns_exact_ones(candidates_in):
    rng = np.random.default_rng(0)
    points = rng.integers(0, 256, size=(3000, 300)).astype(np.float32) / 255  # pixel-like: far from the origin
    queries = rng.integers(0, 256, size=(500, 300)).astype(np.float32) / 255
    points[:, :10] = queries[:, :5] = 0.5  # dead in both (left out of the search), and only in the points (not)
    found, distances = closest(points, queries, 11)
    expected_distances, expected = NearestNeighbors(n_neighbors=11).fit(points).kneighbors(queries)
    np.testing.assert_array_equal(found, expected)
    np.testing.assert_allclose(distances, expected_distances, rtol=1e-5)


def test_a_point_is_not_its_own_neighbour_but_its_duplicate_is(candidates_in):
    points = np.random.default_rng(1).normal(size=(200, 16)).astype(np.float32)
    points[7] = points[3]
    found, distances = nearest(points, 4)
    assert not (found == np.arange(200)[:, None]).any()
    assert found[3, 0] == 7 and found[7, 0] == 3 and distances[3, 0] == 0
    rows = np.array([3, 50])
    np.testing.assert_array_equal(nearest(points, 4, rows)[0], found[rows])


def test_queries_in_many_small_chunks_find_the_same_neighbours(monkeypatch):
    points = np.random.default_rng(4).normal(size=(300, 24)).astype(np.float32)
    whole, rows = nearest(points, 5), np.array([0, 7, 150, 299, 42])
    monkeypatch.setattr(probes, "BLOCK_BYTES", 4 * 300 * 7)  # 7 queries a chunk
    np.testing.assert_array_equal(nearest(points, 5)[0], whole[0])
    np.testing.assert_array_equal(nearest(points, 5, rows)[0], whole[0][rows])


def test_the_knn_vote_is_scikit_learns_ties_included():
    rng = np.random.default_rng(2)
    train_x, test_x = rng.normal(size=(600, 5)), rng.normal(size=(300, 5))
    train_y, test_y = rng.integers(0, 4, 600), rng.integers(0, 4, 300)  # 11 votes among 4 classes: many ties
    reference = KNeighborsClassifier(n_neighbors=11).fit(train_x, train_y).score(test_x, test_y)
    assert knn_accuracy(train_x, train_y, test_x, test_y) == pytest.approx(reference)


@pytest.mark.parametrize("classes", [3, 2])  # two: scikit-learn's one logit (binomial), not a softmax of two
def test_the_linear_probes_reach_scikit_learns_optimum_for_every_strength(classes):
    rng = np.random.default_rng(3)
    mixing = rng.normal(size=(20, 20)) * np.logspace(0, -2, 20)  # correlated, badly scaled columns, like pixels
    x = (rng.normal(size=(400, 20)) @ mixing).astype(np.float32)
    x = (x - x.mean(0)) / x.std(0)
    y = (x[:, :3] @ rng.normal(size=(3, classes)) + rng.normal(size=(400, classes))).argmax(1)
    weights, bias = fit_linear_probes(torch.from_numpy(x), torch.from_numpy(y), classes)
    for s, strength in enumerate(LINEAR_STRENGTHS):
        reference = LogisticRegression(C=strength, max_iter=10_000, tol=1e-10).fit(x, y)
        probabilities = torch.softmax(torch.from_numpy(x) @ weights[:, s] + bias[s], 1).numpy()
        np.testing.assert_allclose(probabilities, reference.predict_proba(x), atol=2e-3)


def by_split(values: np.ndarray) -> dict[str, np.ndarray]:
    """250 train, 50 val and 100 test rows."""
    return {"train": values[:250], "val": values[250:300], "test": values[300:]}


def test_the_val_split_chooses_the_linear_probes_strength(monkeypatch):
    # 70% of class 0, told apart by one feature: the weakest regularisation finds it, the strongest all but zeroes
    # the weights and guesses the majority class. A val split labelled all 0 rewards that guess.
    monkeypatch.setattr(probes, "LINEAR_STRENGTHS", (1e-6, 1.0))
    rng = np.random.default_rng(0)
    labels = (rng.random(400) < 0.3).astype(int)
    x = by_split(rng.normal(size=(400, 4)) + 4 * labels[:, None])
    y = by_split(labels)
    assert linear_probe_accuracy(x, y) == 1.0
    guessing = linear_probe_accuracy(x, {**y, "val": np.zeros_like(y["val"])})
    assert guessing == pytest.approx(1 - y["test"].mean())


def test_a_column_constant_in_train_changes_no_linear_prediction():
    rng = np.random.default_rng(5)
    labels = rng.integers(0, 3, 400)
    x = rng.normal(size=(400, 6)) + labels[:, None]
    dead = np.where(np.arange(400)[:, None] < 250, 0.0, rng.normal(scale=100, size=(400, 1)))  # 0 in train alone
    y = by_split(labels)
    assert linear_probe_accuracy(by_split(np.hstack([x, dead])), y) == linear_probe_accuracy(by_split(x), y)

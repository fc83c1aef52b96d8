"""The probes of what features (or pixels) carry: exact k nearest neighbours, and a linear probe whose strength the val
split picks. Written in torch for speed on the driver's CPU: the same protocol as scikit-learn's KNeighborsClassifier
and LogisticRegression (lbfgs), at a fraction of the cost (benchmarks/RESULTS.md, "the probes in torch").
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F

KNN_NEIGHBOURS = 11  # MedMNIST+'s k-NN protocol
# The linear probe's inverse regularisation strengths C (scikit-learn's meaning), weakest regularisation last; the val
# split picks one. At C = 1 alone, pixels beat the features on retina (results/probes/probes.md).
LINEAR_STRENGTHS = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)
LINEAR_ITERATIONS = 100  # of L-BFGS, preconditioned: close enough to the optimum that the accuracy no longer moves
RERANKED = 32  # candidates per query beyond k kept from the quick distances, then ranked again exactly
BLOCK_BYTES = 256 * 1024**2  # the float32 rough distances of one chunk of queries
CACHED_BYTES = 8 * 1024**2  # the differences of a few queries from their candidates: they stay in the CPU's caches
PRECONDITIONED = 128  # widest directions of the inputs the linear probe scales by their curvature
HESSIAN_SCALE = 0.25  # the softmax cross-entropy's curvature at its start, p(1 - p) for p near 1/2


def protocol() -> dict:
    """What the probes' accuracies depend on besides their inputs: a result kept from an earlier run
    (baselines.PIXEL_PROBES) holds only while these are the same."""
    return {
        "knn_neighbours": KNN_NEIGHBOURS,
        "linear_strengths": LINEAR_STRENGTHS,
        "linear_iterations": LINEAR_ITERATIONS,
        "preconditioned": PRECONDITIONED,
        "hessian_scale": HESSIAN_SCALE,
        "two_classes": "one logit",  # scikit-learn's binomial fit (fit_linear_probes)
    }


@contextmanager
def threads_left_for(other_work: int) -> Iterator[None]:
    """torch's threads cut by `other_work` cores (at least one left) while the block runs: a parallel operation waits
    for its slowest thread, so a thread that shares its core with other work holds up every step."""
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, before - other_work))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def native_bfloat16() -> bool:
    """Whether this CPU multiplies bfloat16 matrices in hardware (AVX-512 BF16 or AMX): then distances are
    first ranked in bfloat16, several times faster. torch's check is private: without it, float32 throughout."""
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return bool(check is not None and check())


def closest(
    points: np.ndarray, queries: np.ndarray, k: int, query_rows: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The k rows of `points` nearest each row of `queries` (Euclidean), nearest first: row numbers and distances,
    both (Q, k). query_rows: the queries are these rows of `points`, and each is not its own neighbour (an exact
    duplicate of it may be).

    Candidates come from |p|^2 - 2 p.q, one matrix product (in bfloat16 where the CPU has it), and are ranked again
    by their exact differences in float32, so rounding only matters if it pushes a true neighbour past RERANKED
    others."""
    base = torch.from_numpy(np.array(points, dtype=np.float32))
    centre = base.mean(0)  # distances do not move; shorter vectors round less in the product
    base, asked = base - centre, torch.from_numpy(np.array(queries, dtype=np.float32)) - centre
    # A column that is the centre's value in every point and query adds 0 to every distance (a dead channel)
    varying = base.any(0) | asked.any(0)
    base, asked = base[:, varying], asked[:, varying]
    quick = base.bfloat16() if native_bfloat16() else base
    squares = base.pow(2).sum(1)  # (N,)
    kept = min(k + RERANKED, len(base))
    chunk_size = max(1, BLOCK_BYTES // (4 * len(base)))
    found, distances = [], []
    for start in range(0, len(asked), chunk_size):
        chunk = asked[start : start + chunk_size]  # (Q, D)
        # (Q, N): squared distance less |q|^2, in float32; in place, as passes over it take longer than the product
        rough = (chunk.to(quick.dtype) @ quick.T).float().mul_(-2).add_(squares)
        if query_rows is not None:
            itself = torch.from_numpy(query_rows[start : start + chunk_size])
            rough[torch.arange(len(chunk)), itself] = float("inf")
        candidates = rough.topk(kept, largest=False).indices  # (Q, C)
        exact = exact_distances(base, chunk, candidates)
        if query_rows is not None:  # a query among its own candidates (fewer points than C) stays last
            exact[candidates == itself[:, None]] = float("inf")
        order = exact.topk(k, largest=False)
        found.append(candidates.gather(1, order.indices))
        distances.append(order.values)
    return torch.cat(found).numpy(), torch.cat(distances).numpy()


def exact_distances(points: torch.Tensor, queries: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """(Q, C): each query's Euclidean distance to its candidates (rows of `points`), from their differences. A few
    queries at a time, whose differences fit CACHED_BYTES: all at once, the passes over them ran at memory speed."""
    step = max(1, CACHED_BYTES // (4 * candidates.shape[1] * points.shape[1]))
    return torch.cat(
        [
            torch.linalg.vector_norm(
                points[candidates[start : start + step]] - queries[start : start + step, None], dim=-1
            )
            for start in range(0, len(queries), step)
        ]
    )


def nearest(points: np.ndarray, k: int, rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The k nearest other points (Euclidean) of each of `rows` (default: every point), nearest first: their
    row numbers and distances, both (R, k)."""
    rows = np.arange(len(points)) if rows is None else np.asarray(rows)
    return closest(points, points[rows], k, query_rows=rows)


def knn_accuracy(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray) -> float:
    """Accuracy of a majority vote of each test row's KNN_NEIGHBOURS nearest training rows; a tie goes to the lowest
    label, as in scikit-learn."""
    found, _ = closest(train_x, test_x, min(KNN_NEIGHBOURS, len(train_y)))
    votes = np.zeros((len(test_x), int(train_y.max()) + 1))
    np.add.at(votes, (np.arange(len(test_x))[:, None], train_y[found]), 1)
    return float((votes.argmax(1) == test_y).mean())


def _standardised(x: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Every split scaled by the train split's mean and standard deviation, without the columns constant in train
    (a dead channel): the optimum gives them no weight, so the linear probe need not carry them."""
    train = torch.from_numpy(x["train"]).double()
    mean, std = train.mean(0), train.std(0, unbiased=False)
    varying = std > 0
    mean, std = mean[varying], std[varying]
    return {
        split: ((torch.from_numpy(values[:, varying.numpy()]).double() - mean) / std).float()
        for split, values in x.items()
    }


def fit_linear_probes(train: torch.Tensor, labels: torch.Tensor, classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regressions of `labels` (N,) on `train` (N, D), one per strength of LINEAR_STRENGTHS:
    weights (D, S, C) and intercepts (S, C) minimising scikit-learn's objective, C * sum(cross-entropy) + |W|^2 / 2
    with an unpenalised intercept. Two classes, as scikit-learn fits them: one logit against a fixed 0 (a softmax of
    two would spread the weights over both, halving their penalty: the strength C would act as 2C).

    All strengths are one L-BFGS problem whose parts do not interact, so one pass over the inputs serves them all.
    Along the inputs' PRECONDITIONED widest directions the weights are scaled by the curvature there, which turns
    thousands of steps on correlated inputs (pixels) into tens; the optimum stays the same."""
    n, dim = train.shape
    strengths = len(LINEAR_STRENGTHS)
    fitted = 1 if classes == 2 else classes  # logits fitted; with two classes the first is 0
    penalty = 1 / (n * torch.tensor(LINEAR_STRENGTHS))  # (S,): the objective divided by n * C
    with torch.random.fork_rng():  # the randomised SVD's start, fixed: the same inputs give the same probe
        torch.manual_seed(0)
        _, singular, wide = torch.svd_lowrank(train, q=min(PRECONDITIONED, dim, n), niter=2)  # wide: (D, K)
    variances = singular**2 / n  # along each wide direction; the last bounds every other direction's
    wide_scale = (HESSIAN_SCALE * variances[:, None] + penalty).rsqrt()  # (K, S)
    rest_scale = (HESSIAN_SCALE * variances[-1] + penalty).rsqrt()  # (S,)
    along = torch.zeros(len(variances), strengths, fitted, requires_grad=True)  # weights on the wide directions
    across = torch.zeros(dim, strengths, fitted, requires_grad=True)  # and off them (its part on them is unused)
    bias = torch.zeros(strengths, fitted, requires_grad=True)

    def all_classes(fitted_logits: torch.Tensor) -> torch.Tensor:  # (..., C)
        return F.pad(fitted_logits, (classes - fitted, 0))

    def weights() -> torch.Tensor:  # (D, S, fitted)
        off = across - torch.einsum("dk,ksc->dsc", wide, torch.einsum("dk,dsc->ksc", wide, across))
        return torch.einsum("dk,ksc->dsc", wide, wide_scale[..., None] * along) + rest_scale[:, None] * off

    def objective() -> torch.Tensor:
        optimizer.zero_grad()
        w = weights()
        logits = all_classes((train @ w.reshape(dim, -1)).reshape(n, strengths, fitted) + bias)
        loss = F.cross_entropy(logits.permute(0, 2, 1), labels[:, None].expand(n, strengths), reduction="sum") / n
        loss = loss + 0.5 * (penalty * w.pow(2).sum((0, 2))).sum()
        loss.backward()
        return loss

    optimizer = torch.optim.LBFGS(
        [along, across, bias], max_iter=LINEAR_ITERATIONS, line_search_fn="strong_wolfe", tolerance_change=1e-10
    )
    optimizer.step(objective)
    return all_classes(weights().detach()), all_classes(bias.detach())


def linear_probe_accuracy(x: dict[str, np.ndarray], y: dict[str, np.ndarray]) -> float:
    """Test accuracy of a multinomial logistic regression on standardised inputs, fit on train with the strength
    of LINEAR_STRENGTHS that scores best on val (the strongest regularisation among ties)."""
    inputs = _standardised(x)
    labels = {split: torch.tensor(values, dtype=torch.long) for split, values in y.items()}
    weights, bias = fit_linear_probes(inputs["train"], labels["train"], 1 + max(int(v.max()) for v in labels.values()))
    correct = {
        split: ((inputs[split] @ weights.flatten(1)).reshape(len(labels[split]), *bias.shape) + bias).argmax(-1)
        == labels[split][:, None]
        for split in ("val", "test")
    }  # (rows, S)
    best = int(correct["val"].float().mean(0).argmax())  # argmax keeps the first of equals: the strongest
    return float(correct["test"][:, best].float().mean())

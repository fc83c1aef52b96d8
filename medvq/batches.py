"""One split of several datasets as whole-split tensors, and the batches of row numbers an epoch draws from them
(on the GPU when training on one and they fit, so a batch is one gather on the device, with no copy from the host)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Sampler

from medvq.data import load_split, rgb


@dataclass
class SplitArrays:
    """One split of several datasets, concatenated; every row traces back to its source image."""

    images: torch.Tensor  # (N, H, W, 3) uint8, grayscale replicated to three channels
    labels: torch.Tensor  # (N,) int64, class within its own dataset
    dataset_ids: torch.Tensor  # (N,) int64, position in the config's dataset list
    indices: torch.Tensor  # (N,) int64, row within its own dataset's split

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def nbytes(self) -> int:
        return sum(getattr(self, f.name).nbytes for f in fields(self))

    def to(self, device: torch.device) -> SplitArrays:
        return SplitArrays(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    def __getitem__(self, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        """A whole batch at once: `rows` is a tensor of row numbers (on the arrays' device)."""
        return {
            "image": self.images[rows],
            "label": self.labels[rows],
            "dataset_id": self.dataset_ids[rows],
            "index": self.indices[rows],
        }


def load_splits(datasets: tuple[str, ...], split: str, root: str | Path, size: int = 28) -> SplitArrays:
    parts = []
    for dataset_id, name in enumerate(datasets):
        images, labels = load_split(name, split, root, size)
        images = rgb(images)  # a view until concatenated
        parts.append((images, labels, np.full(len(labels), dataset_id), np.arange(len(labels))))
    images, labels, dataset_ids, indices = (np.concatenate(column) for column in zip(*parts))
    return SplitArrays(
        torch.from_numpy(images),
        torch.from_numpy(labels),
        torch.from_numpy(dataset_ids.astype(np.int64)),
        torch.from_numpy(indices.astype(np.int64)),
    )


def to_float_images(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float (B, 3, H, W) in [0, 1], channels-last in memory; run it on the device."""
    return images.permute(0, 3, 1, 2).float().div_(255)


class IndexBatches(Sampler):
    """Yields tensors of row numbers, one per batch, for this rank's share of an epoch.

    order="shuffle": a fresh permutation each epoch; "balanced": rows drawn with replacement so every
    dataset is seen equally often; "fixed": one permutation for every epoch (evaluation: the same
    images each time, and a capped number of batches still covers every dataset). Training orders give
    every rank the same number of batches, so DDP never waits on a rank that ran out, and only full
    batches (the few rows left over differ each epoch; fewer rows than a batch make one short batch):
    one shape, which a compiled model then compiles once.
    """

    def __init__(
        self,
        dataset_ids: torch.Tensor,
        batch_size: int,
        order: str,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        device: torch.device | str = "cpu",
    ):
        """device: where the row numbers go, the arrays' device (the order itself is drawn on the CPU)."""
        self.dataset_ids, self.batch_size, self.order = dataset_ids.cpu(), batch_size, order
        self.seed, self.rank, self.world_size, self.epoch = seed, rank, world_size, 0
        self.device = torch.device(device)

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning each epoch, so a resumed run sees the same order as an unbroken one."""
        self.epoch = epoch

    def _epoch_rows(self) -> torch.Tensor:
        n = len(self.dataset_ids)
        if self.order == "fixed":
            return torch.randperm(n, generator=torch.Generator().manual_seed(self.seed))[self.rank :: self.world_size]
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        if self.order == "balanced":
            per_dataset = torch.bincount(self.dataset_ids).float()
            weights = 1.0 / per_dataset[self.dataset_ids]
            rows = torch.multinomial(weights, n, replacement=True, generator=generator)
        else:
            rows = torch.randperm(n, generator=generator)
        usable = n - n % self.world_size
        rows = rows[self.rank : usable : self.world_size]
        full_batches = len(rows) // self.batch_size * self.batch_size
        return rows[:full_batches] if full_batches else rows

    def __iter__(self) -> Iterator[torch.Tensor]:
        return iter(self._epoch_rows().to(self.device).split(self.batch_size))  # one copy per epoch

    def __len__(self) -> int:
        return -(-len(self._epoch_rows()) // self.batch_size)

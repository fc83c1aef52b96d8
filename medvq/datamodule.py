"""The LightningDataModule of a run: whole splits loaded once as tensors (medvq/batches.py), on the GPU when they
fit, and batches sliced from them. Apart from batches.py, so that what reads images without training (the encoder's
actors, the figures) need not import Lightning."""

from __future__ import annotations

import logging

import lightning as L
import torch
from torch.utils.data import DataLoader

from medvq.batches import IndexBatches, SplitArrays, load_splits
from medvq.config import Config
from medvq.data import check_data

log = logging.getLogger(__name__)

# The train and val splits move to the GPU when they take at most this share of its free memory, leaving room
# for the model and for trials sharing the GPU (their sizes per image side: benchmarks/RESULTS.md).
DEVICE_MEMORY_SHARE = 0.25


class MedMNISTDataModule(L.LightningDataModule):
    """Loads whole splits once (`setup`) and serves batches sliced from them."""

    def __init__(self, config: Config):
        super().__init__()
        self.config = config

    def prepare_data(self) -> None:
        check_data(self.config)

    def setup(self, stage: str) -> None:
        load = lambda split: load_splits(self.config.datasets, split, self.config.data_root, self.config.size)
        self.train_arrays, self.val_arrays = load("train"), load("val")
        device = self.trainer.strategy.root_device
        if device.type == "cuda" and self._fit_on(device):
            self.train_arrays, self.val_arrays = self.train_arrays.to(device), self.val_arrays.to(device)

    def _fit_on(self, device: torch.device) -> bool:
        needed, (free, _) = self.train_arrays.nbytes + self.val_arrays.nbytes, torch.cuda.mem_get_info(device)
        if needed <= DEVICE_MEMORY_SHARE * free:
            return True
        log.info(
            "the train and val splits (%.1f GB) stay in host memory: more than %.0f%% of the GPU's free %.1f GB",
            needed / 1e9,
            DEVICE_MEMORY_SHARE * 100,
            free / 1e9,
        )
        return False

    def _loader(self, arrays: SplitArrays, order: str) -> DataLoader:
        device = arrays.images.device
        sampler = IndexBatches(
            arrays.dataset_ids,
            self.config.batch_size,
            order,
            self.config.seed,
            self.trainer.global_rank,
            self.trainer.world_size,
            device,
        )
        # Host arrays: pinned batches copy to a GPU asynchronously. Arrays on the GPU: nothing to copy.
        pin = device.type == "cpu" and torch.cuda.is_available()
        return DataLoader(arrays, sampler=sampler, batch_size=None, pin_memory=pin)

    def train_dataloader(self) -> DataLoader:
        order = "balanced" if self.config.mixing == "balanced" else "shuffle"
        return self._loader(self.train_arrays, order)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_arrays, "fixed")

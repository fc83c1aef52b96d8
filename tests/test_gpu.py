"""What only a GPU shows: whole splits resident on it, bf16 autocast with the codebook in float32, and a
compiled model. Skipped where no CUDA GPU is visible (CI); run on a lent GPU with benchmarks/device.sh."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from medvq.datamodule import MedMNISTDataModule
from medvq.module import VQVAEModule
from medvq.train import build_trainer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


class BatchDevices(L.Callback):
    """Records where each training batch and the split it came from live, and where the codebook's vectors and
    sums are after each step (read during training: Lightning moves the module back to the CPU once fit ends)."""

    def __init__(self):
        self.seen: set[tuple[str, str]] = set()
        self.codebook: set[tuple[str, torch.dtype, torch.dtype]] = set()

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.seen.add((batch["image"].device.type, trainer.datamodule.train_arrays.images.device.type))

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        codebook = module.model.quantizer.codebook
        self.codebook.add((codebook.embedding.device.type, codebook.embedding.dtype, codebook.embed_sum.dtype))


@pytest.mark.parametrize("compile_model", [False, True])
def test_gpu_training_keeps_splits_on_the_gpu_and_the_codebook_in_float32(tiny_config, compile_model):
    config = tiny_config(accelerator="gpu", epochs=2, compile_model=compile_model)
    devices = BatchDevices()
    trainer = build_trainer(config, callbacks=[devices], progress_bar=False)
    module = VQVAEModule(config)
    trainer.fit(module, datamodule=MedMNISTDataModule(config))
    assert trainer.precision == "bf16-mixed"
    assert devices.seen == {("cuda", "cuda")}
    assert devices.codebook == {("cuda", torch.float32, torch.float32)}
    assert torch.isfinite(module.model.quantizer.codebook.embedding).all()
    metrics = trainer.callback_metrics
    assert torch.isfinite(metrics["val_nmse"]) and torch.isfinite(metrics["train_loss"])

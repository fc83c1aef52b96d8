"""The seed project as its users ran it, kept as the benchmarks' baseline: a torchvision ResNet-18 stem
(random weights: the hub is unreachable and weights do not change speed), a 4x4 grid of 2-dim latents,
medvq's EMA quantizer with 512 codes, a residual transposed-conv decoder, and medmnist's own Dataset
classes with PIL transforms at 64x64, batches of 16, SGD."""

from __future__ import annotations

from pathlib import Path

import medmnist
import torch
from torch import nn
from torch.utils.data import ConcatDataset, DataLoader
from torchvision import transforms
from torchvision.models import resnet18

from medvq.data import dataset_info
from medvq.model import Quantized, ResidualBlock, VectorQuantizerEMA

SIDE = 64  # the seed upsampled MedMNIST's 28x28 to 64x64 for the ResNet stem
BATCH_SIZE = 16
LATENT_DIM = 2
CODEBOOK_SIZE = 512
COMMITMENT_WEIGHT = 0.25
MEAN = STD = (0.5, 0.5, 0.5)  # Normalize to [-1, 1]


def _upsample(channels_in: int, channels_out: int) -> list[nn.Module]:
    return [nn.ConvTranspose2d(channels_in, channels_out, 4, stride=2, padding=1), nn.ReLU()]


class SeedVQVAE(nn.Module):
    """(B, 3, 64, 64) in [-1, 1] -> reconstruction (B, 3, 64, 64) in [-1, 1] and the quantizer's output,
    the same interface as `medvq.model.VQVAE`."""

    def __init__(self):
        super().__init__()
        stem = resnet18(weights=None)
        self.encoder = nn.Sequential(
            stem.conv1,
            stem.bn1,
            stem.relu,
            stem.maxpool,
            stem.layer1,
            stem.layer2,  # (B, 128, 8, 8)
            nn.Conv2d(128, 64, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(64, LATENT_DIM, 1),  # (B, 2, 4, 4)
        )
        self.quantizer = VectorQuantizerEMA(
            CODEBOOK_SIZE, LATENT_DIM, COMMITMENT_WEIGHT, decay=0.99, dead_code_threshold=1.0
        )
        self.decoder = nn.Sequential(
            nn.Conv2d(LATENT_DIM, 128, 3, padding=1),
            ResidualBlock(128),
            ResidualBlock(128),
            nn.ReLU(),
            *_upsample(128, 128),
            *_upsample(128, 64),
            *_upsample(64, 32),  # 4x4 -> 32x32
            nn.ConvTranspose2d(32, 3, 4, stride=2, padding=1),
            nn.Tanh(),  # (B, 3, 64, 64)
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, Quantized]:
        q = self.quantizer(self.encoder(x))
        return self.decoder(q.quantized), q


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """Undo the seed's Normalize: [-1, 1] -> [0, 1]."""
    return images * STD[0] + MEAN[0]


def seed_transform(side: int | None = SIDE, normalize: bool = True) -> transforms.Compose:
    """The seed's PIL transform; `side=None, normalize=False` keeps 28x28 in [0, 1], which medvq's model expects."""
    steps = [transforms.Resize(side)] if side else []
    steps.append(transforms.ToTensor())
    if normalize:
        steps.append(transforms.Normalize(mean=list(MEAN), std=list(STD)))
    return transforms.Compose(steps)


def seed_dataset(datasets: tuple[str, ...], split: str, root: str | Path, transform) -> ConcatDataset:
    """medmnist's own Dataset classes (they read `root/<name>.npz`), concatenated in the order given."""
    return ConcatDataset(
        [
            getattr(medmnist, dataset_info(name)["python_class"])(
                split=split, root=str(root), as_rgb=True, size=28, transform=transform, download=False
            )
            for name in datasets
        ]
    )


def seed_loader(dataset: ConcatDataset) -> DataLoader:
    return DataLoader(dataset, batch_size=BATCH_SIZE, shuffle=True)


def seed_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9)

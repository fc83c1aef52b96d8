"""Encoder, decoder and the EMA vector quantizer of the VQ-VAE (van den Oord et al., 2017).

Tensors stay channels-first at module boundaries (B, C, H, W); the quantizer works on the latent grid
flattened channels-last, one D-dim vector per grid cell.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from medvq.config import Config

# 3: of the readings probed, only the hidden layer pooled 3x3 beat raw pixels as 11-NN and linear class probe on
# every set with the shipped model (results/probes/probes.md); the grid mean and other layouts did not
FEATURE_GRID = 3

# --- small helpers, so the quantizer reads as the algorithm -------------------------------------


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """Sum in place over all ranks (no-op in a single process)."""
    if _distributed():
        dist.all_reduce(tensor)
    return tensor


def broadcast_from_rank_zero_(tensor: torch.Tensor) -> torch.Tensor:
    """Rank 0's tensor on every rank, in place. An all-reduce of it and the other ranks' zeros (exact): torch.compile
    traces dist.all_reduce into its graph (as a functional collective), where dist.broadcast breaks the graph."""
    if _distributed():
        if dist.get_rank() != 0:  # zeroed, not multiplied by 0: another rank's inf or NaN must not spread
            tensor.zero_()
        dist.all_reduce(tensor)
    return tensor


def rank_spread(tensor: torch.Tensor) -> torch.Tensor:
    """The largest difference between ranks over the tensor's entries: 0 when every rank holds the same one."""
    if not _distributed():
        return tensor.new_zeros(())
    high, low = tensor.clone(), tensor.clone()
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    return (high - low).max()


def ema_inplace_(moving: torch.Tensor, new: torch.Tensor, decay: float) -> None:
    moving.mul_(decay).add_(new, alpha=1 - decay)


def laplace_smoothing(counts: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Counts nudged away from zero while keeping their total, so no code divides by zero."""
    total = counts.sum()
    return (counts + eps) / (total + len(counts) * eps) * total


def index_counts(indices: torch.Tensor, size: int, dtype: torch.dtype) -> torch.Tensor:
    """How often each index in [0, size) occurs (code indices, dataset ids): (N,) -> (size,). A scatter-add, not
    torch.bincount, which on a GPU reads the largest index back to the CPU and so waits for every queued kernel."""
    return torch.zeros(size, dtype=dtype, device=indices.device).index_add_(
        0, indices.flatten(), torch.ones(indices.numel(), dtype=dtype, device=indices.device)
    )


def squared_distances(x: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """||x - c||^2 as X^2 + C^2 - 2XC in one matmul: (N, D), (K, D) -> (N, K)."""
    return torch.addmm(x.pow(2).sum(1, keepdim=True) + codes.pow(2).sum(1), x, codes.t(), alpha=-2.0)


def kmeans_plus_plus(x: torch.Tensor, k: int) -> torch.Tensor:
    """k rows of x (N, D), each drawn with odds by its squared distance to those drawn before (Arthur and
    Vassilvitskii, 2007): a start from which Lloyd's steps rarely leave two centres in one cluster."""
    picks = [int(torch.randint(len(x), ()))]
    nearest = squared_distances(x, x[picks]).squeeze(1).clamp_min(0)
    for _ in range(k - 1):
        picks.append(int(torch.multinomial(nearest + 1e-12, 1)))
        nearest = torch.minimum(nearest, squared_distances(x, x[picks[-1:]]).squeeze(1).clamp_min(0))
    return x[picks]


def kmeans(x: torch.Tensor, k: int, iterations: int, l2: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means of the rows of x (N, D) from a k-means++ start: centres (K, D) and their sizes (K,). With `l2`,
    spherical k-means: the centres stay unit vectors. A centre that loses all its rows keeps its place."""
    centres = kmeans_plus_plus(x, k)
    for _ in range(iterations):
        assigned = squared_distances(x, centres).argmin(dim=1)
        sizes = index_counts(assigned, k, x.dtype)
        sums = torch.zeros_like(centres).index_add_(0, assigned, x)
        means = sums / sizes.clamp_min(1).unsqueeze(1)
        centres = torch.where(sizes.unsqueeze(1) > 0, F.normalize(means, dim=1) if l2 else means, centres)
    return centres, index_counts(squared_distances(x, centres).argmin(dim=1), k, x.dtype)


def rotated_onto(x: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """The rotation trick (Fifty et al., 2024): the codes' values, reached from x (N, D) by rotating each row onto its
    code's direction and rescaling. The rotation and scale are constants to autograd, so the encoder's gradient is
    rotated with them, where the straight-through estimator copies it unchanged."""
    x_norm, code_norm = x.norm(dim=1, keepdim=True).clamp_min(1e-12), codes.norm(dim=1, keepdim=True)
    u, q = (x / x_norm).detach(), (codes / code_norm.clamp_min(1e-12)).detach()
    w = F.normalize(u + q, dim=1).detach()
    # R = I - 2 w w^T + 2 q u^T takes u to q; applied to x without building a (D, D) matrix per row.
    rotated = x - 2 * (x * w).sum(1, keepdim=True) * w + 2 * (x * u).sum(1, keepdim=True) * q
    return rotated * (code_norm / x_norm).detach()


# --- the codebook -------------------------------------------------------------------------------


class EMACodebook(nn.Module):
    """K code vectors kept as an exponential moving average of the encoder outputs assigned to them.

    Buffers, not parameters: the codebook is never trained by gradient. Under torch.distributed every
    update uses counts and sums all-reduced over ranks, and re-seeds come from rank 0, so all ranks
    hold the same codebook.
    """

    def __init__(self, codebook_size: int, dim: int, decay: float, dead_code_threshold: float, l2: bool = False):
        super().__init__()
        self.decay, self.dead_code_threshold, self.l2 = decay, dead_code_threshold, l2
        embedding = F.normalize(torch.randn(codebook_size, dim), dim=1) if l2 else torch.randn(codebook_size, dim)
        self.register_buffer("embedding", embedding)  # (K, D)
        # Start every code as if it had won one vector already: an unused code then decays slowly
        # towards zero weight instead of jumping to 0/eps on the first step.
        self.register_buffer("cluster_size", torch.ones(codebook_size))  # (K,)
        self.register_buffer("embed_sum", embedding.clone())  # (K, D)

    def nearest(self, x: torch.Tensor) -> torch.Tensor:
        """Index of the nearest code for each row of x (N, D) -> (N,)."""
        return squared_distances(x, self.embedding).argmin(dim=1)

    def update_ema_(self, x: torch.Tensor, indices: torch.Tensor) -> None:
        """One K-means-style EMA step from this batch's assignments (all ranks together)."""
        # Scatter-adds, not a one-hot (N, K) matrix and a matmul: faster on a CPU (benchmarks/RESULTS.md), and
        # no N x K buffer on a GPU.
        counts = all_reduce_sum_(index_counts(indices, len(self.embedding), x.dtype))  # (K,)
        sums = all_reduce_sum_(torch.zeros_like(self.embed_sum).index_add_(0, indices, x))  # (K, D)
        ema_inplace_(self.cluster_size, counts, self.decay)
        ema_inplace_(self.embed_sum, sums, self.decay)
        means = self.embed_sum / laplace_smoothing(self.cluster_size).unsqueeze(1)
        self.embedding.copy_(F.normalize(means, dim=1) if self.l2 else means)

    def init_from_kmeans_(self, x: torch.Tensor, iterations: int = 10) -> None:
        """Codes := k-means centres of x (N, D), rank 0's on every rank, with their sizes as the moving counts."""
        centres, sizes = kmeans(x, len(self.embedding), iterations, l2=self.l2)
        self.embedding.copy_(broadcast_from_rank_zero_(centres.contiguous()))
        self.cluster_size.copy_(broadcast_from_rank_zero_(sizes))
        self.embed_sum.copy_(self.embedding * self.cluster_size.unsqueeze(1))

    def rank_spread(self) -> torch.Tensor:
        """How far the ranks' codebooks differ (0 when DDP kept them equal), over all three buffers."""
        return torch.stack(
            [rank_spread(buffer) for buffer in (self.embedding, self.cluster_size, self.embed_sum)]
        ).max()

    def reseed_dead_codes_(self, x: torch.Tensor) -> None:
        """Move codes that have stopped winning onto random current encoder outputs.

        Without a branch on whether any code is dead: asking would make the CPU wait for the GPU every step.
        """
        dead = self.cluster_size < self.dead_code_threshold  # identical on every rank: all-reduced counts
        picks = torch.randint(len(x), (len(self.embedding),), device=x.device)
        candidates = broadcast_from_rank_zero_(x[picks].contiguous())  # (K, D), rank 0's choice for all
        self.embedding.copy_(torch.where(dead.unsqueeze(1), candidates, self.embedding))
        self.embed_sum.copy_(torch.where(dead.unsqueeze(1), candidates * self.dead_code_threshold, self.embed_sum))
        self.cluster_size.masked_fill_(dead, self.dead_code_threshold)


# --- the quantizer ------------------------------------------------------------------------------


class Quantized(NamedTuple):
    quantized: torch.Tensor  # (B, D, H, W), straight-through in training
    indices: torch.Tensor  # (B, H, W) code index per latent cell
    commitment_loss: torch.Tensor  # scalar, already weighted


class VectorQuantizerEMA(nn.Module):
    """Nearest-code quantization with an EMA codebook; the gradient passes it straight through, or rotated."""

    def __init__(
        self,
        codebook_size: int,
        dim: int,
        commitment_weight: float,
        *,
        decay: float,
        dead_code_threshold: float,
        l2: bool = False,
        rotation: bool = False,
    ):
        super().__init__()
        self.commitment_weight, self.l2, self.rotation = commitment_weight, l2, rotation
        self.codebook = EMACodebook(codebook_size, dim, decay, dead_code_threshold, l2=l2)

    def flatten(self, z: torch.Tensor) -> torch.Tensor:
        """(B, D, H, W) -> (B*H*W, D) in float32, channels-last: the vectors codes are looked up for (unit vectors
        with l2 codes)."""
        flat = z.float().permute(0, 2, 3, 1).reshape(-1, z.shape[1])
        return F.normalize(flat, dim=1) if self.l2 else flat

    def forward(self, z: torch.Tensor) -> Quantized:
        batch, dim, height, width = z.shape
        # The codebook maths runs in float32 even under bf16/fp16 autocast: distances and EMA sums
        # lose too much in half precision.
        with torch.autocast(device_type=z.device.type, enabled=False):
            flat = self.flatten(z)  # (B*H*W, D)
            indices = self.codebook.nearest(flat)  # (B*H*W,)
            if self.training:
                with torch.no_grad():
                    self.codebook.update_ema_(flat.detach(), indices)
                    self.codebook.reseed_dead_codes_(flat.detach())
            codes = self.codebook.embedding[indices]  # (B*H*W, D)
            commitment = self.commitment_weight * F.mse_loss(flat, codes.detach())
            if self.training:  # the gradient flows on to the encoder
                codes = rotated_onto(flat, codes) if self.rotation else flat + (codes - flat).detach()
        quantized = codes.view(batch, height, width, dim).permute(0, 3, 1, 2)  # (B, D, H, W)
        return Quantized(quantized, indices.view(batch, height, width), commitment)

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """Code vectors for a grid of indices: (B, H, W) -> (B, D, H, W)."""
        return self.codebook.embedding[indices].permute(0, 3, 1, 2)


# --- encoder and decoder ------------------------------------------------------------------------


class ResidualBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.block = nn.Sequential(
            nn.ReLU(),
            nn.Conv2d(channels, channels // 2, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(channels // 2, channels, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x)


def _residual_stack(channels: int, blocks: int) -> nn.Sequential:
    return nn.Sequential(*(ResidualBlock(channels) for _ in range(blocks)), nn.ReLU())


class Encoder(nn.Module):
    """(B, 3, S, S) in [0, 1] -> (B, D, S / 2**downsample, S / 2**downsample)."""

    def __init__(self, hidden: int, residual_blocks: int, downsample: int, dim: int):
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for stage in range(downsample):
            out = hidden if stage == downsample - 1 else hidden // 2
            layers += [nn.Conv2d(channels, out, 4, stride=2, padding=1), nn.ReLU()]
            channels = out
        layers += [
            nn.Conv2d(hidden, hidden, 3, padding=1),
            _residual_stack(hidden, residual_blocks),
            nn.Conv2d(hidden, dim, 1),
        ]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        """The last hidden layer, (B, hidden, s, s): what the final 1x1 convolution projects into the code space."""
        return self.net[:-1](x)

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.net[-1](hidden)


def pooled_features(hidden: torch.Tensor, grid: int = FEATURE_GRID) -> torch.Tensor:
    """An image's features: its encoder's last hidden layer (B, C, s, s) averaged over a grid x grid layout of the
    latent grid -> (B, C * grid**2), row-major over the layout, channels within each cell. The same length at
    every image size."""
    return F.adaptive_avg_pool2d(hidden, grid).permute(0, 2, 3, 1).flatten(1)


class Decoder(nn.Module):
    """(B, D, s, s) -> (B, 3, s * 2**upsample, s * 2**upsample) in [0, 1]."""

    def __init__(self, hidden: int, residual_blocks: int, upsample: int, dim: int):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(dim, hidden, 3, padding=1), _residual_stack(hidden, residual_blocks)]
        channels = hidden
        for stage in range(upsample):
            last = stage == upsample - 1
            out = 3 if last else hidden // 2
            layers += [nn.ConvTranspose2d(channels, out, 4, stride=2, padding=1), nn.Sigmoid() if last else nn.ReLU()]
            channels = out
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


class VQVAE(nn.Module):
    def __init__(self, config: Config):
        super().__init__()
        c = config
        self.encoder = Encoder(c.hidden_channels, c.residual_blocks, c.downsample, c.embedding_dim)
        self.quantizer = VectorQuantizerEMA(
            c.codebook_size,
            c.embedding_dim,
            c.commitment_weight,
            decay=c.ema_decay,
            dead_code_threshold=c.dead_code_threshold,
            l2=c.l2_codes,
            rotation=c.gradient == "rotation",
        )
        self.decoder = Decoder(c.hidden_channels, c.residual_blocks, c.downsample, c.embedding_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, Quantized]:
        """(B, 3, S, S) -> reconstruction (B, 3, S, S) and the quantizer's output."""
        q = self.quantizer(self.encoder(x))
        return self.decoder(q.quantized), q

    def forward_with_features(self, x: torch.Tensor) -> tuple[torch.Tensor, Quantized, torch.Tensor]:
        """forward, and each image's features (pooled_features), (B, hidden_channels * FEATURE_GRID**2)."""
        hidden = self.encoder.hidden(x)
        q = self.quantizer(self.encoder.project(hidden))
        return self.decoder(q.quantized), q, pooled_features(hidden)

    @torch.no_grad()
    def init_codebook_from_kmeans_(self, x: torch.Tensor) -> None:
        """The codebook := k-means centres of this batch's encoder outputs (B, 3, S, S) images."""
        with torch.autocast(device_type=x.device.type, enabled=False):
            self.quantizer.codebook.init_from_kmeans_(self.quantizer.flatten(self.encoder(x)))

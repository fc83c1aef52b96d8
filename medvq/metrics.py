"""The metrics of an epoch, per image and per dataset: PSNR, SSIM, MAE, the tuning objective and codebook use.

Each stage accumulates torchmetrics objects every step and logs their values once per epoch, so a step
costs little Python beyond the model itself: on a GPU that overhead, not the arithmetic, bounds the
images per second. Image scores are per-image means.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanMetric, Metric
from torchmetrics.functional.image import peak_signal_noise_ratio

from medvq.config import Config
from medvq.model import index_counts

IMAGE_SCORES = ("psnr", "ssim", "mae")
LOSSES = ("loss", "recon_loss", "commitment_loss")
SSIM_WINDOW, SSIM_SIGMA = 11, 1.5  # the Gaussian window of Wang et al. (2004), torchmetrics' default
SSIM_C1, SSIM_C2 = 0.01**2, 0.03**2  # (k * data range)^2 for images in [0, 1]


def structural_similarity(recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-image SSIM, (B, C, H, W) x 2 in [0, 1] -> (B,): torchmetrics' value (reflect-padded Gaussian window,
    averaged over every pixel and channel), cheap enough to train on (Config.ssim_weight) and differentiable."""
    # float32 even under bf16 autocast: the variances are differences of near-equal means
    with torch.autocast(device_type=recon.device.type, enabled=False):
        return _similarity_map(recon.float(), target.float()).mean(dim=(1, 2, 3))


def gaussian_blur_matrix(side: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(side, side) R such that rows @ R is the SSIM window along the rows, reflect padding included: the blur as a
    matrix product, faster on a CPU than a depthwise convolution of the padded images, up to 224 px at least
    (benchmarks/RESULTS.md)."""
    pad = SSIM_WINDOW // 2
    offsets = torch.arange(SSIM_WINDOW, dtype=dtype, device=device) - pad
    window = torch.exp(-(offsets**2) / (2 * SSIM_SIGMA**2))
    basis = F.pad(torch.eye(side, dtype=dtype, device=device).unsqueeze(1), (pad, pad), mode="reflect")
    return F.conv1d(basis, (window / window.sum()).view(1, 1, -1)).squeeze(1)  # row j: the blur of pixel j


def _similarity_map(recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    along_width = gaussian_blur_matrix(recon.shape[-1], recon.dtype, recon.device)
    along_height = gaussian_blur_matrix(recon.shape[-2], recon.dtype, recon.device)
    stacked = torch.cat([recon, target, recon * recon, target * target, recon * target], dim=1)
    mu_a, mu_b, aa, bb, ab = (along_height.t() @ stacked @ along_width).chunk(5, dim=1)
    var_a, var_b = (aa - mu_a**2).clamp_min(0), (bb - mu_b**2).clamp_min(0)
    covariance = ab - mu_a * mu_b
    return ((2 * mu_a * mu_b + SSIM_C1) * (2 * covariance + SSIM_C2)) / (
        (mu_a**2 + mu_b**2 + SSIM_C1) * (var_a + var_b + SSIM_C2)
    )


def image_scores(
    recon: torch.Tensor, target: torch.Tensor, ssim: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """Per-image MAE, PSNR (dB) and SSIM for images in [0, 1]: (B, 3, H, W) x 2 -> {name: (B,)}; `ssim`, when the
    caller has it already (the loss's), is used as it is."""
    recon, target = recon.float(), target.float()
    return {
        "mae": (recon - target).abs().mean(dim=(1, 2, 3)),
        "psnr": peak_signal_noise_ratio(recon, target, data_range=1.0, reduction="none", dim=(1, 2, 3)),
        "ssim": structural_similarity(recon, target) if ssim is None else ssim.detach().float(),
    }


class CodeUsage(Metric):
    """How often each code was chosen over the epoch -> perplexity, exp(entropy) of the usage (K when all
    codes are used evenly), and the share of the codebook chosen at least once (codebook health)."""

    full_state_update = False

    def __init__(self, codebook_size: int):
        super().__init__()
        self.add_state("counts", torch.zeros(codebook_size, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, indices: torch.Tensor) -> None:
        self.counts += index_counts(indices, len(self.counts), self.counts.dtype)

    def compute(self) -> dict[str, torch.Tensor]:
        p = self.counts / self.counts.sum()
        perplexity = torch.exp(-(p * torch.log(p.clamp_min(1e-12))).sum())
        return {"perplexity": perplexity.float(), "codes_used": (self.counts > 0).float().mean()}


class DatasetMeans(Metric):
    """Means of per-image scores over the epoch, per dataset and over all images."""

    full_state_update = False

    def __init__(self, n_datasets: int, n_scores: int):
        super().__init__()
        self.add_state("sums", torch.zeros(n_datasets, n_scores, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("counts", torch.zeros(n_datasets, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, scores: torch.Tensor, dataset_ids: torch.Tensor) -> None:
        """scores (B, S) of B images from datasets dataset_ids (B,)."""
        self.sums.index_add_(0, dataset_ids, scores.double())
        self.counts += index_counts(dataset_ids, len(self.counts), self.counts.dtype)

    def compute(self) -> dict[str, torch.Tensor]:
        """{"per_dataset": (n_datasets, S), NaN for a dataset without images; "all": (S,)}."""
        return {
            "per_dataset": (self.sums / self.counts.unsqueeze(1)).float(),
            "all": (self.sums.sum(0) / self.counts.sum()).float(),
        }


class MeanNormalizedMSE(Metric):
    """The tuning objective: per dataset, MSE / pixel variance of its targets, averaged over datasets.

    Dividing by each set's variance makes the sets comparable, and averaging over sets (not images)
    keeps BloodMNIST's 12k images from outweighing BreastMNIST's 546.
    """

    full_state_update = False

    def __init__(self, n_datasets: int):
        super().__init__()
        for name in ("squared_error", "pixel_sum", "pixel_square_sum", "pixel_count"):
            self.add_state(name, torch.zeros(n_datasets, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, recon: torch.Tensor, target: torch.Tensor, dataset_ids: torch.Tensor) -> None:
        recon, target = recon.double().flatten(1), target.double().flatten(1)  # (B, P)
        self.squared_error.index_add_(0, dataset_ids, (recon - target).pow(2).sum(1))
        self.pixel_sum.index_add_(0, dataset_ids, target.sum(1))
        self.pixel_square_sum.index_add_(0, dataset_ids, target.pow(2).sum(1))
        self.pixel_count.index_add_(0, dataset_ids, torch.full_like(target[:, 0], target.shape[1]))

    def compute(self) -> torch.Tensor:
        seen = self.pixel_count > 0
        count = self.pixel_count[seen]
        variance_times_count = self.pixel_square_sum[seen] - self.pixel_sum[seen].pow(2) / count
        return (self.squared_error[seen] / variance_times_count).mean().float()


class StageMetrics(nn.Module):
    """One stage's (train or val) epoch metrics: updated every step (a few tensor operations), computed and
    reset once per epoch (each `compute` synchronises over DDP ranks).

    scored_images: score only the batch's first rows (shuffled, so an unbiased sample) with PSNR, SSIM and
    MAE: SSIM of a whole batch costs a large share of a CPU training step (benchmarks/RESULTS.md). A step that
    passes the whole batch's SSIM (the loss's SSIM term computed it) scores every row.
    """

    def __init__(self, config: Config, scored_images: int | None = None):
        super().__init__()
        self.scored_images = scored_images
        n_datasets = len(config.datasets)
        self.nmse = MeanNormalizedMSE(n_datasets)
        self.scores = DatasetMeans(n_datasets, len(IMAGE_SCORES))
        # nan_strategy "disable": the default checks every update for NaNs, a GPU-to-CPU wait each step.
        self.losses = nn.ModuleDict({name: MeanMetric(nan_strategy="disable") for name in LOSSES})
        self.code_usage = CodeUsage(config.codebook_size)

    def update(
        self,
        x: torch.Tensor,
        recon: torch.Tensor,
        indices: torch.Tensor,
        losses: dict[str, torch.Tensor],
        dataset_ids: torch.Tensor,
        ssim: torch.Tensor | None = None,
    ) -> None:
        """ssim: every row's SSIM (B,), when the step has it already."""
        self.nmse.update(recon, x, dataset_ids)
        scored = slice(self.scored_images if ssim is None else None)
        scores = image_scores(recon[scored], x[scored], ssim)
        self.scores.update(torch.stack([scores[name] for name in IMAGE_SCORES], dim=1), dataset_ids[scored])
        for name, value in losses.items():
            self.losses[name].update(value.detach(), weight=torch.full_like(value, len(x)))
        self.code_usage.update(indices)

    def compute_and_reset(self, datasets: tuple[str, ...] | None = None) -> dict[str, torch.Tensor]:
        """{name: value}, the objective and image scores first; per-dataset scores too if `datasets` is given."""
        scores = self.scores.compute()
        values = {
            "nmse": self.nmse.compute(),
            **dict(zip(IMAGE_SCORES, scores["all"])),
            **{name: metric.compute() for name, metric in self.losses.items()},
            **self.code_usage.compute(),
        }
        for d, dataset in enumerate(datasets or ()):
            values.update({f"{name}_{dataset}": value for name, value in zip(IMAGE_SCORES, scores["per_dataset"][d])})
        for metric in (self.nmse, self.scores, self.code_usage, *self.losses.values()):
            metric.reset()
        return values

"""The metrics of an epoch, per image and per dataset: PSNR, SSIM, MAE, the tuning objective and codebook use.

Each stage adds every step's sums into a few device tensors, with no Python that looks at their values, so the
step never waits for its device and compiles into one graph with the model (Config.compile_model); the sums are
read once per epoch, all-reduced over DDP ranks. Image scores are per-image means.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from medvq.config import Config
from medvq.model import all_reduce_sum_, index_counts

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
        "psnr": -10 * (recon - target).pow(2).mean(dim=(1, 2, 3)).log10(),  # 10 log10(1 / mse): data range 1
        "ssim": structural_similarity(recon, target) if ssim is None else ssim.detach().float(),
    }


def accumulator_dtype() -> torch.dtype:
    """The epoch sums' dtype: float64 where the device has it, as the normalised MSE is the difference of two epoch
    sums of near-equal size (squared pixels; the squared pixel sum over the count), in which float32's rounding
    over 1e5 images can reach the fourth digit. Apple's GPU (MPS) has no float64, so a Mac sums in float32."""
    return torch.float32 if torch.backends.mps.is_available() else torch.float64


class StageMetrics(nn.Module):
    """One stage's (train or val) epoch metrics: sums updated every step (a few tensor operations, no reads of their
    values), read, all-reduced over DDP ranks and reset once per epoch by `compute_and_reset`.

    scored_images: score only the batch's first rows (shuffled, so an unbiased sample) with PSNR, SSIM and
    MAE: SSIM of a whole batch costs a large share of a CPU training step (benchmarks/RESULTS.md). A step that
    passes the whole batch's SSIM (the loss's SSIM term computed it) scores every row.
    """

    def __init__(self, config: Config, scored_images: int | None = None):
        super().__init__()
        self.scored_images = scored_images
        n_datasets = len(config.datasets)
        shapes = {
            "pixel_sums": (n_datasets, 4),  # per dataset: squared error, pixel sum, squared pixel sum, pixel count
            "score_sums": (n_datasets, len(IMAGE_SCORES)),  # per dataset, of the per-image scores
            "scored": (n_datasets,),  # images scored, per dataset
            "loss_sums": (len(LOSSES),),  # each batch's loss times its images
            "images": (1,),  # not 0-d: torch.compile would guard on its value
            "code_counts": (config.codebook_size,),  # how often each code was chosen
        }
        for name, shape in shapes.items():  # not persistent: checkpoints keep their keys, old ones load
            self.register_buffer(name, torch.zeros(shape, dtype=accumulator_dtype()), persistent=False)

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
        dtype = self.pixel_sums.dtype
        recon_flat, target = recon.to(dtype).flatten(1), x.to(dtype).flatten(1)  # (B, P)
        pixels = [
            (recon_flat - target).pow(2).sum(1),
            target.sum(1),
            target.pow(2).sum(1),
            target.new_full((len(x),), target.shape[1]),
        ]
        self.pixel_sums.index_add_(0, dataset_ids, torch.stack(pixels, dim=1))  # (B, 4)
        scored = slice(self.scored_images if ssim is None else None)
        scores = image_scores(recon[scored], x[scored], ssim)
        self.score_sums.index_add_(0, dataset_ids[scored], torch.stack([scores[n] for n in IMAGE_SCORES], 1).to(dtype))
        self.scored += index_counts(dataset_ids[scored], len(self.scored), dtype)
        self.loss_sums += torch.stack([losses[name].detach() for name in LOSSES]).to(dtype) * len(x)
        self.images += len(x)
        self.code_counts += index_counts(indices, len(self.code_counts), dtype)

    def compute_and_reset(self, datasets: tuple[str, ...] | None = None) -> dict[str, torch.Tensor]:
        """{name: value}, the objective and image scores first; per-dataset scores too if `datasets` is given."""
        buffers = dict(self.named_buffers())
        summed = all_reduce_sum_(torch.cat([buffer.flatten() for buffer in buffers.values()]))  # one collective
        sums = {
            name: part.view_as(buffer)
            for (name, buffer), part in zip(buffers.items(), summed.split([b.numel() for b in buffers.values()]))
        }
        for buffer in buffers.values():
            buffer.zero_()
        squared_error, pixel_sum, pixel_square_sum, pixel_count = sums["pixel_sums"].unbind(1)
        per_dataset_nmse = squared_error / (pixel_square_sum - pixel_sum.pow(2) / pixel_count)  # MSE / variance
        seen = pixel_count > 0
        scores = sums["score_sums"] / sums["scored"].unsqueeze(1)  # (n_datasets, S), NaN for a set without images
        values = {
            "nmse": (torch.where(seen, per_dataset_nmse, 0).sum() / seen.sum()).float(),
            **dict(zip(IMAGE_SCORES, (sums["score_sums"].sum(0) / sums["scored"].sum()).float())),
            **dict(zip(LOSSES, (sums["loss_sums"] / sums["images"]).float())),
            **code_usage(sums["code_counts"]),
        }
        for d, dataset in enumerate(datasets or ()):
            values.update({f"{name}_{dataset}": value for name, value in zip(IMAGE_SCORES, scores[d].float())})
        return values


def code_usage(counts: torch.Tensor) -> dict[str, torch.Tensor]:
    """How often each code was chosen (K,) -> perplexity, exp(entropy) of the usage (K when all codes are used
    evenly), and the share of the codebook chosen at least once (codebook health)."""
    p = counts / counts.sum()
    perplexity = torch.exp(-(p * torch.log(p.clamp_min(1e-12))).sum())
    return {"perplexity": perplexity.float(), "codes_used": (counts > 0).float().mean()}

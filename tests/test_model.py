"""medvq.model: distances, the EMA codebook, the straight-through quantizer, the VQ-VAE's shapes."""

from __future__ import annotations

import copy
import datetime
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from medvq.model import (
    FEATURE_GRID,
    VQVAE,
    VectorQuantizerEMA,
    kmeans,
    laplace_smoothing,
    pooled_features,
    rotated_onto,
    squared_distances,
)
from medvq.module import constant_then_cooldown, warmup_cosine


def grid(rows: torch.Tensor) -> torch.Tensor:
    """(N, D) -> (1, D, 1, N): a latent grid whose flattened, channels-last rows are `rows` in order."""
    return rows.t().reshape(1, rows.shape[1], 1, rows.shape[0])


def buffers(quantizer: VectorQuantizerEMA) -> dict[str, torch.Tensor]:
    return {name: tensor.clone() for name, tensor in quantizer.codebook.named_buffers()}


# --- helpers --------------------------------------------------------------------------------------


def test_squared_distances_match_cdist():
    generator = torch.Generator().manual_seed(0)
    x, codes = torch.randn(300, 16, generator=generator), torch.randn(64, 16, generator=generator)
    distances, reference = squared_distances(x, codes), torch.cdist(x, codes)
    assert distances.shape == (300, 64)
    assert torch.allclose(distances, reference**2, rtol=1e-4, atol=1e-4)
    assert torch.equal(distances.argmin(1), reference.argmin(1))


def test_laplace_smoothing_keeps_the_total_and_lifts_zeros():
    counts = torch.tensor([0.0, 3.0, 7.0])
    smoothed = laplace_smoothing(counts)
    assert torch.isclose(smoothed.sum(), counts.sum()) and (smoothed > 0).all()
    assert torch.allclose(smoothed, counts, atol=1e-4)


# --- the EMA codebook -----------------------------------------------------------------------------


def test_ema_step_equals_the_closed_form():
    decay, eps = 0.8, 1e-5
    quantizer = VectorQuantizerEMA(codebook_size=3, dim=2, commitment_weight=0.25, decay=decay, dead_code_threshold=0)
    codebook = quantizer.codebook
    codebook.embedding.copy_(torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]]))
    codebook.cluster_size.copy_(torch.tensor([1.0, 2.0, 0.0]))  # code 2: 0/0 without smoothing
    codebook.embed_sum.copy_(codebook.embedding * codebook.cluster_size[:, None])
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [9.0, 1.0], [11.0, -1.0], [0.5, 0.5]])
    assignments = torch.tensor([0, 0, 1, 1, 0])  # code 2 wins nothing
    counts = torch.tensor([3.0, 2.0, 0.0])
    sums = torch.tensor([[1.5, 1.5], [20.0, 0.0], [0.0, 0.0]])

    cluster_size, embed_sum = codebook.cluster_size.clone(), codebook.embed_sum.clone()
    for _ in range(2):
        cluster_size = decay * cluster_size + (1 - decay) * counts
        embed_sum = decay * embed_sum + (1 - decay) * sums
        total = cluster_size.sum()
        smoothed = (cluster_size + eps) / (total + 3 * eps) * total
        indices = quantizer(grid(x)).indices
        assert torch.equal(indices.flatten(), assignments)
        assert torch.allclose(codebook.cluster_size, cluster_size)
        assert torch.allclose(codebook.embed_sum, embed_sum)
        assert torch.allclose(codebook.embedding, embed_sum / smoothed[:, None])


def test_dead_codes_are_reseeded_onto_current_inputs():
    threshold, decay = 0.9, 0.5
    torch.manual_seed(0)
    quantizer = VectorQuantizerEMA(16, 4, 0.25, decay=decay, dead_code_threshold=threshold)
    codebook = quantizer.codebook
    codebook.embedding[1:] += 100  # every input is nearest to code 0: codes 1.. win nothing
    codebook.embed_sum.copy_(codebook.embedding)
    x = 0.1 * torch.randn(64, 4)
    quantizer(grid(x))
    for code in range(1, 16):
        assert (codebook.embedding[code] == x).all(dim=1).any(), f"code {code} is not an input row"
    assert torch.equal(codebook.cluster_size[1:], torch.full((15,), threshold))
    assert torch.allclose(codebook.embed_sum[1:], codebook.embedding[1:] * threshold)
    assert codebook.cluster_size[0] > threshold and not (codebook.embedding[0] == x).all(dim=1).any()


# --- the quantizer --------------------------------------------------------------------------------


def test_codebook_is_a_buffer_and_gradients_pass_straight_through(tiny_config):
    torch.manual_seed(0)
    model = VQVAE(tiny_config())
    assert "quantizer.codebook.embedding" in dict(model.named_buffers())
    assert all(p is not model.quantizer.codebook.embedding for p in model.parameters())
    x = torch.rand(4, 3, 28, 28)
    reconstruction, q = model(x)
    assert torch.allclose(q.quantized, model.quantizer.lookup(q.indices), atol=1e-6)  # forward value: the codes
    F.mse_loss(reconstruction, x).backward()  # no commitment term: the encoder's gradient comes straight through
    for name, parameter in model.encoder.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    assert model.quantizer.codebook.embedding.grad is None


def test_eval_output_is_the_lookup_of_its_indices_and_leaves_the_codebook_alone():
    torch.manual_seed(0)
    quantizer = VectorQuantizerEMA(32, 8, 0.25, decay=0.99, dead_code_threshold=1.0).eval()
    before = buffers(quantizer)
    q = quantizer(torch.randn(3, 8, 5, 5))
    assert torch.equal(q.quantized, quantizer.lookup(q.indices))
    assert all(torch.equal(before[name], after) for name, after in buffers(quantizer).items())


def test_quantizer_runs_in_float32_under_autocast():
    torch.manual_seed(0)
    quantizer = VectorQuantizerEMA(512, 64, 0.25, decay=0.99, dead_code_threshold=1.0)
    reference = copy.deepcopy(quantizer)
    z = torch.randn(8, 64, 7, 7).bfloat16()  # what an encoder under bf16 autocast hands over
    torch.manual_seed(1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        q = quantizer(z)
    torch.manual_seed(1)
    expected = reference(z.float())
    assert torch.equal(q.indices, expected.indices)
    assert q.quantized.dtype == torch.float32 and q.commitment_loss.dtype == torch.float32
    for name, tensor in buffers(quantizer).items():
        assert tensor.dtype == torch.float32 and torch.equal(tensor, buffers(reference)[name]), name


# --- the model options: l2 codes, k-means start, the rotation trick, the schedule ---------------------


def test_l2_codes_are_found_by_cosine_similarity_among_unit_vectors():
    torch.manual_seed(0)
    quantizer = VectorQuantizerEMA(64, 8, 0.25, decay=0.9, dead_code_threshold=0.0, l2=True).train()
    z = 5 * torch.randn(4, 8, 3, 3)  # long vectors: only their directions may matter
    q = quantizer(z)
    unit = F.normalize(z.permute(0, 2, 3, 1).reshape(-1, 8), dim=1)
    codes = quantizer.codebook.embedding
    assert torch.allclose(codes.norm(dim=1), torch.ones(64), atol=1e-5)  # still unit vectors after the EMA step
    # for unit vectors X^2 + C^2 - 2XC is 2 - 2 cos: the nearest code is the most similar direction
    assert torch.allclose(squared_distances(unit, codes), 2 - 2 * unit @ codes.t(), atol=1e-5)
    assert torch.equal(quantizer.eval()(z).indices.flatten(), (unit @ codes.t()).argmax(1))
    assert torch.allclose(q.quantized.norm(dim=1), torch.ones(4, 3, 3), atol=1e-5)


def test_kmeans_finds_known_clusters_and_starts_the_codebook_there():
    generator = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]])
    x = torch.cat([centre + 0.1 * torch.randn(50, 2, generator=generator) for centre in centres])
    torch.manual_seed(3)
    found, sizes = kmeans(x, 4, iterations=10)
    order = [int(squared_distances(centre[None], found).argmin()) for centre in centres]
    assert sorted(order) == [0, 1, 2, 3] and torch.allclose(found[order], centres, atol=0.1)
    assert torch.equal(sizes[order], torch.full((4,), 50.0))
    quantizer = VectorQuantizerEMA(4, 2, 0.25, decay=0.99, dead_code_threshold=1.0)
    torch.manual_seed(3)
    quantizer.codebook.init_from_kmeans_(x)
    codebook = quantizer.codebook
    assert torch.allclose(codebook.embedding, found) and torch.equal(codebook.cluster_size, sizes)
    assert torch.allclose(codebook.embed_sum, found * 50)


def test_a_model_with_kmeans_init_starts_its_codebook_from_the_first_batch(tiny_config):
    torch.manual_seed(0)
    model = VQVAE(tiny_config(kmeans_init=True))
    x = torch.rand(8, 3, 28, 28)
    model.init_codebook_from_kmeans_(x)
    encoded = model.quantizer.flatten(model.encoder(x)).detach()
    nearest = squared_distances(encoded, model.quantizer.codebook.embedding).min(dim=1).values
    random_codes = torch.randn_like(model.quantizer.codebook.embedding)
    assert nearest.mean() < squared_distances(encoded, random_codes).min(dim=1).values.mean() / 10


def test_the_rotation_trick_gives_the_codes_and_turns_the_gradient_without_stretching_its_direction():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(5, 6, generator=generator, requires_grad=True)
    codes = torch.randn(5, 6, generator=generator)
    rotated = rotated_onto(x, codes)
    assert torch.allclose(rotated, codes, atol=1e-5)  # forward: exactly the codes
    upstream = torch.randn(5, 6, generator=generator)
    rotated.backward(upstream)
    # The gradient is R^T upstream scaled by |c|/|x|: a rotation keeps its length, so only the scale changes it.
    scale = codes.norm(dim=1) / x.detach().norm(dim=1)
    assert torch.allclose(x.grad.norm(dim=1), upstream.norm(dim=1) * scale, rtol=1e-4)
    assert not torch.allclose(x.grad, upstream * scale[:, None])  # not a copy: turned


def test_the_cosine_schedule_warms_up_then_decays_to_zero():
    steps = 1000
    factors = [warmup_cosine(step, steps) for step in range(steps)]
    assert factors[0] == pytest.approx(1 / 50) and factors[49] == pytest.approx(1.0)  # 5% warm-up
    assert all(a >= b for a, b in zip(factors[49:], factors[50:]))
    assert factors[-1] < 1e-4 and warmup_cosine(525, steps) == pytest.approx(0.5, abs=1e-2)


@pytest.mark.parametrize("share", [0.2, 0.4])
def test_the_cooldown_schedule_holds_then_decays_linearly_over_its_share_of_the_steps(share):
    steps = 1000
    start = round(steps * (1 - share))
    factors = [constant_then_cooldown(step, steps, share) for step in range(steps)]
    assert set(factors[: start + 1]) == {1.0}
    assert factors[(start + steps) // 2] == pytest.approx(0.5)
    assert factors[-1] == pytest.approx(1 / (share * steps))  # the last step still learns
    assert all(a > b for a, b in zip(factors[start:], factors[start + 1 :]))


# --- DDP: two gloo processes ----------------------------------------------------------------------

DDP_STEPS, DDP_THRESHOLDS = 3, {"reseed": 0.95, "no_reseed": 0.0}


def ddp_batches(rank: int) -> list[torch.Tensor]:
    """Different data on each rank, crowded near one point so that most codes die."""
    generator = torch.Generator().manual_seed(100 + rank)
    return [0.3 * torch.randn(2, 4, 3, 3, generator=generator) + 1 for _ in range(DDP_STEPS)]


def ddp_quantizer(threshold: float) -> VectorQuantizerEMA:
    torch.manual_seed(0)  # identical initial codebook in every process
    return VectorQuantizerEMA(16, 4, 0.25, decay=0.9, dead_code_threshold=threshold).train()


def ddp_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=60))
    try:
        results = {}
        for scenario, threshold in DDP_THRESHOLDS.items():
            quantizer = ddp_quantizer(threshold)
            torch.manual_seed(1000 + rank)  # each rank would pick different re-seeds on its own
            for z in ddp_batches(rank):
                quantizer(z)
            results[scenario] = buffers(quantizer)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ddp_codebooks(tmp_path_factory) -> list[dict]:
    out_dir = tmp_path_factory.mktemp("ddp")
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    mp.spawn(ddp_worker, args=(2, port, str(out_dir)), nprocs=2, join=True)
    return [torch.load(out_dir / f"rank{rank}.pt") for rank in (0, 1)]


@pytest.mark.integration
def test_ddp_ranks_hold_the_same_codebook_with_reseeding(ddp_codebooks):
    rank0, rank1 = (codebooks["reseed"] for codebooks in ddp_codebooks)
    assert (rank0["cluster_size"] == DDP_THRESHOLDS["reseed"]).any(), "no code was re-seeded: the test proves nothing"
    for name in ("embedding", "cluster_size", "embed_sum"):
        assert torch.equal(rank0[name], rank1[name]), name


@pytest.mark.integration
def test_ddp_codebook_equals_one_process_fed_both_batches(ddp_codebooks):
    single, rank0_only = ddp_quantizer(0.0), ddp_quantizer(0.0)
    for z0, z1 in zip(ddp_batches(0), ddp_batches(1)):
        single(torch.cat([z0, z1]))
        rank0_only(z0)
    for rank in (0, 1):
        for name, expected in buffers(single).items():
            assert torch.allclose(ddp_codebooks[rank]["no_reseed"][name], expected, atol=1e-5), (rank, name)
    assert not torch.allclose(buffers(rank0_only)["embedding"], buffers(single)["embedding"], atol=1e-3)


# --- the VQ-VAE -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "size, downsample, options",
    [
        (28, 2, {}),
        (64, 3, {}),
        (28, 2, dict(l2_codes=True, embedding_dim=4, gradient="rotation", kmeans_init=True, hidden_channels=32)),
    ],
)
def test_vqvae_shapes_and_output_range(tiny_config, size, downsample, options):
    config = tiny_config(size=size, downsample=downsample, **options)
    model = VQVAE(config)
    side = {28: 7, 64: 8}[size]
    assert config.latent_side == side
    x = torch.rand(2, 3, size, size)
    reconstruction, q = model(x)
    assert q.indices.shape == (2, side, side) and q.quantized.shape == (2, config.embedding_dim, side, side)
    assert reconstruction.shape == x.shape
    assert reconstruction.min() >= 0 and reconstruction.max() <= 1
    assert q.indices.min() >= 0 and q.indices.max() < config.codebook_size


def test_pooled_features_average_each_cell_of_a_coarse_layout_in_order():
    hidden = torch.arange(2 * 4 * 6 * 6, dtype=torch.float).reshape(2, 4, 6, 6)  # 6x6 grid, 3x3 layout of 2x2
    features = pooled_features(hidden)
    assert features.shape == (2, 4 * FEATURE_GRID**2)
    cells = features.reshape(2, FEATURE_GRID, FEATURE_GRID, 4)  # row-major over the layout, channels last
    assert torch.equal(cells[1, 0, 2], hidden[1, :, 0:2, 4:6].mean(dim=(1, 2)))
    assert torch.equal(cells[0, 2, 1], hidden[0, :, 4:6, 2:4].mean(dim=(1, 2)))
    assert torch.equal(pooled_features(hidden, grid=1), hidden.mean(dim=(2, 3)))


@pytest.mark.parametrize("size, downsample", [(28, 2), (64, 3), (128, 4)])
def test_features_have_one_length_at_every_image_size_beside_the_same_forward(tiny_config, size, downsample):
    config = tiny_config(size=size, downsample=downsample)
    model = VQVAE(config).eval()
    x = torch.rand(2, 3, size, size)
    reconstruction, q, features = model.forward_with_features(x)
    assert features.shape == (2, config.hidden_channels * FEATURE_GRID**2)
    expected_reconstruction, expected_q = model(x)
    assert torch.equal(reconstruction, expected_reconstruction) and torch.equal(q.indices, expected_q.indices)

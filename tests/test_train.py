"""The Lightning module and local training: a real fit on synthetic files, and the job's user errors."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
import ray
import torch
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

import medvq.metrics
import medvq.module
from medvq.batches import to_float_images
from medvq.datamodule import MedMNISTDataModule
from medvq.devices import resolve_precision
from medvq.errors import RunFailed
from medvq.metrics import LOSSES, StageMetrics, image_scores, structural_similarity
from medvq.module import VQVAEModule, squared_error_loss
from medvq.provenance import PROVENANCE_FILE
from medvq.ray_train import epoch_line, printed_epochs
from medvq.run_files import CHECKPOINT_NAME, DIVERGED, EPOCH_SECONDS, EPOCHS_DONE, METRICS_NAME
from medvq.train import (
    CHECK_SHARE,
    MOST_SECONDS_BETWEEN_CHECKS,
    LocalCheckpoints,
    build_trainer,
    epochs_between_checks,
    train_local,
)
from tests.clusters import wait_for
from tests.conftest import REPO, SYNTHETIC_DATASETS


def stage_values(config, x, recon, dataset_ids, indices=None, losses=None, scored=None) -> dict[str, torch.Tensor]:
    """One step's StageMetrics of recon against x (B, 3, H, W), read at once."""
    metrics = StageMetrics(config, scored_images=scored)
    losses = losses or {name: torch.tensor(0.5) for name in LOSSES}
    indices = torch.zeros(len(x), 7, 7, dtype=torch.long) if indices is None else indices
    metrics.update(x, recon, indices, losses, dataset_ids)
    return metrics.compute_and_reset(config.datasets)


def test_normalized_mse_is_mse_over_variance_averaged_over_datasets(tiny_config):
    target = torch.rand(6, 3, 12, 12)
    recon = target + 0.1 * torch.randn_like(target)
    ids = torch.tensor([0, 0, 0, 1, 1, 1])
    expected = [
        ((recon[ids == d] - target[ids == d]) ** 2).mean() / target[ids == d].var(unbiased=False) for d in (0, 1)
    ]
    assert stage_values(tiny_config(), target, recon, ids)["nmse"] == pytest.approx(float(sum(expected) / 2), rel=1e-5)
    one_set = stage_values(tiny_config(), target[:3], recon[:3], ids[:3])  # a set without images counts for nothing
    assert one_set["nmse"] == pytest.approx(float(expected[0]), rel=1e-5)


def test_image_scores_are_per_image_and_psnr_is_torchmetrics_value():
    target = torch.rand(5, 3, 28, 28)
    recon = (target + 0.1 * torch.randn_like(target)).clamp(0, 1)
    scores = image_scores(recon, target)
    mse = (recon - target).pow(2).mean(dim=(1, 2, 3))
    assert torch.allclose(scores["psnr"], 10 * torch.log10(1 / mse), atol=1e-4)
    theirs = peak_signal_noise_ratio(recon, target, data_range=1.0, reduction="none", dim=(1, 2, 3))
    assert torch.allclose(scores["psnr"], theirs, atol=1e-4)
    assert torch.allclose(scores["mae"], (recon - target).abs().mean(dim=(1, 2, 3)))


def test_dataset_means_are_per_dataset_and_overall_per_image_means(tiny_config):
    target = torch.full((3, 3, 12, 12), 0.5)
    recon = target + torch.tensor([0.1, 0.3, 0.2]).view(3, 1, 1, 1)  # MAE 0.1 and 0.3 in set 0, 0.2 in set 1
    means = stage_values(tiny_config(datasets=("a", "b", "c")), target, recon, torch.tensor([0, 0, 2]))
    assert means["mae_a"] == pytest.approx(0.2) and means["mae_c"] == pytest.approx(0.2)
    assert means["mae_b"].isnan() and means["psnr_b"].isnan()  # no image of dataset b
    assert means["mae"] == pytest.approx(0.2)
    assert means["psnr_a"] == pytest.approx(float(10 * (torch.tensor([0.01, 0.09]).log10().neg()).mean()), rel=1e-5)


def test_code_usage_counts_every_code_chosen_over_all_updates(tiny_config):
    metrics, x = StageMetrics(tiny_config(codebook_size=8)), torch.rand(1, 3, 12, 12)
    losses = {name: torch.tensor(0.5) for name in LOSSES}
    metrics.update(x, x, torch.tensor([[0, 1], [2, 3]]), losses, torch.tensor([0]))
    metrics.update(x, x, torch.tensor([[0, 1, 2, 3]]), losses, torch.tensor([0]))
    usage = metrics.compute_and_reset()
    assert usage["codes_used"] == 0.5 and usage["perplexity"] == pytest.approx(4.0)
    assert metrics.code_counts.sum() == 0 and metrics.images == 0  # reset for the next epoch


def test_losses_are_means_over_images_and_metrics_stay_out_of_the_state_dict(tiny_config):
    metrics, x = StageMetrics(tiny_config()), torch.rand(4, 3, 12, 12)
    for size, loss in ((4, 1.0), (1, 6.0)):  # batches of 4 and 1: a mean over 5 images
        losses = {name: torch.tensor(loss) for name in LOSSES}
        metrics.update(x[:size], x[:size], torch.zeros(size, 2, dtype=torch.long), losses, torch.zeros(size).long())
    assert metrics.state_dict() == {}  # checkpoints keep their keys: those saved before these sums load
    assert metrics.compute_and_reset()["loss"] == pytest.approx(2.0)


def test_stage_metrics_score_only_the_first_rows_when_asked(tiny_config):
    config = tiny_config()
    x = torch.rand(4, 3, 28, 28)
    recon = torch.cat([x[:2], 1 - x[2:]])  # perfect first two, bad last two
    losses = {name: torch.tensor(0.5) for name in ("loss", "recon_loss", "commitment_loss")}
    values = {}
    for scored in (2, None):
        metrics = StageMetrics(config, scored_images=scored)
        metrics.update(x, recon, torch.zeros(4, 7, 7, dtype=torch.long), losses, torch.tensor([0, 1, 0, 1]))
        values[scored] = metrics.compute_and_reset(config.datasets)
    assert values[2]["mae"] == 0 and values[None]["mae"] > 0.1
    assert values[2]["nmse"] == values[None]["nmse"] > 0  # the objective always sees every image
    assert values[None]["loss"] == 0.5 and values[None]["codes_used"] == 1 / config.codebook_size


@pytest.mark.parametrize("shape", [(28, 28), (64, 64), (28, 40)])  # non-square: the two blur matrices differ
def test_ssim_is_torchmetrics_value_and_passes_a_gradient(shape):
    target = torch.rand(5, 3, *shape)
    recon = (target + 0.2 * torch.randn_like(target)).clamp(0, 1).requires_grad_()
    ours = structural_similarity(recon, target)
    theirs = structural_similarity_index_measure(recon.detach(), target, data_range=1.0, reduction="none")
    assert torch.allclose(ours, theirs, atol=1e-5)
    assert structural_similarity(target, target).tolist() == pytest.approx([1.0] * 5, abs=1e-6)
    ours.sum().backward()
    assert recon.grad.abs().sum() > 0


def test_ssim_stays_in_float32_under_bf16_autocast():
    """A GPU run trains under bf16 autocast, where a convolution would otherwise round the window's means."""
    target = torch.rand(4, 3, 28, 28)
    recon = (target + 0.05 * torch.randn_like(target)).clamp(0, 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = structural_similarity(recon, target)
    assert under_autocast.dtype == torch.float32
    assert torch.equal(under_autocast, structural_similarity(recon, target))


@pytest.mark.parametrize(
    ("precision", "accelerator", "amx", "expected"),
    [
        ("auto", "gpu", False, "bf16-mixed"),
        ("auto", "cpu", True, "bf16-mixed"),
        ("auto", "cpu", False, "32-true"),
        ("32", "gpu", True, "32-true"),
        ("bf16", "cpu", False, "bf16-mixed"),
    ],
)
def test_auto_precision_is_bf16_on_a_gpu_or_a_cpu_with_amx(monkeypatch, precision, accelerator, amx, expected):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    assert resolve_precision(precision, accelerator) == expected


@pytest.mark.parametrize(
    ("precision", "decoded", "kept"), [("bf16", torch.bfloat16, "bf16-mixed"), ("32", torch.float32, "32-true")]
)
def test_a_cpu_fit_decodes_in_the_precision_asked_for_and_its_checkpoint_says_it(
    tiny_config, tmp_path, precision, decoded, kept
):
    config = tiny_config(precision=precision, accelerator="cpu", epochs=1)
    trainer, module = build_trainer(config, progress_bar=False), VQVAEModule(config)
    seen = set()
    module.model.decoder.net[0].register_forward_hook(lambda layer, inputs, output: seen.add(output.dtype))
    trainer.fit(module, datamodule=MedMNISTDataModule(config))
    assert seen == {decoded}
    assert torch.isfinite(module.model.quantizer.codebook.embedding).all()
    assert torch.isfinite(trainer.callback_metrics["val_nmse"])
    trainer.save_checkpoint(tmp_path / "model.ckpt", weights_only=False)
    assert VQVAEModule.load_from_checkpoint(tmp_path / "model.ckpt").trained_precision == kept


def test_a_run_resumed_in_another_precision_keeps_each_stretch(tiny_config, tmp_path):
    saved, said = tmp_path / "model.ckpt", []
    for precision, epochs in (("32", 1), ("bf16", 2), ("bf16", 3)):  # as "auto" on a CPU, then on one with AMX
        config = tiny_config(precision=precision, accelerator="cpu", epochs=epochs)
        trainer = build_trainer(config, progress_bar=False)
        trainer.fit(VQVAEModule(config), datamodule=MedMNISTDataModule(config), ckpt_path=saved if said else None)
        trainer.save_checkpoint(saved, weights_only=False)
        said.append(VQVAEModule.load_from_checkpoint(saved).trained_precision)
    assert said == ["32-true", "32-true, then bf16-mixed", "32-true, then bf16-mixed"]


@pytest.mark.parametrize("cooldown_share", [None, 0.5])
def test_the_default_schedule_cools_the_rate_to_zero_by_the_last_step(tiny_config, cooldown_share):
    config = tiny_config(epochs=3, **({} if cooldown_share is None else {"cooldown_share": cooldown_share}))
    trainer = build_trainer(config, progress_bar=False)
    trainer.fit(VQVAEModule(config), datamodule=MedMNISTDataModule(config))
    scheduler = trainer.lr_scheduler_configs[0].scheduler
    steps = trainer.estimated_stepping_batches
    assert scheduler.last_epoch == trainer.global_step == steps
    assert trainer.optimizers[0].param_groups[0]["lr"] == 0.0
    # two steps before the end (of 9) the default cooldown (the last 20%, 2 steps) has not started; a 50% one has
    factor = scheduler.lr_lambdas[0](steps - 2)
    assert factor == 1.0 if cooldown_share is None else factor < 1.0


def test_ssim_weight_adds_its_share_of_one_minus_ssim_to_the_loss(tiny_config):
    batch = {"image": torch.randint(0, 256, (4, 28, 28, 3), dtype=torch.uint8), "dataset_id": torch.zeros(4).long()}
    losses = {}
    for weight in (0.0, 0.5):
        torch.manual_seed(0)
        module = VQVAEModule(tiny_config(ssim_weight=weight)).eval()  # eval: the codebook stays as it is
        losses[weight] = module._step(batch, module.val_metrics)
    torch.manual_seed(0)
    module = VQVAEModule(tiny_config()).eval()
    recon, _ = module(batch["image"])
    ssim = structural_similarity(recon, to_float_images(batch["image"])).mean()
    assert 0 < float(ssim) < 1
    assert float(losses[0.5] - losses[0.0]) == pytest.approx(0.5 * (1 - float(ssim)), rel=1e-4)


def test_log_mse_loss_has_mse_value_and_the_gradient_of_mean_log_image_error():
    """'log-mse' logs as the batch's mse, and steps as mse * mean(log(mse_i)): each image's gradient divided by its
    own error, so a well reconstructed image is not outweighed by a poor one as under plain 'mse'."""
    target = torch.rand(3, 3, 8, 8)
    noise = torch.stack([scale * torch.randn(3, 8, 8) for scale in (0.01, 0.1, 0.3)])
    losses, gradients = {}, {}
    for kind in ("mse", "log-mse"):
        recon = (target + noise).requires_grad_()
        losses[kind] = squared_error_loss(recon, target, kind)
        losses[kind].backward()
        gradients[kind] = recon.grad
    mse = torch.nn.functional.mse_loss(target + noise, target)
    assert float(losses["mse"]) == pytest.approx(float(mse)) and float(losses["log-mse"]) == pytest.approx(float(mse))
    recon = (target + noise).requires_grad_()
    (mse.detach() * (recon - target).pow(2).mean(dim=(1, 2, 3)).log().mean()).backward()
    assert torch.allclose(gradients["log-mse"], recon.grad, rtol=1e-4, atol=1e-9)
    # per unit of error, plain mse weighs every image alike; log-mse weighs the best image the most
    per_image_weight = lambda gradient: (gradient / noise).mean(dim=(1, 2, 3))
    assert torch.allclose(per_image_weight(gradients["mse"]), per_image_weight(gradients["mse"])[0], rtol=1e-4)
    assert per_image_weight(gradients["log-mse"]).argsort().tolist() == [2, 1, 0]


def test_a_step_with_the_ssim_term_logs_the_losss_ssim_of_every_row(tiny_config, monkeypatch):
    """SSIM is computed once per step: the loss's per-image values are the logged score, over the whole batch."""
    calls = []
    monkeypatch.setattr(medvq.module, "structural_similarity", lambda *a: calls.append(1) or structural_similarity(*a))
    monkeypatch.setattr(medvq.metrics, "structural_similarity", lambda *a: calls.append(2) or structural_similarity(*a))
    batch = {"image": torch.randint(0, 256, (4, 28, 28, 3), dtype=torch.uint8), "dataset_id": torch.zeros(4).long()}
    torch.manual_seed(0)
    module = VQVAEModule(tiny_config(ssim_weight=0.5)).eval()
    module.train_metrics.scored_images = 2
    module._step(batch, module.train_metrics)
    assert calls == [1]
    logged = module.train_metrics.compute_and_reset()["ssim"]
    recon, _ = module(batch["image"])
    assert float(logged) == pytest.approx(float(structural_similarity(recon, to_float_images(batch["image"])).mean()))


def test_codebook_is_not_trained_by_gradient(tiny_config):
    module = VQVAEModule(tiny_config(lr_schedule="constant"))  # the optimiser alone: a schedule needs a trainer
    optimiser = module.configure_optimizers()
    trained = {id(p) for group in optimiser.param_groups for p in group["params"]}
    assert id(module.model.quantizer.codebook.embedding) not in trained
    assert len(trained) == len(list(module.model.parameters()))


def test_local_training_writes_metrics_and_a_checkpoint_that_rebuilds_its_model(tiny_config, tmp_path):
    config = tiny_config(epochs=2)
    final = train_local(config, tmp_path)
    history = pd.read_csv(tmp_path / METRICS_NAME)
    assert list(history["epoch"]) == [0, 1]
    for stage in ("train", "val"):
        for name in ("nmse", "loss", "recon_loss", "mae", "psnr", "ssim", "perplexity", "codes_used"):
            assert history[f"{stage}_{name}"].notna().all(), f"{stage}_{name}"
    for name in config.datasets:
        assert history[f"val_psnr_{name}"].notna().all()
    assert 0 < final["val_codes_used"] <= 1 and 1 <= final["val_perplexity"] <= config.codebook_size
    restored = VQVAEModule.load_from_checkpoint(tmp_path / CHECKPOINT_NAME)
    assert restored.config == config
    images = torch.randint(0, 256, (2, 28, 28, 3), dtype=torch.uint8)
    restored.eval()
    recon, quantized = restored(images)
    assert recon.shape == (2, 3, 28, 28) and quantized.indices.shape == (2, 7, 7)


@pytest.mark.parametrize(
    ("check_seconds", "epoch_seconds", "epochs"),
    [(0.0, 10.0, 1), (0.25, 10.0, 1), (0.75, 10.0, 2), (0.93, 1.0, 19), (60.0, 1.0, 600), (60.0, 1000.0, 1)],
)
def test_checks_come_as_often_as_keeps_them_within_their_share_of_training(check_seconds, epoch_seconds, epochs):
    between = epochs_between_checks(check_seconds, epoch_seconds)
    assert between == epochs
    within_share = check_seconds <= CHECK_SHARE * between * epoch_seconds
    assert within_share or between * epoch_seconds == MOST_SECONDS_BETWEEN_CHECKS or between == 1


def checked_epochs(history: pd.DataFrame) -> list[int]:
    return history.loc[history["val_psnr"].notna(), "epoch"].tolist()


def test_a_run_checked_every_n_epochs_validates_and_keeps_a_checkpoint_then_and_after_its_last(tiny_config, tmp_path):
    config = tiny_config(epochs=5, check_every=2)
    train_local(config, tmp_path)
    history = pd.read_csv(tmp_path / METRICS_NAME)
    assert history["epoch"].tolist() == list(range(5)) and history["train_psnr"].notna().all()
    assert checked_epochs(history) == [1, 3, 4]
    assert torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)["epoch"] == 4


class SlowCheckpoints(LocalCheckpoints):
    """A checkpoint that takes a second: far more than a tiny epoch's 5%."""

    def save(self, trainer, row) -> None:
        time.sleep(1)
        super().save(trainer, row)


def test_adaptive_checks_after_the_first_epoch_wait_as_long_as_their_cost_asks(tiny_config, tmp_path):
    config = tiny_config(epochs=4)
    recorder = SlowCheckpoints(tmp_path, check_every=None)
    build_trainer(config, callbacks=[recorder], progress_bar=False).fit(
        VQVAEModule(config), datamodule=MedMNISTDataModule(config)
    )
    history = pd.read_csv(tmp_path / METRICS_NAME)
    assert history["epoch"].tolist() == list(range(4))
    assert checked_epochs(history) == [0, 3]  # the first, to measure; then none until the last
    assert [row["epoch"] for row in recorder.checkpointed] == [0, 1, 2, 3]


def run_train_job(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "jobs/train.py", *args], cwd=REPO, capture_output=True, text=True)


def test_train_job_rejects_a_corrupt_file(tmp_path):
    (tmp_path / "breastmnist.npz").write_bytes(b"not a zip file")
    out = tmp_path / "out"
    result = run_train_job("--data-root", str(tmp_path), "--datasets", "breastmnist", "--out", str(out))
    assert result.returncode == 2 and "is not a valid breastmnist file" in result.stderr
    assert "Traceback" not in result.stderr and not out.exists()


def test_local_training_that_diverges_stops_and_keeps_no_non_finite_checkpoint(tiny_config, tmp_path):
    config = tiny_config(epochs=3, commitment_weight=1e300)  # inf in float32: the loss is inf from the first step
    with pytest.raises(RunFailed, match=r"train_loss became (nan|inf) in epoch 0; no checkpoint was written"):
        train_local(config, tmp_path)
    assert not (tmp_path / CHECKPOINT_NAME).exists()
    history = pd.read_csv(tmp_path / METRICS_NAME)
    assert history["epoch"].tolist() == [0] and not np.isfinite(history["train_loss"][0])  # stopped at once


def test_a_stopped_local_run_continues_with_the_same_command_and_refuses_other_folders(synthetic_root, tmp_path):
    out = tmp_path / "out"
    flags = [
        "--data-root",
        str(synthetic_root),
        "--datasets",
        ",".join(SYNTHETIC_DATASETS),
        "--epochs",
        "6",
        "--batch-size",
        "32",
        "--limit-batches",
        "6",
        "--accelerator",
        "cpu",
        "--out",
        str(out),
    ]
    job = subprocess.Popen(
        [sys.executable, "jobs/train.py", *flags], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    wait_for(lambda: (out / METRICS_NAME).exists(), "the first epoch", 120, job)
    job.send_signal(signal.SIGTERM)
    stderr = job.communicate(timeout=120)[1]
    assert job.returncode == 130, stderr[-2000:]
    assert stderr.strip().splitlines()[-1].startswith("error: stopped in epoch"), stderr[-2000:]
    assert "the same command continues" in stderr and "Traceback" not in stderr
    done = len(pd.read_csv(out / METRICS_NAME))
    assert 1 <= done < 6, "the signal came after the run had finished: nothing was tested"
    assert torch.load(out / CHECKPOINT_NAME, weights_only=True)["epoch"] == done - 1

    resumed = run_train_job(*flags)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"continuing the run in {out}" in resumed.stdout
    assert "weights_only" not in resumed.stdout + resumed.stderr  # no log line per saved checkpoint
    assert pd.read_csv(out / METRICS_NAME)["epoch"].tolist() == list(range(6))  # each epoch once
    assert "CPU threads of" in json.loads((out / PROVENANCE_FILE).read_text())["hardware"]
    for extra, message in [
        ([], "holds this run, finished (6 epochs): nothing to train"),
        (["--codebook-size", "64"], "holds a run with other settings (codebook_size)"),
    ]:
        refused = run_train_job(*flags, *extra)
        assert refused.returncode == 2 and message in refused.stderr and "Traceback" not in refused.stderr


def test_a_ray_train_runs_epoch_line_gives_its_scores_and_the_time_left_or_why_it_stopped():
    row = {EPOCHS_DONE: 30, "val_psnr": 28.104, "val_ssim": 0.9051, EPOCH_SECONDS: 10.0}
    assert epoch_line("medvq-train-ab", 120, row) == (
        "medvq-train-ab: epoch 30/120, val PSNR 28.10 dB, SSIM 0.905, 10.0 s an epoch, about 15 min left"
    )
    last = {**row, EPOCHS_DONE: 120}
    assert epoch_line("medvq-train-ab", 120, last).endswith("SSIM 0.905, 10.0 s an epoch")
    diverged = {EPOCHS_DONE: 3, "val_psnr": float("nan"), DIVERGED: "val_loss became nan in epoch 2"}
    assert epoch_line("run", 5, diverged) == "run: diverged: val_loss became nan in epoch 2"


def test_each_reported_epoch_is_printed_on_the_driver_and_a_gone_queue_fails_nothing(ray_instance, capsys):
    row = {EPOCHS_DONE: 1, "val_psnr": 20.0, "val_ssim": 0.5, EPOCH_SECONDS: 2.0}
    with printed_epochs("run", 2) as callback:
        progress = ray.get(ray.put(callback))  # the copy Ray Train's controller gets
        progress.after_report(None, [row, {**row, "val_psnr": 0.0}], None)  # every rank's metrics; rank zero's first
    printed = "run: epoch 1/2, val PSNR 20.00 dB, SSIM 0.500, 2.0 s an epoch, about 1 min left\n"
    assert capsys.readouterr().out == printed
    progress.after_report(None, [row], None)  # the queue was shut down with the block: dropped, no error
    assert capsys.readouterr().out == ""

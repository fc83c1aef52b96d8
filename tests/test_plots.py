"""Figures of a run folder: which PNGs a sweep or a training run gets, their fixed sizes, and the job's errors."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import lightning
import numpy as np
import pandas as pd
import pytest
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from medmnist import INFO
from PIL import Image

from medvq import plots, provenance
from medvq.checkpoints import TRAINED_PRECISION
from medvq.config import Config
from medvq.data import LABEL_CHARS, short_label
from medvq.encode import RECONSTRUCTION, THUMB, thumbnail_pixels, thumbnails
from medvq.errors import UserError
from medvq.module import VQVAEModule
from medvq.provenance import PROVENANCE_FILE, ray_hardware, write_provenance
from medvq.report import RECONSTRUCTIONS_FILE, ROW_KEY
from tests.conftest import REPO, SYNTHETIC_DATASETS

EVERY_FIGURE = (
    "latent_space.png",
    "latent_by_class.png",
    "codebook_usage.png",
    "curves.png",
    "sweep.png",
    "reconstructions.png",
    "explorer.html",
)
METRICS = ("loss", "mae", "psnr", "ssim")


def write_latents(folder: Path, config: Config, rows_per_dataset: int = 150) -> None:
    """The encoder's Parquet dataset: one row per image (the first images of each split), in two part files, and
    random thumbnails of their reconstructions beside it."""
    rng = np.random.default_rng(0)
    cells = config.latent_side**2
    frames = []
    for name in config.datasets:
        names = INFO[name]["label"]
        labels = rng.integers(0, len(names), rows_per_dataset)
        splits = pd.Series(rng.choice(["train", "val", "test"], rows_per_dataset))
        frames.append(
            pd.DataFrame(
                {
                    "dataset": name,
                    "split": splits,
                    "index": splits.groupby(splits).cumcount().astype(np.int64),
                    "label": labels.astype(np.int64),
                    "label_name": [names[str(label)] for label in labels],
                    "codes": list(
                        rng.integers(0, config.codebook_size // 2, (rows_per_dataset, cells)).astype(np.int16)
                    ),
                    "features": list(
                        rng.normal(size=(rows_per_dataset, 9 * config.hidden_channels)).astype(np.float32)
                    ),
                    **{
                        score: rng.random(rows_per_dataset, dtype=np.float32)
                        for score in ("mse", "mae", "psnr", "ssim")
                    },
                    "umap_x": rng.normal(size=rows_per_dataset).astype(np.float32),
                    "umap_y": rng.normal(size=rows_per_dataset).astype(np.float32),
                }
            )
        )
    folder.mkdir()
    table = pd.concat(frames, ignore_index=True)
    for part, rows in enumerate(np.array_split(np.arange(len(table)), 2)):
        table.iloc[rows].to_parquet(folder / f"part-{part}.parquet", index=False)
    # Smooth, as reconstructions are (the page's lossy sheets keep them to a few levels), and each row its own colour
    smooth = torch.rand(len(table), 3, 1, 1) * torch.linspace(0.2, 1, THUMB).expand(THUMB, THUMB)
    shown = table[ROW_KEY].assign(**{RECONSTRUCTION: thumbnails(thumbnail_pixels(smooth)).to_pylist()})
    shown.to_parquet(folder / RECONSTRUCTIONS_FILE, index=False)


def history(epochs: int) -> pd.DataFrame:
    falling = np.linspace(1.0, 0.5, epochs)
    return pd.DataFrame({f"{stage}_{metric}": falling for stage in ("train", "val") for metric in METRICS})


def save_checkpoint(config: Config, path: Path) -> None:
    """What Lightning's checkpoint holds for `load_from_checkpoint`, without running a Trainer."""
    module = VQVAEModule(config)
    torch.save(
        {
            "state_dict": module.state_dict(),
            "hyper_parameters": dict(module.hparams),
            "pytorch-lightning_version": lightning.__version__,
            TRAINED_PRECISION: "bf16-mixed",
        },
        path,
    )


def encoded_run(run: Path, config: Config) -> Path:
    """A run folder with what the explorer and jobs/neighbours.py read: latents/ and model.ckpt."""
    run.mkdir()
    write_latents(run / "latents", config)
    save_checkpoint(config, run / "model.ckpt")
    return run


@pytest.fixture
def train_run(tiny_config, tmp_path) -> Path:
    """A jobs/train.py output folder with latents: model.ckpt and metrics.csv (0-based epochs)."""
    run = encoded_run(tmp_path / "train", tiny_config())
    history(3).assign(epoch=range(3)).to_csv(run / "metrics.csv", index=False)
    return run


@pytest.fixture
def sweep_run(tiny_config, tmp_path) -> Path:
    """A jobs/sweep.py output folder with latents: trials.csv, best.json, best_metrics.csv (1-based epochs)."""
    run, config = tmp_path / "sweep", tiny_config()
    run.mkdir()
    write_latents(run / "latents", config)
    history(3).assign(epoch=range(3)).to_csv(run / "best_metrics.csv", index=False)
    checkpoint = tmp_path / "ray_results" / "checkpoint.ckpt"
    checkpoint.parent.mkdir()
    save_checkpoint(config, checkpoint)
    (run / "best.json").write_text(json.dumps({"config": config.to_dict(), "checkpoint": str(checkpoint)}))
    weights = [0.1, 0.3, 1.0]
    pd.DataFrame(
        {
            "codebook_size": np.repeat([32, 64], 3),
            "commitment_weight": weights * 2,
            "seed": 0,
            "status": ["finished", "stopped", "finished", "finished", "finished", "diverged"],
            "epochs_run": [3, 1, 3, 3, 3, 1],
            "val_nmse": [0.20, 0.40, 0.25, 0.15, 0.18, float("nan")],
            "grace_epochs": 1,
            "val_nmse_at_grace": [0.35, 0.40, 0.38, 0.33, 0.34, 0.30],
        }
    ).to_csv(run / "trials.csv", index=False)
    return run


def expected_pixels(n_datasets: int) -> dict[str, tuple[int, int]]:
    inches = {
        "latent_space.png": plots.LATENT_SIZE,
        "latent_by_class.png": plots.class_figure_size(n_datasets),
        "codebook_usage.png": plots.USAGE_SIZE,
        "curves.png": plots.CURVES_SIZE,
        "sweep.png": plots.SWEEP_SIZE,
        "reconstructions.png": plots.reconstruction_figure_size(n_datasets),
    }
    return {name: (round(width * plots.DPI), round(height * plots.DPI)) for name, (width, height) in inches.items()}


def assert_figures(paths: list[Path], names: tuple[str, ...]) -> None:
    pixels = expected_pixels(len(SYNTHETIC_DATASETS))
    assert [path.name for path in paths] == list(names)
    assert sorted(path.name for path in paths[0].parent.iterdir()) == sorted(names)
    for path in (path for path in paths if path.suffix == ".png"):
        with Image.open(path) as image:
            image.verify()
        with Image.open(path) as image:
            assert (image.format, image.size) == ("PNG", pixels[path.name]), path.name


def test_sweep_run_gets_every_figure_at_its_fixed_size(sweep_run):
    paths = [Path(path) for path in plots.draw_run(sweep_run)]
    assert all(path.parent == sweep_run / "plots" for path in paths)
    assert_figures(paths, EVERY_FIGURE)


def test_the_figures_of_training_are_drawn_without_reading_the_latents(sweep_run):
    """The job draws them while the UMAP runs, before latents/ is written: a rerun's old one is not read."""
    for part in (sweep_run / "latents").glob("*.parquet"):
        part.write_bytes(b"not parquet")
    paths = [Path(path) for path in plots.draw_run(sweep_run, figures=plots.TRAINING_FIGURES)]
    assert_figures(paths, plots.TRAINING_FIGURES)
    assert sorted(plots.TRAINING_FIGURES + plots.LATENT_FIGURES) == sorted(EVERY_FIGURE)


def test_every_figure_says_its_data_epochs_hardware_and_commit(sweep_run):
    (sweep_run / PROVENANCE_FILE).unlink(missing_ok=True)
    hardware = ray_hardware({"CPU": 16.0, "GPU": 8.0, "accelerator_type:H200": 2.0}, False)
    write_provenance(sweep_run, hardware, str(sweep_run))
    said = json.loads((sweep_run / PROVENANCE_FILE).read_text())
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout
    assert said["commit"].startswith(head.strip()) and said["commit"] != "unknown"
    datasets = ", ".join(json.loads((sweep_run / "best.json").read_text())["config"]["datasets"])
    expected = [
        f"data: {datasets} at 28 px",
        "model: 3 epochs in bf16 mixed precision",
        "16 CPUs, 8 GPUs (H200)",
        said["commit"],
    ]
    for path in map(Path, plots.draw_run(sweep_run)):
        if path.suffix == ".png":
            with Image.open(path) as image:
                text = image.text["Description"]
        else:
            text = path.read_text()
        assert all(part in text for part in expected), (path.name, text[:300])


def test_a_class_panel_frames_its_datasets_bulk_and_counts_the_far_points_it_leaves_out():
    rng = np.random.default_rng(0)
    bulk = pd.DataFrame({"umap_x": rng.normal(size=400), "umap_y": rng.normal(size=400)})
    far = pd.DataFrame({"umap_x": [60.0], "umap_y": [-40.0]})  # one image among another dataset's points
    points = pd.concat([bulk, far]).assign(dataset="bloodmnist", label=0, label_name="basophil")
    (ax, *_) = plots.draw_latent_by_class(points).axes
    (left, right), (bottom, top) = ax.get_xlim(), ax.get_ylim()
    assert left < bulk["umap_x"].quantile(0.01) and bulk["umap_x"].quantile(0.99) < right < 10
    assert -10 < bottom < bulk["umap_y"].quantile(0.01) and bulk["umap_y"].quantile(0.99) < top
    x, y = points["umap_x"], points["umap_y"]
    outside = int(((x < left) | (x > right) | (y < bottom) | (y > top)).sum())
    assert 1 <= outside < 10 and ax.get_title() == f"bloodmnist ({outside} far point{'s' * (outside > 1)} not shown)"


@pytest.mark.parametrize("width", [3.2, 7.5, 12.0])
def test_a_long_caption_is_wrapped_to_fit_its_figure(tmp_path, width):
    caption = " | ".join(
        [
            "data: bloodmnist, pneumoniamnist, retinamnist, breastmnist, dermamnist at 224 px",
            "model: 120 epochs",
            "Ray cluster of up to 64 CPUs, 16 GPUs (A100, H200); driver on Intel(R) Xeon(R) Platinum 8480C",
            "medvq e25774f+changes, 2026-12-02",
        ]
    )
    figure = Figure(figsize=(width, 3), layout="constrained")
    figure.subplots().plot([0, 1])
    plots._save(figure, tmp_path / "figure.png", caption)
    (drawn,) = [text for text in figure.texts if text.get_text()]
    words = [word for word in drawn.get_text().split() if word != "|"]
    assert words == [word for word in caption.split() if word != "|"]  # all of it, in order
    box = drawn.get_window_extent(FigureCanvasAgg(figure).get_renderer())
    assert 0 <= box.x0 and box.x1 <= figure.bbox.x1  # nothing cut off at either side
    with Image.open(tmp_path / "figure.png") as image:
        assert image.text["Description"] == caption  # the metadata keeps it whole, on one line


def test_a_later_job_in_a_runs_folder_keeps_its_first_start_and_names_the_code_it_ran(tmp_path, monkeypatch):
    run = tmp_path / "run"
    starts = (("aaa1111", "first machine"), ("aaa1111", "second machine"), ("bbb2222", "third"))
    for number, (commit, hardware) in enumerate(starts):
        monkeypatch.setattr(provenance, "code_commit", lambda commit=commit: commit)
        # The last as a job whose --out is a URI writes: into a fresh local folder, uploaded over the run's after
        folder = tmp_path / "staging" if number == len(starts) - 1 else run
        write_provenance(folder, hardware, str(run))
    record = json.loads((folder / PROVENANCE_FILE).read_text())
    assert (record["commit"], record["hardware"]) == ("aaa1111", "first machine")
    assert [start["hardware"] for start in record["later_starts"]] == ["second machine", "third"]
    said = provenance.caption(folder, None, 7, "bf16-mixed")
    assert said.startswith("model: 7 epochs in bf16 mixed precision | first machine | medvq aaa1111, ")
    older = provenance.caption(folder, None, 7)  # a checkpoint from before trained_precision was kept
    assert older.startswith("model: 7 epochs | first machine | medvq aaa1111, ")
    assert said.endswith(" | then medvq bbb2222")


def test_code_outside_a_checkout_says_the_commit_its_image_was_built_from(tmp_path, monkeypatch):
    monkeypatch.setattr(provenance, "REPO", tmp_path)  # no .git: as in the cluster image
    monkeypatch.delenv("MEDVQ_COMMIT", raising=False)
    assert provenance.code_commit() == "unknown"
    monkeypatch.setenv("MEDVQ_COMMIT", "abc1234")
    assert provenance.code_commit() == "abc1234"


def test_training_run_gets_every_figure_but_the_sweep(train_run, synthetic_root):
    paths = [Path(path) for path in plots.draw_run(train_run, data_root=synthetic_root)]
    assert_figures(paths, tuple(name for name in EVERY_FIGURE if name != "sweep.png"))


def test_histories_count_epochs_from_one(tmp_path):
    history(2).assign(epoch=[0, 1]).to_csv(tmp_path / "metrics.csv", index=False)
    assert list(plots.read_history(tmp_path / "metrics.csv").index) == [1, 2]


def test_long_class_names_are_shortened():
    assert short_label(INFO["bloodmnist"]["label"]["3"]) == "immature granulocytes"
    assert short_label("normal, benign") == "normal, benign"
    assert len(short_label(INFO["dermamnist"]["label"]["0"])) == LABEL_CHARS


@pytest.mark.parametrize(
    "remove",
    [lambda run: shutil.rmtree(run / "latents"), lambda run: (run / "latents" / RECONSTRUCTIONS_FILE).unlink()],
    ids=["no latents", "no reconstructions"],
)
def test_a_run_without_latents_gets_no_explorer_and_one_line_saying_so(train_run, synthetic_root, caplog, remove):
    remove(train_run)
    caplog.set_level(logging.INFO, logger=plots.__name__)
    assert "explorer.html" not in [Path(path).name for path in plots.draw_run(train_run, data_root=synthetic_root)]
    assert [line for line in caplog.messages if "explorer.html" in line] == [
        f"skipped explorer.html: its input is not in {train_run}"
    ]


def test_a_trial_table_from_an_older_medvq_skips_the_sweep_figure_with_a_reason(sweep_run, caplog):
    trials = pd.read_csv(sweep_run / "trials.csv")
    trials.drop(columns=["status"]).to_csv(sweep_run / "trials.csv", index=False)
    assert "sweep.png" not in [Path(path).name for path in plots.draw_run(sweep_run)]
    assert any("run the sweep command again" in message for message in caplog.messages)


@pytest.mark.parametrize(
    "make",
    [lambda path: None, lambda path: path.mkdir(), lambda path: (path / "latents").mkdir(parents=True)],
    ids=["missing", "empty", "empty-latents"],
)
def test_a_folder_that_is_not_a_run_is_a_user_error(tmp_path, make):
    make(tmp_path / "run")
    with pytest.raises(UserError):
        plots.draw_run(tmp_path / "run")


def test_plot_job_writes_the_figures_or_stops_with_one_line(train_run, tmp_path):
    job = lambda run: subprocess.run(
        [sys.executable, "jobs/plot.py", "--run", str(run)], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    (tmp_path / "empty").mkdir()
    failed = job(tmp_path / "empty")
    assert failed.returncode == 2 and "Traceback" not in failed.stderr
    assert [line for line in failed.stderr.splitlines() if line.startswith("error:")] == [failed.stderr.strip()]
    done = job(train_run)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("wrote ") == 6 and (train_run / "plots" / "explorer.html").exists()

"""Figures of a run folder: latent space, training curves, the sweep, reconstructions, codebook usage, and the
interactive page of the latent space (medvq/explorer.py).

Every figure is a matplotlib `Figure` (no pyplot state, so it is safe in any process) saved as PNG at a
fixed pixel size: figure inches x DPI, never cropped to its contents.
"""

from __future__ import annotations

import io
import json
import logging
import textwrap
from collections.abc import Callable, Collection
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import torch
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from medvq import provenance
from medvq.batches import to_float_images
from medvq.checkpoints import Trained, trained
from medvq.data import each_split_read_once, load_split, rgb, short_label
from medvq.errors import UserError
from medvq.explorer import draw_explorer
from medvq.latent_space import code_usage
from medvq.report import LATENTS_DIR, RECONSTRUCTIONS_FILE
from medvq.storage import is_file, is_uri, join, local_folder, write_atomically
from medvq.tune import GRACE_OBJECTIVE, MODEL_STATUSES

log = logging.getLogger(__name__)

DPI = 100
LATENT_SIZE = (8.0, 7.0)  # inches; 800 x 700 px
CURVES_SIZE = (10.0, 7.0)
SWEEP_SIZE = (12.0, 5.0)  # two panels: after the grace epochs, and at the end
USAGE_SIZE = (9.0, 4.0)
CLASS_PANEL = (5.5, 3.5)  # one dataset's panel, its legend to the right
CLASS_COLUMNS = 3
# A class panel frames its dataset's points within this many interquartile ranges of their quartiles, on each axis:
# a few far points (lying among another dataset's) would otherwise shrink the rest to a corner. 5 keeps a real
# run's smaller clusters (2.6% of blood) and leaves out the stray few (20 of 1,600 retina images)
CLASS_PANEL_FENCE = 5
TILE = 0.75  # inches per image in the reconstruction grid
ROW_LABEL = 1.5  # inches left of the grid for the dataset names
SHOWN = 8  # test images per dataset in the reconstruction grid
NEIGHBOUR_COLUMNS = 9  # an image and its 8 nearest (jobs/neighbours.py) on one row
NEIGHBOUR_TILE = (1.6, 2.5)  # inches per image: the image, and its four-line caption above it
CAPTION_CHARS_PER_INCH = 17  # of x-small text, with a margin: the width a caption line may take

CURVES = (("loss", "loss"), ("mae", "MAE"), ("psnr", "PSNR (dB)"), ("ssim", "SSIM"))
# What draw_run draws: the figures of training need no latents, so the job draws them while the UMAP runs
TRAINING_FIGURES = ("curves.png", "sweep.png", "reconstructions.png")
LATENT_FIGURES = ("latent_space.png", "latent_by_class.png", "codebook_usage.png", "explorer.html")
LATENT_PARTS = "[!_]*.parquet"  # the latents' files in latents/ ("_": the reconstructions' thumbnails)


def class_grid(n_datasets: int) -> tuple[int, int]:
    """(rows, columns) of the per-dataset panels in latent_by_class.png."""
    columns = min(n_datasets, CLASS_COLUMNS)
    return -(-n_datasets // columns), columns


def class_figure_size(n_datasets: int) -> tuple[float, float]:
    rows, columns = class_grid(n_datasets)
    return columns * CLASS_PANEL[0], rows * CLASS_PANEL[1]


def reconstruction_figure_size(n_datasets: int) -> tuple[float, float]:
    return ROW_LABEL + SHOWN * TILE, 2 * n_datasets * TILE


def caption_lines(caption: str, width_inches: float) -> str:
    """The caption's " | "-separated parts on as few lines as fit the figure's width: one long line is cut off."""
    limit, lines = int(width_inches * CAPTION_CHARS_PER_INCH), []
    for part in caption.split(" | "):
        if lines and len(lines[-1]) + 3 + len(part) <= limit:
            lines[-1] += " | " + part
        else:
            lines += textwrap.wrap(part, limit) or [part]
    return "\n".join(lines)


def _save(figure: Figure, path: Path, caption: str = "") -> None:
    """Write the figure as a PNG, with `caption` (where it comes from) along its foot and in its metadata."""
    if caption:
        figure.supxlabel(caption_lines(caption, figure.get_figwidth()), fontsize="x-small", color="dimgrey")
    buffer = io.BytesIO()
    figure.savefig(buffer, dpi=DPI, format="png", metadata={"Description": caption} if caption else None)
    write_atomically(path, buffer.getvalue())


def _colours(n: int) -> list:
    return list(colormaps["tab10" if n <= 10 else "tab20"].colors)[:n]


def _scatter(ax, points: pd.DataFrame, colour, label: str) -> None:
    """One call per group: 35k points draw in well under a second, rasterised so the PNG stays small."""
    ax.scatter(
        points["umap_x"], points["umap_y"], s=2, color=colour, alpha=0.6, linewidths=0, rasterized=True, label=label
    )


def _blank_axes(ax) -> None:
    ax.set_xticks([])
    ax.set_yticks([])


def draw_latent_space(latents: pd.DataFrame) -> Figure:
    figure = Figure(figsize=LATENT_SIZE, layout="constrained")
    ax = figure.subplots()
    groups = latents.groupby("dataset", sort=True)
    for colour, (name, points) in zip(_colours(groups.ngroups), groups):
        _scatter(ax, points, colour, f"{name} ({len(points):,})")
    ax.legend(markerscale=5, title="dataset (images)")
    ax.set_title(f"UMAP of the features of {len(latents):,} images")
    _blank_axes(ax)
    return figure


def draw_latent_by_class(latents: pd.DataFrame) -> Figure:
    groups = latents.groupby("dataset", sort=True)
    rows, columns = class_grid(groups.ngroups)
    figure = Figure(figsize=class_figure_size(groups.ngroups), layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    for ax, (dataset, points) in zip(axes, groups):
        classes = points.groupby(["label", "label_name"], sort=True)
        for colour, ((_, name), members) in zip(_colours(classes.ngroups), classes):
            _scatter(ax, members, colour, short_label(name))
        ax.legend(markerscale=5, fontsize="small", loc="center left", bbox_to_anchor=(1, 0.5))
        outside = _frame_bulk(ax, points[["umap_x", "umap_y"]].to_numpy())
        ax.set_title(dataset + (f" ({outside:,} far point{'s' * (outside > 1)} not shown)" if outside else ""))
        _blank_axes(ax)
    for ax in axes[groups.ngroups :]:
        ax.set_axis_off()
    return figure


def _frame_bulk(ax, xy: np.ndarray) -> int:
    """Frame the panel on the bulk of its points (N, 2), with a margin; returns how many fall outside."""
    first, third = np.percentile(xy, (25, 75), axis=0)
    fence = CLASS_PANEL_FENCE * (third - first)
    inside = ((xy >= first - fence) & (xy <= third + fence)).all(axis=1)
    low, high = xy[inside].min(axis=0), xy[inside].max(axis=0)
    margin = 0.05 * np.maximum(high - low, 1e-6)
    ax.set_xlim(low[0] - margin[0], high[0] + margin[0])
    ax.set_ylim(low[1] - margin[1], high[1] + margin[1])
    return int((~inside).sum())


def read_history(path: Path) -> pd.DataFrame:
    """Per-epoch metrics (metrics.csv of a run, best_metrics.csv of a sweep) indexed by 1-based epoch."""
    history = pd.read_csv(path)
    return history.set_index(pd.Index(history["epoch"].astype(int) + 1, name="epoch"))


def draw_curves(history: pd.DataFrame) -> Figure:
    figure = Figure(figsize=CURVES_SIZE, layout="constrained")
    for ax, (metric, title) in zip(figure.subplots(2, 2).ravel(), CURVES):
        for stage in ("train", "val"):
            values = history[f"{stage}_{metric}"].dropna()  # val: only the checked epochs (train.check_every)
            ax.plot(values.index, values, marker="o", markersize=3, label=stage)
        ax.set(title=title, xlabel="epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend()
    return figure


def draw_sweep(trials: pd.DataFrame) -> Figure:
    """val_nmse against commitment weight, one line per codebook size through the mean of a cell's repeats (each
    repeat a dot): left, after the grace epochs every trial ran (the fair comparison); right, at each trial's
    end, hollow where ASHA stopped it early. Trials that diverged or failed have no model and are not drawn."""
    if "status" not in trials:
        raise UserError(
            "trials.csv has no status column (an older medvq wrote it): run the sweep command again; "
            "it resumes the finished sweep and rewrites its outputs"
        )
    figure = Figure(figsize=SWEEP_SIZE, layout="constrained")
    at_grace, final = figure.subplots(1, 2)  # own y ranges: the early differences are small
    usable = trials[trials["status"].isin(MODEL_STATUSES)].sort_values("commitment_weight")
    groups = usable.groupby("codebook_size")
    for colour, (size, group) in zip(_colours(groups.ngroups), groups):
        means = group.groupby("commitment_weight")[[GRACE_OBJECTIVE, "val_nmse"]].mean()
        at_grace.plot(means.index, means[GRACE_OBJECTIVE], color=colour, label=f"K = {size}")
        at_grace.scatter(group["commitment_weight"], group[GRACE_OBJECTIVE], s=24, color=colour, zorder=3)
        final.plot(means.index, means["val_nmse"], color=colour)
        for stopped, part in group.groupby(group["status"] == "stopped"):
            final.scatter(
                part["commitment_weight"],
                part["val_nmse"],
                s=36,
                edgecolors=colour,
                facecolors="white" if stopped else colour,
                zorder=3,
            )
    at_grace.legend(title="codebook size")
    hollow_key = Line2D(
        [], [], linestyle="", marker="o", color="grey", markerfacecolor="white", label="stopped early by ASHA"
    )
    final.legend(handles=[hollow_key])
    repeats = int(usable.groupby(["codebook_size", "commitment_weight"]).size().max()) if len(usable) else 0
    at_grace.set(
        xscale="log",
        xlabel="commitment weight",
        ylabel="val_nmse (lower is better)",
        title=f"after {int(trials['grace_epochs'].iloc[0])} epochs: {len(usable)} trials"
        + (f", up to {repeats} seeds a cell" if repeats > 1 else ""),
    )
    without_model = len(trials) - len(usable)
    final.set(
        xscale="log",
        xlabel="commitment weight",
        title=f"at the end: {int((usable['status'] == 'stopped').sum())} stopped early (hollow)"
        + (f"; {without_model} diverged or failed, not drawn" if without_model else ""),
    )
    return figure


@torch.inference_mode()
def draw_reconstructions(shipped: Trained, data_root: str | Path | None) -> Figure:
    """The first SHOWN test images of every dataset the model was trained on, above their reconstructions."""
    config = shipped.config
    figure = Figure(figsize=reconstruction_figure_size(len(config.datasets)), layout="constrained")
    axes = figure.subplots(2 * len(config.datasets), SHOWN, squeeze=False)
    for row, name in enumerate(config.datasets):
        images = load_split(name, "test", data_root, config.size)[0][:SHOWN]
        images = rgb(images).copy()  # torch wants writable memory
        recon = shipped.model(to_float_images(torch.from_numpy(images)))[0]
        recon = recon.permute(0, 2, 3, 1).float().numpy()  # (B, H, W, 3)
        for column in range(SHOWN):
            for ax, shown in ((axes[2 * row, column], images), (axes[2 * row + 1, column], recon)):
                _blank_axes(ax)
                if column < len(shown):
                    ax.imshow(shown[column])  # RGB: uint8 originals, float reconstructions in [0, 1]
        axes[2 * row, 0].set_ylabel(name, rotation=0, ha="right", va="center")
        axes[2 * row + 1, 0].set_ylabel("reconstructed", rotation=0, ha="right", va="center", fontsize="small")
    return figure


def draw_codebook_usage(codes: np.ndarray, codebook_size: int) -> Figure:
    counts, perplexity = code_usage(codes, codebook_size)
    used = int((counts > 0).sum())
    figure = Figure(figsize=USAGE_SIZE, layout="constrained")
    ax = figure.subplots()
    # Unused codes cannot sit on a log axis: they are the empty stretch on the right, up to K.
    ax.bar(np.arange(used), np.sort(counts)[::-1][:used], width=1.0, align="edge")
    ax.set(
        yscale="log",
        xlim=(0, codebook_size),
        xlabel="code, most used first",
        ylabel="uses",
        title=f"{used} of {codebook_size} codes used ({used / codebook_size:.0%}), perplexity {perplexity:.1f}",
    )
    return figure


def draw_neighbours(table: pd.DataFrame, images: np.ndarray, path: Path, caption: str = "") -> None:
    """The images of `table` (medvq/neighbours.py) in rows of NEIGHBOUR_COLUMNS, each under its dataset, split,
    index, class and distance."""
    columns = min(len(table), NEIGHBOUR_COLUMNS)
    rows = -(-len(table) // columns)
    figure = Figure(figsize=(columns * NEIGHBOUR_TILE[0], rows * NEIGHBOUR_TILE[1]), layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    for ax, image, record in zip(axes, images, table.itertuples()):
        ax.imshow(image)
        _blank_axes(ax)
        first = "the image" if record.Index == 0 else f"{record.Index}. d = {record.distance:.3f}"
        ax.set_title(
            f"{first}\n{record.dataset}\n{record.split} {record.index}\n{short_label(record.label_name)}",
            fontsize="small",
        )
    for ax in axes[len(table) :]:
        ax.set_axis_off()
    _save(figure, path, caption)


def _saved(draw: Callable[[], Figure]) -> Callable[[Path, str], None]:
    """A figure's drawing as a step of draw_run: draw it, then save it with the run's caption."""
    return lambda path, caption: _save(draw(), path, caption)


def find_checkpoint(run: Path) -> str | None:
    """The run's model.ckpt (jobs/train.py, or the sweep's copy of its best), else the one best.json names."""
    if (run / "model.ckpt").exists():
        return str(run / "model.ckpt")
    if (run / "best.json").exists():
        location = json.loads((run / "best.json").read_text())["checkpoint"]
        if is_file(location):
            return location
        log.warning("best.json names checkpoint %s, which cannot be read from here", location)
    return None


def _codebook_size(run: Path, shipped: Trained | None, codes: np.ndarray) -> int:
    if shipped is not None:
        return shipped.config.codebook_size
    if (run / "best.json").exists():
        return int(json.loads((run / "best.json").read_text())["config"]["codebook_size"])
    return int(codes.max()) + 1


def draw_run(
    run_dir: str | Path,
    data_root: str | Path | None = None,
    figures: Collection[str] = TRAINING_FIGURES + LATENT_FIGURES,
) -> list[str]:
    """Draw each of `figures` whose inputs `run_dir` (a folder or a URI) holds into run_dir/plots/; returns the
    files written. data_root: the MedMNIST files for the reconstructions (default: the model's own)."""
    if not is_uri(run_dir) and not Path(run_dir).is_dir():
        raise UserError(
            f"run folder {run_dir} does not exist: point --run at the --out folder of a sweep or a training run"
        )
    # Ray's storage under the run holds every trial's checkpoints: none of it is drawn.
    with local_folder(str(run_dir), skip=("ray_results",)) as run, each_split_read_once():
        written = _draw_folder(run, data_root, figures)
    return [join(str(run_dir), "plots", name) for name in written]


def shipped_history(run: Path) -> pd.DataFrame | None:
    """The shipped model's metrics per epoch: a training run's, or a sweep's final fit; else the best trial's."""
    histories = [path for path in (run / "metrics.csv", run / "best_metrics.csv") if path.exists()]
    return read_history(histories[0]) if histories else None


def run_caption(run: Path, shipped: Trained | None, history: pd.DataFrame | None) -> str:
    """The caption of a run's figures: its data, the shipped model's epochs (from shipped_history) and precision,
    and its provenance."""
    epochs = len(history) if history is not None else None
    if shipped is None:
        return provenance.caption(run, None, epochs)
    return provenance.caption(run, shipped.config, epochs, shipped.precision)


def read_latents(folder: Path) -> pd.DataFrame | None:
    """The latents the figures draw (None for an empty or missing folder): without the features, most of the file,
    which only the explorer of latents written before their neighbours were kept needs."""
    files = sorted(folder.glob(LATENT_PARTS))
    if not files:
        return None
    names = pq.read_schema(files[0]).names
    return pd.read_parquet(folder, columns=[name for name in names if name != "features" or "neighbours" not in names])


def _draw_folder(run: Path, data_root: str | Path | None, wanted: Collection[str]) -> list[str]:
    """draw_run on a local folder; returns the names of the figures written."""
    history = shipped_history(run)
    trials_path, checkpoint = run / "trials.csv", find_checkpoint(run)
    latents = read_latents(run / LATENTS_DIR) if set(wanted) & set(LATENT_FIGURES) else None
    reconstructions = run / LATENTS_DIR / RECONSTRUCTIONS_FILE
    has_latents = any((run / LATENTS_DIR).glob(LATENT_PARTS))  # though only the latents' figures read them
    if not has_latents and history is None and not trials_path.exists() and checkpoint is None:
        raise UserError(
            f"{run} holds no latents/, metrics, trials.csv or checkpoint: "
            "point --run at the --out folder of a sweep or a training run"
        )
    shipped = trained(checkpoint) if checkpoint else None
    caption = run_caption(run, shipped, history)
    codes = np.concatenate(latents["codes"].to_numpy()) if latents is not None else None
    figures = [
        ("latent_space.png", latents is not None, _saved(lambda: draw_latent_space(latents))),
        ("latent_by_class.png", latents is not None, _saved(lambda: draw_latent_by_class(latents))),
        (
            "codebook_usage.png",
            codes is not None,
            _saved(lambda: draw_codebook_usage(codes, _codebook_size(run, shipped, codes))),
        ),
        ("curves.png", history is not None, _saved(lambda: draw_curves(history))),
        ("sweep.png", trials_path.exists(), _saved(lambda: draw_sweep(pd.read_csv(trials_path)))),
        (
            "reconstructions.png",
            shipped is not None,
            _saved(lambda: draw_reconstructions(shipped, data_root or shipped.config.data_root)),
        ),
        (
            "explorer.html",
            latents is not None and shipped is not None and reconstructions.is_file(),
            lambda path, caption: draw_explorer(
                latents,
                pq.read_table(reconstructions),
                data_root or shipped.config.data_root,
                shipped.config.size,
                path,
                caption,
            ),
        ),
    ]
    (run / "plots").mkdir(exist_ok=True)
    written = []
    for name, ready, draw in figures:
        if name not in wanted:
            continue
        if not ready:
            log.info("skipped %s: its input is not in %s", name, run)
            continue
        try:
            draw(run / "plots" / name, caption)
        except UserError as error:
            if data_root is not None:  # the files asked for are unusable: that is the user's to fix
                raise
            log.warning("skipped %s: %s", name, error)  # the training run's data root is not on this machine
            continue
        written.append(name)
    return written

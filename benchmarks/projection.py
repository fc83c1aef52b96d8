"""UMAP and figures for every encoded image: `add_umap_` on the Ray Data run's Parquet folder, then
`medvq.plots.draw_run` on the run folder (checkpoint, metrics.csv, latents/)."""

from __future__ import annotations

from pathlib import Path

from common import Row, timed

from medvq.config import Config
from medvq.latent_space import add_umap_
from medvq.plots import draw_run
from medvq.report import LATENTS_DIR


def measure(run: Path, config: Config) -> dict:
    print("UMAP and plots", flush=True)
    # Timed whole: add_umap_'s own figure leaves out importing umap, which compiles with numba.
    umap_seconds, fit_seconds = timed(add_umap_, run / LATENTS_DIR, seed=config.seed)
    plots_seconds, written = timed(draw_run, run, config.data_root)
    return {
        "umap_seconds": umap_seconds,
        "umap_fit_seconds": fit_seconds,
        "plots_seconds": plots_seconds,
        "figures": [Path(path).name for path in written],
    }


def rows(results: dict, images: int) -> list[Row]:
    step = f"UMAP and plots of {images:,} images"
    umap = (
        step,
        "UMAP (add_umap_)",
        f"{results['umap_seconds']:.1f} s",
        f"fit and write {results['umap_fit_seconds']:.1f} s; the rest imports umap (numba)",
    )
    return [umap, (step, f"{len(results['figures'])} figures (draw_run)", f"{results['plots_seconds']:.1f} s", "")]

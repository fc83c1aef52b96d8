"""What a sweep does with the model it ships: every image encoded and measured (report.py), with the figures of
training and of the latents (plots.py) drawn beside the probes and the UMAP."""

from __future__ import annotations

import time
from collections.abc import Collection
from pathlib import Path

from medvq.config import Config
from medvq.data import each_split_read_once
from medvq.plots import LATENT_FIGURES, TRAINING_FIGURES, draw_run
from medvq.report import encode_and_measure
from medvq.run_files import CHECKPOINT_NAME

DRAWN = {"training_plots": TRAINING_FIGURES, "plots": LATENT_FIGURES}  # step -> its figures


def encode_measure_and_draw(
    out: Path, config: Config, gpus_per_actor: float | None = None
) -> tuple[list[dict], dict[str, float]]:
    """`encode_and_measure` of OUT's model.ckpt, trained with `config`, and every figure into OUT/plots/. Returns the
    per-dataset records and each step's seconds: encode, neighbours, probes, umap, then training_plots and plots."""
    drawn = {}

    def draw(step: str, figures: Collection[str]) -> None:
        started = time.monotonic()
        draw_run(out, figures=figures)
        drawn[step] = time.monotonic() - started

    with each_split_read_once():  # the probes on pixels and the figures look at the same images
        records, seconds = encode_and_measure(
            str(out / CHECKPOINT_NAME),
            config,
            out,
            gpus_per_actor=gpus_per_actor,
            meanwhile=lambda: draw("training_plots", DRAWN["training_plots"]),
            with_the_latents=lambda: draw("plots", DRAWN["plots"]),
        )
    return records, seconds | {step: drawn[step] for step in DRAWN}  # in this order, whichever lane drew first

"""The names every training run gives its checkpoints, its history and what it reports at each check, and what a
diverged run leaves, in words. Apart from medvq.checkpoints, which reads checkpoints with torch: a Tune trial's driver
and Ray Train's controller need the names only, and torch takes a second of a core to import (benchmarks/RESULTS.md)."""

from __future__ import annotations

from pathlib import Path

CHECKPOINT_NAME = "model.ckpt"  # a local run's, and the copy every job leaves in its output folder
TRAIN_CHECKPOINT = "checkpoint.ckpt"  # inside a Ray Train checkpoint folder
METRICS_NAME = "metrics.csv"  # the per-epoch history, one row per epoch
DIVERGED, EPOCHS_DONE, EPOCH_SECONDS = (
    "diverged",
    "epochs_done",
    "epoch_seconds",
)  # reported to Ray Train and Tune beside the metrics


def kept(rows: list[dict], checkpoint: Path | str) -> str:
    """What a diverged run leaves behind, in words."""
    if not rows:
        return "no checkpoint was written"
    return f"{checkpoint} holds epoch {rows[-1]['epoch']}, the last checked, all of whose losses were finite"

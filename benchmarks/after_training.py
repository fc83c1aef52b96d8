"""What follows training in jobs/sweep.py, timed whole for a trained run: the encoding, the neighbour search, the probes
beside the UMAP, the figures; and the probes' accuracies against the run's own summary.json.

The run's model and training files are copied to a temporary folder, where the job's own calls after its final fit
run on a new local Ray instance (`after_training.encode_measure_and_draw`): the run itself is not touched.

    python benchmarks/after_training.py --run results --data-root DATA --datasets SETS_IT_TRAINED_ON
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from common import Row, benchmark_parser, ray_session, run_benchmark, timed

from medvq.after_training import encode_measure_and_draw
from medvq.checkpoints import checkpoint_config
from medvq.cli import run_job
from medvq.config import Config
from medvq.errors import UserError
from medvq.run_files import CHECKPOINT_NAME

# What the figures read besides the latents: the shipped model, its history, the sweep's trials
RUN_FILES = (CHECKPOINT_NAME, "metrics.csv", "best_metrics.csv", "trials.csv", "best.json", "provenance.json")
PROBES = ("knn_features", "knn_pixels", "linear_features", "linear_pixels", "dataset_recovered")


def copied_run(run: Path, work: Path) -> Path:
    if not (run / CHECKPOINT_NAME).is_file():
        raise UserError(f"--run {run} holds no {CHECKPOINT_NAME}: point it at the --out folder of a trained run")
    copy = work / "run"
    copy.mkdir()
    for name in RUN_FILES:
        if (run / name).is_file():
            shutil.copyfile(run / name, copy / name)
    return copy


def probe_changes(records: list[dict], summary: Path) -> dict[str, float]:
    """Each probe's accuracy now less the one in `summary` (the run's summary.json), in points, where both have it."""
    if not summary.is_file():
        return {}
    before = {record["dataset"]: record for record in json.loads(summary.read_text())}
    return {
        f"{record['dataset']} {probe}": 100 * (record[probe] - before[record["dataset"]][probe])
        for record in records
        if record["dataset"] in before
        for probe in PROBES
        if probe in before[record["dataset"]]
    }


def measure(config: Config, args: argparse.Namespace, work: Path) -> dict:
    run = copied_run(Path(args.run), work)
    trained = checkpoint_config(run / CHECKPOINT_NAME).with_changes(
        data_root=config.data_root, datasets=config.datasets
    )
    with ray_session() as ray_init:
        seconds, (records, steps) = timed(encode_measure_and_draw, run, trained)
    changes = probe_changes(records, Path(args.run) / "summary.json")
    return {"ray_init_seconds": ray_init, "total_seconds": seconds, "steps": steps, "probe_changes": changes}


def rows(results: dict) -> list[Row]:
    steps = ", ".join(f"{name} {value:.1f} s" for name, value in results["steps"].items())
    table = [
        ("after training", "jobs/sweep.py's steps after its final fit", f"{results['total_seconds']:.1f} s wall", ""),
        ("its steps", "encode_and_measure's and the figures' own seconds", steps, ""),
    ]
    if changes := results["probe_changes"]:
        largest = max(changes, key=lambda probe: abs(changes[probe]))
        compared = f"largest change: {largest}, {changes[largest]:+.2f} points"
        table.append(("probes", f"{len(changes)} accuracies against the run's summary.json", compared, ""))
    return table


def main() -> None:
    parser = benchmark_parser(__doc__, "after-training.json")
    parser.add_argument("--run", required=True, help="a trained run's --out folder (a sweep's, or results/)")
    run_benchmark(parser, measure, rows)


if __name__ == "__main__":
    run_job(main)

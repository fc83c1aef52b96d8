"""Benchmarks: how fast medvq trains and encodes, against what a user would run instead. Prints one Markdown
table and writes the raw numbers, with the hardware, as JSON.

    python benchmarks/run.py --data-root DATA --datasets bloodmnist,pneumoniamnist,retinamnist,breastmnist
    python benchmarks/run.py --smoke --data-root DATA --datasets breastmnist,retinamnist   # keeps the scripts working
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from medvq.cli import add_data_flags, dataset_names, resolve_data_root, run_job
from medvq.config import ACCELERATORS, Config
from medvq.data import check_data
from medvq.report import LATENTS_DIR
from medvq.train import CHECKPOINT_NAME

# The sections, beside this script (Ray puts this folder on its workers' path too).
import encoding
import projection
import sweep_smoke
import training
from common import Row
from hardware import caption, describe

SECONDS = 60.0  # of steady-state training per contender: long past warm-up, and epochs enough to time
WARMUP_BATCHES = 5  # first-batch costs (allocator, cuDNN autotuning, lazy imports) are not throughput
SMOKE_SECONDS, SMOKE_WARMUP_BATCHES = 2.0, 1
# The tests' tiny model; Ray Train runs of two short epochs.
SMOKE_CONFIG = dict(hidden_channels=16, embedding_dim=8, codebook_size=32, batch_size=64, limit_batches=8, epochs=2)


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    add_data_flags(parser)
    parser.add_argument("--seconds", type=float,
                        help=f"steady-state training seconds per contender (default: {SECONDS:g}; {SMOKE_SECONDS:g} with --smoke)")
    parser.add_argument("--accelerator", choices=ACCELERATORS, default="auto",
                        help="for every contender but the 2-CPU-worker run (default: %(default)s)")
    parser.add_argument("--smoke", action="store_true",
                        help="a tiny medvq model and a few seconds per contender: checks the scripts, measures nothing")
    parser.add_argument("--no-sweep", action="store_true",
                        help="leave out the whole-job row (jobs/sweep.py --smoke: minutes on a laptop CPU)")
    parser.add_argument("--out", default="benchmark.json", help="raw numbers as JSON (default: %(default)s)")
    return parser


def markdown_table(rows: list[Row]) -> str:
    lines = ["| step | contender | result | compared |", "| --- | --- | --- | --- |"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows]) + "\n"


def measure_all(config: Config, seconds: float, warmup: int, sweep: bool, work: Path) -> dict:
    """Every section in turn; each leaves what the next needs in `work/run` (checkpoint, metrics, latents)."""
    run = work / "run"
    run.mkdir()
    results = {"training": training.measure(config, seconds, warmup, run, work)}
    results["encoding"] = encoding.measure(run / CHECKPOINT_NAME, config, run / LATENTS_DIR, work)
    results["projection"] = projection.measure(run, config)
    if sweep:
        results["sweep"] = sweep_smoke.measure(config, work / "sweep")
    return results


def table_rows(results: dict) -> list[Row]:
    return [*training.rows(results["training"]), *encoding.rows(results["encoding"]),
            *projection.rows(results["projection"], results["encoding"]["ray_data"]["images"]),
            *(sweep_smoke.rows(results["sweep"]) if "sweep" in results else [])]


def main() -> None:
    args = parser().parse_args()
    config = Config(data_root=resolve_data_root(args.data_root), datasets=dataset_names(args.datasets),
                    accelerator=args.accelerator, **(SMOKE_CONFIG if args.smoke else {}))
    seconds = args.seconds or (SMOKE_SECONDS if args.smoke else SECONDS)
    warmup = SMOKE_WARMUP_BATCHES if args.smoke else WARMUP_BATCHES
    check_data(config)
    hardware = describe()
    with tempfile.TemporaryDirectory(prefix="medvq-benchmark-") as work:
        results = measure_all(config, seconds, warmup, not args.no_sweep, Path(work))
    table = markdown_table(table_rows(results))
    settings = {"smoke": args.smoke, "seconds": seconds, "warmup_batches": warmup, "config": config.to_dict()}
    Path(args.out).write_text(json.dumps({"hardware": hardware, "settings": settings, **results, "table": table},
                                         indent=2) + "\n")
    print(f"\n{caption(hardware)}\n\n{table}\nraw numbers: {args.out}")


if __name__ == "__main__":
    run_job(main)

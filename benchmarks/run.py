"""Benchmarks: how fast medvq trains and encodes, against what a user would run instead. Prints one Markdown
table and writes the raw numbers, with the hardware, as JSON.

    python benchmarks/run.py --data-root DATA --datasets bloodmnist,pneumoniamnist,retinamnist,breastmnist
    python benchmarks/run.py --smoke --data-root DATA --datasets breastmnist,retinamnist   # keeps the scripts working
    python benchmarks/run.py --synthetic --batch-sizes 1024,4096 --compile --no-sweep      # a GPU without the files
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

# The sections, beside this script (Ray puts this folder on its workers' path too).
import encoding
import projection
import ray_overhead
import sweep_job
import training
from common import Row, add_data_source_flags, data_root
from hardware import caption, describe

from medvq.cli import POSITIVE_INT, JobParser, list_value, run_job
from medvq.config import Config
from medvq.data import check_data
from medvq.report import LATENTS_DIR
from medvq.train import CHECKPOINT_NAME

SECONDS = 60.0  # of steady-state training per contender: long past warm-up, and epochs enough to time
WARMUP_BATCHES = 5  # first-batch costs (allocator, cuDNN autotuning, lazy imports) are not throughput
SMOKE_SECONDS, SMOKE_WARMUP_BATCHES = 2.0, 1
STEPS, SMOKE_STEPS = 60, 3  # training steps timed per thread count for Ray Train's overhead
# The tests' tiny model; Ray Train runs of two short epochs.
SMOKE_CONFIG = dict(hidden_channels=16, embedding_dim=8, codebook_size=32, batch_size=64, limit_batches=8, epochs=2)


def parser() -> JobParser:
    parser = JobParser(__doc__.strip().splitlines()[0])
    add_data_source_flags(parser)
    parser.add_argument(
        "--seconds",
        type=float,
        help=f"steady-state training seconds per contender (default: {SECONDS:g}; {SMOKE_SECONDS:g} with --smoke)",
    )
    parser.add_settings(Config, ("accelerator",))  # for every contender but the 2-CPU-worker run
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="a tiny medvq model and a few seconds per contender: checks the scripts, measures nothing",
    )
    parser.add_argument(
        "--no-sweep",
        action="store_true",
        help="leave out the whole-job row (jobs/sweep.py --smoke: minutes on a laptop CPU)",
    )
    parser.add_argument(
        "--batch-sizes",
        type=list_value(POSITIVE_INT),
        default=(),
        help="comma-separated: medvq as shipped again at each of these batch sizes (for a GPU: 1024,4096)",
    )
    parser.add_argument("--compile", action="store_true", help="and each --batch-sizes run again with torch.compile")
    parser.add_argument("--out", default="benchmark.json", help="raw numbers as JSON (default: %(default)s)")
    return parser


def markdown_table(rows: list[Row]) -> str:
    lines = ["| step | contender | result | compared |", "| --- | --- | --- | --- |"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows]) + "\n"


def measure_all(
    config: Config, args: argparse.Namespace, batch_sizes: tuple[int, ...], seconds: float, warmup: int, work: Path
) -> dict:
    """Every section in turn; each leaves what the next needs in `work/run` (checkpoint, metrics, latents)."""
    run = work / "run"
    run.mkdir()
    results = {"training": training.measure(config, seconds, warmup, run, work, batch_sizes, args.compile)}
    results["ray_overhead"] = ray_overhead.measure(config, SMOKE_STEPS if args.smoke else STEPS, work)
    results["encoding"] = encoding.measure(run / CHECKPOINT_NAME, config, run / LATENTS_DIR, work)
    results["projection"] = projection.measure(run, config)
    if not args.no_sweep:
        results["sweep"] = sweep_job.measure(config, work / "sweep")
    return results


def table_rows(results: dict) -> list[Row]:
    return [
        *training.rows(results["training"]),
        *ray_overhead.rows(results["ray_overhead"]),
        *encoding.rows(results["encoding"]),
        *projection.rows(results["projection"], results["encoding"]["ray_data"]["images"]),
        *(sweep_job.rows(results["sweep"]) if "sweep" in results else []),
    ]


def main() -> None:
    args = parser().parse_args()
    batch_sizes = args.batch_sizes
    seconds = args.seconds or (SMOKE_SECONDS if args.smoke else SECONDS)
    warmup = SMOKE_WARMUP_BATCHES if args.smoke else WARMUP_BATCHES
    hardware = describe()
    with tempfile.TemporaryDirectory(prefix="medvq-benchmark-") as work:
        config = Config(
            data_root=data_root(args, Path(work)),
            datasets=args.datasets,
            accelerator=args.accelerator,
            **(SMOKE_CONFIG if args.smoke else {}),
        )
        check_data(config)
        results = measure_all(config, args, batch_sizes, seconds, warmup, Path(work))
    table = markdown_table(table_rows(results))
    settings = {
        "smoke": args.smoke,
        "synthetic": args.synthetic,
        "seconds": seconds,
        "warmup_batches": warmup,
        "config": config.to_dict(),
    }
    Path(args.out).write_text(
        json.dumps({"hardware": hardware, "settings": settings, **results, "table": table}, indent=2) + "\n"
    )
    data = "synthetic files (speeds only: the quality rows mean nothing)" if args.synthetic else config.data_root
    print(f"\n{caption(hardware)}\ndata: {data}\n\n{table}\nraw numbers: {args.out}")


if __name__ == "__main__":
    run_job(main)

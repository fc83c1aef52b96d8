"""The medvq job: search codebook size x commitment weight, then encode, measure and draw the best model.

Ray Tune runs one Ray Train run per trial; Ray Data encodes every image with the best model to Parquet.

    python jobs/sweep.py --smoke --data-root DATA --out runs/smoke                      # local Ray
    ray job submit --working-dir . -- python jobs/sweep.py --data-root DATA --out OUT   # a cluster
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

from medvq.cli import (NON_NEGATIVE, POSITIVE, POSITIVE_INT, add_training_flags, common_parser, config_from_args,
                       parse_list, parse_range, run_job, start_ray, storage_from_args, text_value)
from medvq.config import SweepConfig, smoke_sweep
from medvq.data import check_data
from medvq.errors import UserError
from medvq.latent_space import summary_markdown, write_summary
from medvq.nodes import capacity, check_nodes_see
from medvq.plots import draw_run
from medvq.report import describe_checkpoint
from medvq.storage import check_writable, output_folder
from medvq.train import CHECKPOINT_NAME
from medvq.tune import run_sweep, write_sweep_outputs


def parser():
    parser = common_parser(__doc__.strip().splitlines()[0])
    add_training_flags(parser)
    parser.add_argument("--storage", type=text_value, help="Ray Train/Tune storage: a folder, shared mount or s3:// URI "
                        "(default: OUT/ray_results); the same command resumes from it")
    parser.add_argument("--smoke", action="store_true", help="two tiny trials: checks the whole job in minutes on a CPU")
    parser.add_argument("--codebook-sizes", default=",".join(map(str, SweepConfig.codebook_sizes)))
    parser.add_argument("--commitment-weights", default="0.05:2",
                        help="LOW:HIGH, sampled log-uniformly, or a comma-separated grid (default: %(default)s)")
    parser.add_argument("--num-samples", type=POSITIVE_INT, default=SweepConfig.num_samples,
                        help="samples per codebook size (default: %(default)s)")
    parser.add_argument("--workers-per-trial", type=POSITIVE_INT, default=1, help="DDP workers per trial, one per GPU")
    parser.add_argument("--gpus-per-trial", type=NON_NEGATIVE,
                        help="GPUs per trial (default: one per worker if the cluster has GPUs, else 0); "
                        "a fraction packs several one-worker trials on a GPU")
    parser.add_argument("--cpus-per-worker", type=POSITIVE, default=1.0)
    parser.add_argument("--max-concurrent-trials", type=POSITIVE_INT, help="default: as many as the cluster fits")
    return parser


SEARCH_FLAGS = ("codebook_sizes", "commitment_weights", "num_samples")  # what --smoke sets itself


def sweep_from_args(args: argparse.Namespace, defaults: argparse.ArgumentParser) -> SweepConfig:
    base = config_from_args(args).with_changes(workers=args.workers_per_trial, cpus_per_worker=args.cpus_per_worker)
    if args.smoke:
        given = [f"--{name.replace('_', '-')}" for name in SEARCH_FLAGS
                 if getattr(args, name) != defaults.get_default(name)]
        if given:
            raise UserError(f"--smoke runs its own two trials: drop {', '.join(given)}, or drop --smoke")
        return replace(smoke_sweep(base), max_concurrent_trials=args.max_concurrent_trials)
    if ":" in args.commitment_weights:
        commitment = dict(commitment_range=parse_range(args.commitment_weights, "--commitment-weights"))
    else:
        grid = parse_list(args.commitment_weights, POSITIVE, "--commitment-weights")
        if not grid:  # an empty grid would silently mean SweepConfig's default range
            raise UserError(f"--commitment-weights takes LOW:HIGH or a comma-separated list, got {args.commitment_weights!r}")
        commitment = dict(commitment_grid=grid)
    return SweepConfig(base, codebook_sizes=parse_list(args.codebook_sizes, POSITIVE_INT, "--codebook-sizes"),
                       num_samples=args.num_samples, max_concurrent_trials=args.max_concurrent_trials, **commitment)


def with_gpus(sweep: SweepConfig, gpus_per_trial: float | None, cluster_gpus: float) -> SweepConfig:
    """Resolve --gpus-per-trial against the cluster: GPUs by default when there are any."""
    workers = sweep.base.workers
    if gpus_per_trial is None:
        gpus_per_trial = workers if cluster_gpus > 0 else 0
    if sweep.base.accelerator == "cpu":
        gpus_per_trial = 0
    elif sweep.base.accelerator == "gpu" and gpus_per_trial == 0:
        raise UserError("--accelerator gpu was asked for, but the cluster has no GPUs (or --gpus-per-trial is 0)")
    return replace(sweep, base=sweep.base.with_changes(gpus_per_worker=gpus_per_trial / workers))


def sweep_summary(best: dict, seconds: dict[str, float]) -> str:
    metrics, config = best["metrics"], best["config"]
    statuses = ", ".join(f"{n} {status}" for status, n in best["trials_by_status"].items())
    return (f"{best['trials']} trials ({statuses}); best {best['trial_id']}: codebook {config['codebook_size']}, "
            f"commitment {config['commitment_weight']:.3g}, seed {config['seed']}, val_nmse {metrics['val_nmse']:.4f}, val PSNR {metrics['val_psnr']:.2f} dB, "
            f"SSIM {metrics['val_ssim']:.3f}, codes used {metrics['val_codes_used']:.0%}\n"
            f"checkpoint {best['checkpoint']} (copied to model.ckpt)\n"
            f"seconds: " + ", ".join(f"{step} {value:.1f}" for step, value in seconds.items()) + "\n")


def main() -> None:
    flags = parser()
    args = flags.parse_args()
    sweep = sweep_from_args(args, flags)
    storage, storage_flag = storage_from_args(args)
    check_data(sweep.base)
    seconds, started = {}, time.monotonic()
    start_ray()  # the terminal shows Tune's trial table and Ray Data's progress; worker logs stay in Ray's
    seconds["ray_init"] = time.monotonic() - started
    most = capacity()  # with an autoscaler: what the cluster can grow to, not only the nodes up now
    sweep = with_gpus(sweep, args.gpus_per_trial, most.totals.get("GPU", 0))
    fits = most.runs_at_once(sweep.base)
    check_nodes_see(sweep.base, storage, storage_flag)
    check_writable(storage)
    with output_folder(args.out) as out:
        print(f"sweep {sweep.run_name()}: {sweep.trial_count} trials, up to "
              f"{min(fits, sweep.max_concurrent_trials or fits, sweep.trial_count)} at once, storage {storage}",
              flush=True)
        search_and_describe(sweep, storage, out, seconds)
    print(f"wrote trials.csv, trials.parquet, best.json, best_metrics.csv, model.ckpt, latents/, summary.json, "
          f"summary.md and plots/ to {args.out}")


def search_and_describe(sweep: SweepConfig, storage: str, out: Path, seconds: dict[str, float]) -> None:
    """Search, then encode, measure and draw the best model; `seconds` gathers each step's time."""
    started = time.monotonic()
    results = run_sweep(sweep, storage)
    seconds["search"] = time.monotonic() - started
    out.mkdir(parents=True, exist_ok=True)
    best = write_sweep_outputs(results, sweep, storage, out)
    # The model encodes on the devices it trained on: CPU trials, CPU encoder actors.
    gpus_per_actor = None if sweep.base.gpus_per_worker > 0 else 0.0
    records, described = describe_checkpoint(str(out / CHECKPOINT_NAME), sweep.base, out, gpus_per_actor=gpus_per_actor)
    seconds.update(described)
    started = time.monotonic()
    draw_run(out)
    seconds["plots"] = time.monotonic() - started
    summary = sweep_summary(best, seconds)
    write_summary(records, out, preface=summary)
    print(summary + summary_markdown(records), flush=True)


if __name__ == "__main__":
    run_job(main)

"""The medvq job: search codebook size x commitment weight, then encode, measure and draw the best model.

Ray Tune runs one Ray Train run per trial; Ray Data encodes every image with the best model to Parquet.

    python jobs/sweep.py --smoke --data-root DATA --out runs/smoke                      # local Ray
    ray job submit --working-dir . -- python jobs/sweep.py --data-root DATA --out OUT   # a cluster
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from medvq.after_training import encode_measure_and_draw
from medvq.cli import (
    NON_NEGATIVE,
    POSITIVE,
    POSITIVE_INT,
    JobParser,
    check_same_run,
    config_from_args,
    list_value,
    run_job,
    run_record,
    start_ray,
    storage_from_args,
    training_parser,
)
from medvq.config import Config, SweepConfig, smoke_sweep
from medvq.data import check_data
from medvq.devices import SHARED_GPU, SHARED_UP_TO_SIZE, default_gpus_per_trial, uses_gpu, workers_device
from medvq.errors import UserError
from medvq.latent_space import summary_markdown, write_summary
from medvq.nodes import capacity, check_nodes_see
from medvq.provenance import ray_hardware, write_provenance
from medvq.ray_train import train_on_ray
from medvq.storage import check_writable, output_folder
from medvq.tune import final_fit_name, run_sweep, sweep_start, write_final_fit, write_sweep_outputs


def commitment_weights(text: str) -> dict:
    """--commitment-weights: "LOW:HIGH" -> a range to sample, "a,b,c" -> a grid (SweepConfig's two fields)."""
    if ":" not in text and (grid := list_value(POSITIVE)(text)):
        return {"commitment_grid": grid}
    parts = text.split(":")
    try:
        low, high = (POSITIVE(part) for part in parts) if len(parts) == 2 else (None, None)
    except argparse.ArgumentTypeError:
        low = None
    if low is None:
        raise argparse.ArgumentTypeError(
            f"takes LOW:HIGH (two numbers > 0) or a comma-separated list of numbers > 0, got {text!r}"
        )
    return {"commitment_range": (low, high)}


DEFAULT_COMMITMENT = "{}:{}".format(*SweepConfig.commitment_range)


def parser() -> JobParser:
    parser = training_parser(__doc__.strip().splitlines()[0])
    parser.add_argument(
        "--smoke", action="store_true", help="two tiny trials: checks the whole job in minutes on a CPU"
    )
    parser.add_settings(SweepConfig)
    parser.add_argument(
        "--commitment-weights",
        type=commitment_weights,
        default=commitment_weights(DEFAULT_COMMITMENT),
        help=f"LOW:HIGH, sampled log-uniformly, or a comma-separated grid (default: {DEFAULT_COMMITMENT})",
    )
    parser.add_argument(
        "--workers-per-trial",
        type=POSITIVE_INT,
        default=Config.workers,
        help="DDP workers per trial, one per GPU (default: %(default)s)",
    )
    parser.add_argument(
        "--gpus-per-trial",
        type=NON_NEGATIVE,
        help=f"GPUs per trial (default, if the cluster has GPUs: {SHARED_GPU:g} for a one-worker trial at up to "
        f"{SHARED_UP_TO_SIZE} px, so several share a GPU; else one per worker; 0 without GPUs)",
    )
    return parser


SEARCH_FLAGS = ("codebook_sizes", "commitment_weights", "num_samples")  # what --smoke sets itself


def sweep_from_args(args: argparse.Namespace, flags: JobParser) -> SweepConfig:
    base = config_from_args(flags, args, workers=args.workers_per_trial)
    if args.smoke:
        given = [
            f"--{name.replace('_', '-')}" for name in SEARCH_FLAGS if getattr(args, name) != flags.get_default(name)
        ]
        if given:
            raise UserError(f"--smoke runs its own two trials: drop {', '.join(given)}, or drop --smoke")
        return replace(smoke_sweep(base), max_concurrent_trials=args.max_concurrent_trials)
    return flags.build(SweepConfig, args, base=base, **args.commitment_weights)


def with_gpus(sweep: SweepConfig, gpus_per_trial: float | None, cluster_gpus: float) -> SweepConfig:
    """Resolve --gpus-per-trial against the cluster: when it has GPUs, part of one for a one-worker trial of small
    images by default, else one per worker (devices.default_gpus_per_trial)."""
    workers = sweep.base.workers
    if_none = "the cluster has no GPUs" if gpus_per_trial is None else "--gpus-per-trial is 0"
    use_gpu = uses_gpu(sweep.base.accelerator, cluster_gpus if gpus_per_trial is None else gpus_per_trial, if_none)
    per_trial = (gpus_per_trial or default_gpus_per_trial(workers, sweep.base.size)) if use_gpu else 0
    return replace(sweep, base=sweep.base.with_changes(gpus_per_worker=per_trial / workers))


def sweep_summary(best: dict, seconds: dict[str, float]) -> str:
    metrics, config = best["metrics"], best["config"]
    statuses = ", ".join(f"{n} {status}" for status, n in best["trials_by_status"].items())
    shipped = "model.ckpt is the final fit's" if "final_fit" in best else "copied to model.ckpt"
    return (
        f"{best['trials']} trials ({statuses}); best {best['trial_id']}: codebook {config['codebook_size']}, "
        f"commitment {config['commitment_weight']:.3g}, seed {config['seed']}, {scores(metrics)}\n"
        + final_fit_line(best)
        + f"checkpoint {best['checkpoint']} ({shipped})\n"
        + "seconds: "
        + ", ".join(f"{step} {value:.1f}" for step, value in seconds.items())
        + "\n"
    )


def scores(metrics: dict[str, float]) -> str:
    return (
        f"val_nmse {metrics['val_nmse']:.4f}, val PSNR {metrics['val_psnr']:.2f} dB, SSIM {metrics['val_ssim']:.3f}, "
        f"codes used {metrics['val_codes_used']:.0%}"
    )


def final_fit_line(best: dict) -> str:
    final = best.get("final_fit")
    return (
        f"final fit of those settings (--final-epochs {final['epochs']}): {scores(final['metrics'])}\n" if final else ""
    )


def main() -> None:
    flags = parser()
    args = flags.parse_args()
    sweep = sweep_from_args(args, flags)
    run = run_record("sweep", args.out, sweep)
    check_same_run(args.out, run)
    storage, storage_flag = storage_from_args(args)
    check_data(sweep.base)
    seconds = {}
    timed(seconds, "ray_init", start_ray)  # Tune's table and Ray Data's progress show here; workers' logs stay in Ray's
    most = capacity()  # with an autoscaler: what the cluster can grow to, not only the nodes up now
    sweep = with_gpus(sweep, args.gpus_per_trial, most.totals.get("GPU", 0))
    fits = most.runs_at_once(sweep.base)
    check_nodes_see(sweep.base, storage, storage_flag)
    check_writable(storage)
    with output_folder(args.out) as out:
        write_provenance(out, ray_hardware(most.totals, most.autoscaling), args.out, run)
        print(
            f"{sweep_start(sweep, storage, run['name'], args.out)}; up to "
            f"{min(fits, sweep.max_concurrent_trials or fits, sweep.trial_count)} at once on "
            f"{workers_device(sweep.base.gpus_per_worker)}, storage {storage}",
            flush=True,
        )
        search_and_describe(sweep, storage, run["name"], out, seconds)
    history = "metrics.csv, " if sweep.final_epochs else ""  # the final fit's; --final-epochs 0 writes none
    print(
        f"wrote trials.csv, trials.parquet, best.json, best_metrics.csv, model.ckpt, {history}latents/, "
        f"summary.json, summary.md, provenance.json and plots/ to {args.out}"
    )


def timed(seconds: dict[str, float], step: str, work: Callable, *args, **kwargs):
    """work(*args, **kwargs), its seconds kept as seconds[step]; returns what it returns."""
    started = time.monotonic()
    result = work(*args, **kwargs)
    seconds[step] = time.monotonic() - started
    return result


def search_and_describe(sweep: SweepConfig, storage: str, name: str, out: Path, seconds: dict[str, float]) -> None:
    """Search (the sweep `name`), then encode, measure and draw the best model; `seconds` gathers each step's time."""
    results = timed(seconds, "search", run_sweep, sweep, storage, name)
    out.mkdir(parents=True, exist_ok=True)
    best = write_sweep_outputs(results, sweep, storage, out)
    config = Config.from_dict(best["config"])
    if sweep.final_epochs:
        config, final = config.with_changes(epochs=sweep.final_epochs), final_fit_name(name)
        print(f"final fit {final}: the best trial's settings, --final-epochs {config.epochs}", flush=True)
        fitted = timed(seconds, "final_fit", train_on_ray, config, out, storage, final)
        best = write_final_fit(best, config, fitted, out)
    # The model encodes on the devices it trained on: CPU trials, CPU encoder actors.
    gpus_per_actor = None if sweep.base.gpus_per_worker > 0 else 0.0
    records, described = encode_measure_and_draw(out, config, gpus_per_actor)
    seconds.update(described)
    summary = sweep_summary(best, seconds)
    write_summary(records, out, preface=summary)
    print(summary + summary_markdown(records), flush=True)


if __name__ == "__main__":
    run_job(main)

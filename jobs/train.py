"""Train one VQ-VAE: in this process (CPU or one GPU), or as a Ray Train run of DDP workers.

Both keep a checkpoint at every check (`--check-every`: every epoch on a CPU); the same command continues a run that
was stopped.

    python jobs/train.py --data-root ../shared/medmnist --datasets bloodmnist,breastmnist --epochs 1 --out runs/dev
    python jobs/train.py --data-root DATA --workers --out runs/ddp      # Ray Train: one worker per GPU of the cluster
"""

from pathlib import Path

from medvq.cli import (
    POSITIVE_INT,
    JobParser,
    check_same_run,
    config_from_args,
    run_job,
    run_record,
    start_ray,
    storage_from_args,
    training_parser,
)
from medvq.config import Config
from medvq.data import check_data
from medvq.devices import local_device_line, resolve_accelerator, uses_gpu, workers_device
from medvq.errors import UserError
from medvq.nodes import Capacity, capacity, check_nodes_see
from medvq.provenance import local_hardware, ray_hardware, write_provenance
from medvq.ray_train import train_on_ray
from medvq.storage import check_writable, is_uri, output_folder
from medvq.train import local_resume_point, train_local


def parser() -> JobParser:
    parser = training_parser(__doc__.strip().splitlines()[0], searched=True)
    parser.add_argument(
        "--workers",
        dest="ray_workers",
        nargs="?",
        const="all",
        type=POSITIVE_INT,
        help="train under Ray Train with this many DDP workers; alone: one worker per GPU of the "
        "cluster (default: no Ray, this process)",
    )
    return parser


def with_workers(config: Config, workers: int | str, cluster: Capacity) -> Config:
    """Resolve --workers against the cluster: GPU workers (one GPU each) whenever it has (or can add) GPUs."""
    gpus = cluster.totals.get("GPU", 0)
    use_gpu = uses_gpu(config.accelerator, gpus, "the cluster has no GPUs")
    if workers == "all":
        if not use_gpu:
            raise UserError(
                "--workers alone means one worker per GPU, and the cluster has none: give a number of CPU workers"
            )
        count = int(gpus)
    else:
        count = workers
    config = config.with_changes(workers=count, gpus_per_worker=1.0 if use_gpu else 0.0)
    cluster.runs_at_once(config)  # a clear error if the run does not fit
    return config


def main() -> None:
    flags = parser()
    args = flags.parse_args()
    config = config_from_args(flags, args)
    check_data(config)
    run = None  # a local run is what its --out holds (local_resume_point); a Ray Train run, what run_record names
    if args.ray_workers is None:
        hardware = local_hardware(resolve_accelerator(config.accelerator))
        if not is_uri(args.out):
            local_resume_point(config, Path(args.out))  # refuses a folder it cannot continue, before any work
    else:
        start_ray()
        cluster = capacity()
        hardware = ray_hardware(cluster.totals, cluster.autoscaling)
        config = with_workers(config, args.ray_workers, cluster)
        run = run_record("train", args.out, config)
        check_same_run(args.out, run)
        storage, storage_flag = storage_from_args(args)
        check_nodes_see(config, storage, storage_flag)
        check_writable(storage)
    with output_folder(args.out) as out:
        write_provenance(out, hardware, args.out, run)
        if args.ray_workers is None:
            print(local_device_line(config.accelerator, config.precision), flush=True)
            final = train_local(config, out)
        else:
            workers = f"{config.workers} workers on {workers_device(config.gpus_per_worker)}"
            print(f"Ray Train run {run['name']}: {workers}, storage {storage}", flush=True)
            final = train_on_ray(config, out, storage, run["name"])
    print(
        f"val PSNR {final['val_psnr']:.2f} dB, SSIM {final['val_ssim']:.3f}, MAE {final['val_mae']:.4f}, "
        f"codes used {final['val_codes_used']:.0%} of {config.codebook_size} "
        f"(perplexity {final['val_perplexity']:.1f}), "
        f"val_nmse {final['val_nmse']:.4f}"
    )
    print(f"wrote model.ckpt, metrics.csv and provenance.json to {args.out}")


if __name__ == "__main__":
    run_job(main)

"""Encode every image of the chosen datasets (all splits) to Parquet latents with Ray Data.

python jobs/encode.py --checkpoint runs/dev/model.ckpt --data-root DATA --datasets bloodmnist,breastmnist --out runs/dev
"""

from medvq.checkpoints import checkpoint_config
from medvq.cli import (
    NON_NEGATIVE,
    POSITIVE_INT,
    JobParser,
    add_data_flags,
    add_out_flag,
    resolve_data_root,
    run_job,
    start_ray,
    text_value,
)
from medvq.data import check_data
from medvq.errors import UserError
from medvq.latent_space import write_summary
from medvq.nodes import capacity, check_nodes_see
from medvq.provenance import ray_hardware, write_provenance
from medvq.report import encode_and_measure
from medvq.storage import absolute, is_file, output_folder


def parser() -> JobParser:
    parser = JobParser(__doc__.strip().splitlines()[0])
    parser.add_argument(
        "--checkpoint",
        required=True,
        type=text_value,
        help="a medvq checkpoint, a path or a URI: model.ckpt of jobs/train.py, or the one a sweep's best.json names",
    )
    add_data_flags(parser, datasets=None)
    add_out_flag(
        parser,
        "output folder (or s3:// URI): latents/, summary.json, summary.md and provenance.json land there "
        "(an older latents/ is replaced; an older provenance.json keeps its first start)",
    )
    parser.add_argument(
        "--actors", type=POSITIVE_INT, help="encoder actors (default: one per GPU, else one per two CPUs)"
    )
    parser.add_argument(
        "--gpus-per-actor",
        type=NON_NEGATIVE,
        help="default: 1 if the cluster has GPUs, else 0; a fraction shares a GPU between actors",
    )
    return parser


def main() -> None:
    args = parser().parse_args()
    checkpoint = absolute(args.checkpoint)  # a path or a URI: the encoder actors get the model's bytes from here
    if not is_file(checkpoint):
        raise UserError(f"--checkpoint {args.checkpoint} is not a file")
    try:
        trained = checkpoint_config(checkpoint)
    except UserError:
        raise
    except Exception as error:  # torch raises many types for a file that is not a checkpoint
        raise UserError(f"--checkpoint {args.checkpoint} is not a medvq checkpoint ({type(error).__name__})") from None
    datasets = args.datasets or trained.datasets
    config = trained.with_changes(data_root=resolve_data_root(args.data_root), datasets=datasets)
    check_data(config)
    start_ray()
    check_nodes_see(config)
    most = capacity()
    with output_folder(args.out) as out:
        write_provenance(out, ray_hardware(most.totals, most.autoscaling), args.out)
        records, _ = encode_and_measure(checkpoint, config, out, actors=args.actors, gpus_per_actor=args.gpus_per_actor)
        write_summary(records, out, preface=f"Latents of {', '.join(config.datasets)} from {checkpoint}\n")
    print(
        f"wrote latents/, summary.json, summary.md and provenance.json to {args.out}; "
        "read the latents with pandas.read_parquet"
    )


if __name__ == "__main__":
    run_job(main)

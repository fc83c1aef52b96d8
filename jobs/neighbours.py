"""Print the images nearest one image in a run's latent space, and draw them into RUN/plots/.

python jobs/neighbours.py --run runs/sweep --dataset bloodmnist --split test --index 17 --k 8
"""

from medvq.cli import NON_NEGATIVE_INT, POSITIVE_INT, JobParser, add_run_flags, run_job
from medvq.data import SPLITS
from medvq.latent_space import NEIGHBOURS
from medvq.neighbours import neighbours_of


def main() -> None:
    parser = JobParser(__doc__.strip().splitlines()[0])
    add_run_flags(parser)
    parser.add_argument("--dataset", required=True, help="a dataset of the run")
    parser.add_argument("--split", required=True, help=", ".join(SPLITS))
    parser.add_argument("--index", type=NON_NEGATIVE_INT, required=True, help="the image's row in that split")
    parser.add_argument(
        "--k", type=POSITIVE_INT, default=NEIGHBOURS, help="how many (default: %(default)s, as on the explorer page)"
    )
    args = parser.parse_args()
    table, picture = neighbours_of(args.run, args.dataset, args.split, args.index, args.k, args.data_root)
    print(f"{args.dataset} {args.split} {args.index} and its {args.k} nearest images in the latent space:")
    print(table.to_string(index=False, float_format="{:.4f}".format))
    print(f"wrote {picture}")


if __name__ == "__main__":
    run_job(main)

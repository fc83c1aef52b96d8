"""Print the images nearest one image in a run's latent space, and draw them into RUN/plots/.

python jobs/neighbours.py --run runs/sweep --dataset bloodmnist --split test --index 17 --k 8
"""

from medvq.cli import JobParser, run_job
from medvq.data import SPLITS
from medvq.latent_space import NEIGHBOURS
from medvq.neighbours import neighbours_of


def main() -> None:
    parser = JobParser(__doc__.strip().splitlines()[0])
    parser.add_argument(
        "--run", required=True, help="a folder (or URI) with latents/: the --out of jobs/sweep.py or jobs/encode.py"
    )
    parser.add_argument("--dataset", required=True, help="a dataset of the run")
    parser.add_argument("--split", required=True, help=", ".join(SPLITS))
    parser.add_argument("--index", type=int, required=True, help="the image's row in that split")
    parser.add_argument(
        "--k", type=int, default=NEIGHBOURS, help="how many (default: %(default)s, as on the explorer page)"
    )
    parser.add_argument(
        "--data-root", help="MedMNIST files for the picture (default: the data root the model was trained on)"
    )
    args = parser.parse_args()
    table, picture = neighbours_of(args.run, args.dataset, args.split, args.index, args.k, args.data_root)
    print(f"{args.dataset} {args.split} {args.index} and its {args.k} nearest images in the latent space:")
    print(table.to_string(index=False, float_format="{:.4f}".format))
    print(f"wrote {picture}")


if __name__ == "__main__":
    run_job(main)

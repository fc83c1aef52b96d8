"""Draw a run's figures (latent space, curves, sweep, reconstructions, codebook usage) into RUN/plots/.

python jobs/plot.py --run runs/sweep --data-root ../shared/medmnist
"""

from medvq.cli import JobParser, run_job, text_value
from medvq.plots import draw_run


def main() -> None:
    parser = JobParser(__doc__.strip().splitlines()[0])
    parser.add_argument(
        "--run", required=True, type=text_value, help="the --out folder of jobs/sweep.py or jobs/train.py"
    )
    parser.add_argument(
        "--data-root",
        type=text_value,
        help="MedMNIST files for the reconstructions (default: the data root the model was trained on)",
    )
    args = parser.parse_args()
    for path in draw_run(args.run, args.data_root):
        print(f"wrote {path}")


if __name__ == "__main__":
    run_job(main)

"""Draw a run's figures (latent space, curves, sweep, reconstructions, codebook usage) into RUN/plots/.

python jobs/plot.py --run runs/sweep --data-root ../shared/medmnist
"""

from medvq.cli import JobParser, add_run_flags, run_job
from medvq.plots import draw_run


def main() -> None:
    parser = JobParser(__doc__.strip().splitlines()[0])
    add_run_flags(parser)
    args = parser.parse_args()
    for path in draw_run(args.run, args.data_root):
        print(f"wrote {path}")


if __name__ == "__main__":
    run_job(main)

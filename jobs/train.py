"""Train the VQ-VAE locally, on the CPU or one GPU.

    python jobs/train.py --data-root ../shared/medmnist --datasets bloodmnist,breastmnist --epochs 1 --out runs/dev
"""

from pathlib import Path

from medvq.cli import add_searched_flags, add_training_flags, common_parser, config_from_args, run_job
from medvq.errors import UserError
from medvq.data import check_data
from medvq.train import resolve_accelerator, train_local


def main() -> None:
    parser = common_parser(__doc__.strip().splitlines()[0])
    add_searched_flags(parser)
    add_training_flags(parser)
    args = parser.parse_args()
    config = config_from_args(args)
    resolve_accelerator(config.accelerator)
    check_data(config)
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"--out {out} is not empty: choose a new folder")
    out.mkdir(parents=True, exist_ok=True)
    final = train_local(config, out)
    print(f"val PSNR {final['val_psnr']:.2f} dB, SSIM {final['val_ssim']:.3f}, MAE {final['val_mae']:.4f}, "
          f"codes used {final['val_codes_used']:.0%} of {config.codebook_size} (perplexity {final['val_perplexity']:.1f}), "
          f"val_nmse {final['val_nmse']:.4f}")
    print(f"wrote {out / 'model.ckpt'} and {out / 'metrics.csv'}")


if __name__ == "__main__":
    run_job(main)

"""How well each latent grid and codebook size can model the images: validation PSNR and SSIM against the bits one
image's codes take (grid cells x log2 K), every row `jobs/train.py` trained for the same epochs. Writes
OUT/rate_distortion.csv, .md (the table, each row's command) and .png (both scores against bits, a line per grid).

    python benchmarks/rate_distortion.py --data-root ../shared/medmnist \
        --datasets bloodmnist,breastmnist,pneumoniamnist,retinamnist --epochs 12 --out results/rate_distortion
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
from ablations import common_flags, markdown, score_columns, table_parser, trained_row
from common import caption as hardware_caption
from common import describe
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter, ScalarFormatter

from medvq.cli import POSITIVE, POSITIVE_INT, list_value, run_job
from medvq.errors import UserError

GRIDS = {28: (14, 7), 64: (8, 4)}  # image side -> the latent grid sides drawn (the choice)
CODEBOOK_SIZES = (64, 256, 1024)
FIGURE_SIZE = (10, 4)  # inches: PSNR and SSIM side by side
SEED_BITS = 4 * 4 * 9  # the seed's grid of 512 codes


def rows(sizes: tuple[int, ...]) -> dict[str, dict]:
    """name -> the row's grid, K, bits per image and jobs/train.py flags, for every grid of `sizes` and every K."""
    table = {}
    for size in sizes:
        for side in GRIDS[size]:
            downsample = int(math.log2(size // side))
            for k in CODEBOOK_SIZES:
                table[f"{size}px-{side}x{side}-K{k}"] = {
                    "size": size,
                    "grid": f"{side}x{side}",
                    "codebook_size": k,
                    "bits": side * side * int(math.log2(k)),
                    "flags": ["--size", str(size), "--downsample", str(downsample), "--codebook-size", str(k)],
                }
    return table


def draw(table: pd.DataFrame, seed_point: tuple[float, float] | None, caption: str, path: Path) -> None:
    figure = Figure(figsize=FIGURE_SIZE, layout="constrained")
    for ax, score, label in zip(figure.subplots(1, 2), ("mean_psnr", "mean_ssim"), ("PSNR dB", "SSIM")):
        for (size, grid), group in table.groupby(["size", "grid"]):
            ax.plot(group["bits"], group[score], marker="o", label=f"{size} px, {grid} grid")
            for r in group.itertuples():
                ax.annotate(
                    f"K={r.codebook_size}",
                    (r.bits, getattr(r, score)),
                    fontsize="x-small",
                    xytext=(3, -9),
                    textcoords="offset points",
                )
        if seed_point is not None:
            ax.scatter(
                [SEED_BITS],
                [seed_point[0 if score == "mean_psnr" else 1]],
                marker="*",
                s=120,
                color="black",
                label="the seed: 64 px, 4x4 grid, K=512, its own training (--seed-point)",
                zorder=3,
            )
        ax.set(xscale="log", xlabel="bits per image (grid cells x log2 K)", ylabel=f"mean val {label}")
        ax.set_xticks(sorted({*table["bits"], *([SEED_BITS] if seed_point else [])}))
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.tick_params(axis="x", labelrotation=45)
        ax.grid(alpha=0.3)
    figure.legend(*figure.axes[0].get_legend_handles_labels(), loc="outside lower center", ncols=3, fontsize="small")
    figure.suptitle(caption, fontsize="small")
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = table_parser(__doc__)
    parser.add_argument("--epochs", type=POSITIVE_INT, default=12, help="epochs of every row (default: %(default)s)")
    parser.add_argument(
        "--sizes", type=list_value(POSITIVE_INT), default=(28,), help="image sides: 28 and/or 64 (default: 28)"
    )
    parser.add_argument(
        "--seed-point",
        type=list_value(POSITIVE),
        help="PSNR,SSIM of the seed's model, measured elsewhere, drawn as one more point at 144 bits",
    )
    args = parser.parse_args()
    if not set(args.sizes) <= set(GRIDS):
        raise UserError(f"--sizes: this table has grids for {', '.join(map(str, GRIDS))} px only")
    if args.seed_point is not None and len(args.seed_point) != 2:
        raise UserError("--seed-point takes two numbers: PSNR,SSIM")
    common = common_flags(args)
    out, done = Path(args.out), []
    columns = ["row", "grid", "codebook_size", "bits", *score_columns(args.datasets), "epochs", "wall_seconds"]
    for name, spec in rows(args.sizes).items():
        scored = trained_row(name, spec["flags"], args.epochs, out, common, args.datasets)
        done.append({**{key: value for key, value in spec.items() if key != "flags"}, **scored})
        print(f"{name}: {spec['bits']} bits, mean val PSNR {scored['mean_psnr']:.2f} dB", flush=True)
        table = pd.DataFrame(done)  # rewritten after every row: a stopped run keeps the rows it finished
        table.to_csv(out / "rate_distortion.csv", index=False)
        (out / "rate_distortion.md").write_text(markdown(table, columns))
    caption = f"{', '.join(args.datasets)}; {args.epochs} epochs per point\n{hardware_caption(describe())}"
    draw(table, tuple(args.seed_point) if args.seed_point else None, caption, out / "rate_distortion.png")
    print(markdown(table, columns))


if __name__ == "__main__":
    run_job(main)

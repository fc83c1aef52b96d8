"""Which settings model the images best in the same CPU time: each row is `jobs/train.py` with its flags, trained
for as many epochs as its own epoch time (timed first, on an idle machine) fits into the budget (a bigger model
gets fewer), scored on its last epoch's validation images. Writes OUT/ablations.csv and OUT/ablations.md (the
table, each row's command).

    python benchmarks/ablations.py --data-root ../shared/medmnist \
        --datasets bloodmnist,breastmnist,pneumoniamnist,retinamnist --minutes 4 --out results/ablations
"""

from __future__ import annotations

import argparse
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

from medvq.cli import (
    POSITIVE,
    JobParser,
    add_data_flags,
    add_out_flag,
    list_value,
    resolve_data_root,
    run_job,
    text_value,
)
from medvq.errors import RunFailed, UserError

ROWS = {  # name: flags beyond jobs/train.py's defaults (128 channels, batch 64, log-mse + SSIM 0.1, cooldown; bf16)
    "defaults": [],
    "batch-128": ["--batch-size", "128"],
    "batch-256": ["--batch-size", "256"],
    "no-ssim": ["--ssim-weight", "0"],
    "ssim-0.3": ["--ssim-weight", "0.3"],
    "cosine": ["--lr-schedule", "cosine"],
    "constant-lr": ["--lr-schedule", "constant"],
    "kmeans-init": ["--kmeans-init"],
    "l2-codes-d8": ["--l2-codes", "--embedding-dim", "8"],
    "l2-codes-d32": ["--l2-codes", "--embedding-dim", "32"],
    "rotation": ["--gradient", "rotation"],
    "width-64": ["--hidden-channels", "64"],
    "width-32": ["--hidden-channels", "32"],
    "4-residual-blocks": ["--residual-blocks", "4"],
    "lr-2e-3": ["--learning-rate", "2e-3"],
    "ema-decay-0.95": ["--ema-decay", "0.95"],
    "precision-32": ["--precision", "32"],
    "mse": ["--error-loss", "mse"],
    "cooldown-0.4": ["--cooldown-share", "0.4"],
}
SCORES = ("psnr", "ssim")
# Flags that leave the model and the batch as they are: the schedule, how the loss weighs images, the codebook update
COST_FREE_FLAGS = {
    "--lr-schedule",
    "--cooldown-share",
    "--error-loss",
    "--learning-rate",
    "--kmeans-init",
    "--ema-decay",
    "--dead-code-threshold",
    "--gradient",
    "--commitment-weight",
    "--seed",
}
# Weights of a loss term: the term costs the same at any weight but 0, where it is not computed
TERM_WEIGHT_FLAGS = {"--ssim-weight"}
TRAIN_JOB = Path(__file__).resolve().parents[1] / "jobs" / "train.py"


def train_command(flags: list[str], epochs: int, out: Path, common: list[str]) -> list[str]:
    """The jobs/train.py command of a row: the shared flags, the row's, its epochs and folder."""
    return [sys.executable, str(TRAIN_JOB), *common, *flags, "--epochs", str(epochs), "--out", str(out)]


def train(flags: list[str], epochs: int, out: Path, common: list[str]) -> pd.DataFrame:
    """Run jobs/train.py (or continue it: the same command resumes) and return its metrics.csv."""
    command = train_command(flags, epochs, out, common)
    if not (out / "metrics.csv").is_file() or len(pd.read_csv(out / "metrics.csv")) < epochs:
        finished = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if finished.returncode != 0:
            raise RunFailed(f"{' '.join(command)} failed: {finished.stderr.strip().splitlines()[-1]}")
    return pd.read_csv(out / "metrics.csv")


def probe(name: str, flags: list[str], out: Path, common: list[str]) -> float:
    """Seconds of one epoch (training and validation) of the row's model: the second of a two-epoch run, since the
    first also pays for warming up."""
    return float(train(flags, 2, out / "probe" / slug(name), common)["epoch_seconds"].iloc[-1])


def cost_key(flags: list[str]) -> tuple[str, ...]:
    """The flags that change what an epoch costs: rows that differ only in others train the same model."""
    pairs = [
        tuple(flags[i : i + 2]) if i + 1 < len(flags) and not flags[i + 1].startswith("--") else (flags[i],)
        for i, flag in enumerate(flags)
        if flag.startswith("--")
    ]
    return tuple(
        " ".join(pair)
        for pair in pairs
        if pair[0] not in COST_FREE_FLAGS and not (pair[0] in TERM_WEIGHT_FLAGS and float(pair[1]) != 0)
    )


def shared_epoch_seconds(name: str, probed: dict[str, float]) -> float:
    """The median probe of the rows whose models cost the same per epoch: one probe varied by +-20% on this
    machine, which would hand a row of the same model more or fewer epochs than its neighbour."""
    same = [seconds for other, seconds in probed.items() if cost_key(ROWS[other]) == cost_key(ROWS[name])]
    return float(statistics.median(same))


def row(
    name: str,
    flags: list[str],
    epoch_seconds: float,
    budget: float,
    out: Path,
    common: list[str],
    datasets: tuple[str, ...],
) -> dict:
    """Train the row's model for the epochs of `epoch_seconds` that fit the budget; its last epoch's scores."""
    epochs = max(1, math.floor(budget / epoch_seconds))
    scored = trained_row(name, flags, epochs, out, common, datasets)
    return {**scored, "epoch_seconds": epoch_seconds, "budget_seconds": epochs * epoch_seconds}


def trained_row(
    name: str, flags: list[str], epochs: int, out: Path, common: list[str], datasets: tuple[str, ...]
) -> dict:
    """Train jobs/train.py with `flags` for `epochs` in OUT/runs/NAME: its last epoch's validation scores per set,
    their means, the share of codes used, the wall time and the command."""
    started = time.monotonic()
    history = train(flags, epochs, out / "runs" / slug(name), common)
    return {
        "row": name,
        **scores(history, datasets),
        "epochs": epochs,
        "wall_seconds": time.monotonic() - started,
        "command": shown_command(flags, epochs, common),
    }


def shown_command(flags: list[str], epochs: int, common: list[str]) -> str:
    """A row's command as a reader reruns it (no interpreter path, no output folder)."""
    return " ".join(["python jobs/train.py", *common, *flags, "--epochs", str(epochs)])


def scores(history: pd.DataFrame, datasets: tuple[str, ...]) -> dict:
    """A run's last epoch: validation PSNR and SSIM per set, their means over the sets, the share of codes used."""
    last = history.iloc[-1]
    per_set = {f"{score}_{d}": last[f"val_{score}_{d}"] for score in SCORES for d in datasets}
    means = {f"mean_{score}": sum(last[f"val_{score}_{d}"] for d in datasets) / len(datasets) for score in SCORES}
    return {**means, **per_set, "codes_used": last["val_codes_used"]}


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name).strip("-")


def markdown(table: pd.DataFrame, columns: list[str]) -> str:
    """The table's `columns` as Markdown (SSIM and code shares to 3 places, other numbers to 2), then each row's
    command."""
    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    for _, r in table.iterrows():
        lines.append(
            "| "
            + " | ".join(
                f"{r[c]:.3f}"
                if c.endswith("ssim") or c == "codes_used"
                else f"{r[c]:.2f}"
                if isinstance(r[c], float)
                else str(r[c])
                for c in columns
            )
            + " |"
        )
    commands = [f"- {r['row']}: `{r['command']}`" for _, r in table.iterrows()]
    return "\n".join(lines + ["", "Commands:", *commands]) + "\n"


def score_columns(datasets: tuple[str, ...]) -> list[str]:
    return ["mean_psnr", "mean_ssim", *(f"psnr_{d}" for d in datasets), "codes_used"]


def table_parser(
    doc: str, out_help: str = "folder for the runs and the tables; rows already trained there are read, not rerun"
) -> JobParser:
    """The flags of a table of training runs: the data, and the folder its runs and tables go to."""
    parser = JobParser(doc.strip().splitlines()[0])
    add_data_flags(parser)
    add_out_flag(parser, out_help)
    return parser


def add_rows_flag(parser: JobParser, rows: dict[str, list[str]]) -> None:
    parser.add_argument(
        "--rows", type=list_value(text_value), default=tuple(rows), help="comma-separated row names (default: all)"
    )


def chosen_rows(args: argparse.Namespace, rows: dict[str, list[str]]) -> tuple[str, ...]:
    """The --rows asked for, each one of `rows`: one line naming the first that is not."""
    unknown = [name for name in args.rows if name not in rows]
    if unknown:
        raise UserError(f"--rows: no row named {unknown[0]!r}; rows: {', '.join(rows)}")
    if not args.rows:
        raise UserError(f"--rows: name at least one of {', '.join(rows)}")
    return args.rows


def common_flags(args: argparse.Namespace) -> list[str]:
    """The jobs/train.py flags every row shares: the data."""
    return ["--data-root", args.data_root or resolve_data_root(None), "--datasets", ",".join(args.datasets)]


def main() -> None:
    parser = table_parser(__doc__)
    add_rows_flag(parser, ROWS)
    parser.add_argument("--minutes", type=POSITIVE, default=4.0, help="training budget per row (default: %(default)s)")
    args = parser.parse_args()
    names = chosen_rows(args, ROWS)
    common = common_flags(args)
    out, rows = Path(args.out), []
    columns = ["row", *score_columns(args.datasets), "epochs", "epoch_seconds"]
    # Every row's epoch is timed first, together, so that other work during the long runs cannot skew a budget.
    probed = {
        name: probe(name, ROWS[name], out, common) for name in ROWS
    }  # all: a row's budget never depends on --rows
    epoch_seconds = {name: shared_epoch_seconds(name, probed) for name in names}
    print(
        "seconds per epoch: " + ", ".join(f"{name} {seconds:.1f}" for name, seconds in epoch_seconds.items()),
        flush=True,
    )
    for name in names:
        rows.append(row(name, ROWS[name], epoch_seconds[name], args.minutes * 60, out, common, args.datasets))
        print(
            f"{name}: mean val PSNR {rows[-1]['mean_psnr']:.2f} dB, SSIM {rows[-1]['mean_ssim']:.3f} after "
            f"{rows[-1]['epochs']} epochs",
            flush=True,
        )
        table = pd.DataFrame(rows)  # rewritten after every row: a stopped run keeps the rows it finished
        table.to_csv(out / "ablations.csv", index=False)
        (out / "ablations.md").write_text(markdown(table, columns))
    print(markdown(table, columns))


if __name__ == "__main__":
    run_job(main)

"""Long runs side by side within one wall budget, for a lent GPU: each row is jobs/train.py with its flags. The rows'
epochs are timed together first, then the rows train together for as many epochs as fit the rest of the budget (a
model this small leaves a GPU mostly idle, so rows that share one cost little more than one row alone). A row still
running at the budget's end is stopped the graceful way (its checkpoint kept; the same command continues it).
Scored on each row's last epoch's validation images; writes OUT/long_runs.csv and OUT/long_runs.md.

    python benchmarks/long_runs.py --data-root ../shared/medmnist \
        --datasets bloodmnist,breastmnist,pneumoniamnist,retinamnist --minutes 8 --out runs/long
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import time
from pathlib import Path

import pandas as pd
from ablations import (
    add_rows_flag,
    chosen_rows,
    common_flags,
    markdown,
    score_columns,
    scores,
    shown_command,
    slug,
    table_parser,
    train_command,
)

from medvq.cli import POSITIVE, run_job, text_value
from medvq.errors import RunFailed, UserError

JOB_WINNER = ["--codebook-size", "1024", "--commitment-weight", "1.0"]  # the sweep job's best cell in every run here
ROWS = {  # name: flags beyond jobs/train.py's defaults; a GPU's step costs about the same at any of these sizes
    "batch-256-width-64": [*JOB_WINNER, "--batch-size", "256", "--hidden-channels", "64"],
    "batch-256-width-128": [*JOB_WINNER, "--batch-size", "256", "--hidden-channels", "128"],
    "batch-128-width-128": [*JOB_WINNER, "--batch-size", "128", "--hidden-channels", "128"],
    # today's defaults against a larger batch at a larger rate, in the same wall time (docs/behaviour.md, "On a GPU")
    "batch-64-width-128": [*JOB_WINNER, "--batch-size", "64", "--hidden-channels", "128"],
    "batch-256-lr-2e-3-width-128": [
        *JOB_WINNER,
        "--batch-size",
        "256",
        "--learning-rate",
        "2e-3",
        "--hidden-channels",
        "128",
    ],
}
PROBE_EPOCHS = 4  # the first pays for warming up; the others are timed
POLL_SECONDS = 0.05  # how often the probes' metrics.csv is read: well under an epoch of a tiny smoke model
# Epochs are sized to this much more than the probed epoch, so a row ends inside the budget; on the H200 one row's
# epochs still ran 19% over their probe, and the budget stopped it (results/gpu-long-runs/README.md).
SAFETY = 1.1
STOP_GRACE_SECONDS = 30  # after SIGTERM, for the epoch's checkpoint to be written
STOPPED = "stopped at the budget"  # how wait_all says a run ended that was still going at the deadline


def start(flags: list[str], epochs: int, out: Path, common: list[str], threads: int) -> subprocess.Popen:
    """jobs/train.py in the background with `threads` CPU threads, its output in OUT.log."""
    out.parent.mkdir(parents=True, exist_ok=True)
    # Each run its own share of the cores: two runs of a tiny model on 2 cores, each with both, took 60x longer.
    environment = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    with open(out.with_suffix(".log"), "w") as log:  # the child keeps its own copy of the handle
        return subprocess.Popen(
            train_command(flags, epochs, out, common), stdout=log, stderr=subprocess.STDOUT, env=environment
        )


def wait_all(runs: dict[str, subprocess.Popen], deadline: float) -> dict[str, str]:
    """Wait for every run until the deadline; then SIGTERM those still going, all at once, and kill any that outlive
    the grace. Returns {name: how it ended, for a run that did not end by itself with exit status 0}."""
    for process in runs.values():
        try:
            process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            break
    late = {name: process for name, process in runs.items() if process.poll() is None}
    for process in late.values():
        process.send_signal(signal.SIGTERM)
    grace_ends = time.monotonic() + STOP_GRACE_SECONDS
    for process in late.values():
        try:
            process.wait(timeout=max(0.0, grace_ends - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    failed = {name: process.returncode for name, process in runs.items() if name not in late and process.returncode}
    return {name: STOPPED for name in late} | {name: f"failed, exit status {status}" for name, status in failed.items()}


def epochs_written(runs: dict[str, subprocess.Popen], outs: dict[str, Path], deadline: float) -> dict:
    """Wait for the runs, watching their metrics.csv (rewritten at each epoch's end, checkpoint and validation
    done): {name: {epochs in the file: when it was written}}."""
    written: dict[str, dict[int, float]] = {name: {} for name in runs}

    seen: dict[str, float] = {}  # each file's last modification time read

    def look() -> None:
        for name, out in outs.items():
            try:
                when = (out / "metrics.csv").stat().st_mtime
                if seen.get(name) != when:  # read the file only when it was rewritten
                    written[name].setdefault(len(pd.read_csv(out / "metrics.csv")), when)
                    seen[name] = when
            except (FileNotFoundError, pd.errors.EmptyDataError):
                continue

    while any(process.poll() is None for process in runs.values()) and time.monotonic() < deadline:
        look()
        time.sleep(POLL_SECONDS)
    for name, ending in wait_all(runs, deadline).items():
        if ending != STOPPED:
            raise RunFailed(f"row {name}'s timing run {ending}: {last_line(outs[name])}")
    look()
    return written


def seconds_per_epoch(written: dict[int, float], name: str) -> float:
    """Wall seconds from one epoch's end to the next, over the epochs after the first."""
    later = {epochs: when for epochs, when in written.items() if epochs > 1}
    if len(later) < 2:
        raise RunFailed(f"row {name}: too few epochs were seen written to time one ({sorted(written)})")
    return (later[max(later)] - later[min(later)]) / (max(later) - min(later))


def last_line(out: Path) -> str:
    """The last line a run wrote to its log: why it failed, when it did."""
    lines = out.with_suffix(".log").read_text().strip().splitlines()
    return lines[-1] if lines else "no output"


def history(out: Path, name: str) -> pd.DataFrame:
    """A run's metrics.csv; a run that kept none failed, and its log's last line says why."""
    if not (out / "metrics.csv").is_file():
        raise RunFailed(f"row {name} trained no epoch: {last_line(out)}")
    return pd.read_csv(out / "metrics.csv")


def epochs_that_fit(seconds_left: float, start_seconds: float, epoch_seconds: float) -> int:
    """Epochs of `epoch_seconds` (times SAFETY) that fit after a run's start; at least one."""
    return max(1, math.floor((seconds_left - start_seconds) / (epoch_seconds * SAFETY)))


def main() -> None:
    parser = table_parser(__doc__, out_help="folder for the runs and the tables: a new or empty one")
    add_rows_flag(parser, ROWS)
    parser.add_argument(
        "--minutes", type=POSITIVE, default=8.0, help="wall budget, timing included (default: %(default)s)"
    )
    parser.add_argument(
        "--row-flags",
        type=text_value,
        help="jobs/train.py flags added after every row's own, space-separated (a smoke run's tiny model)",
    )
    args = parser.parse_args()
    deadline = time.monotonic() + args.minutes * 60
    common, out = common_flags(args), Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"--out {out} is not empty: its runs would be continued, not timed; give a new folder")
    extra = (args.row_flags or "").split()
    flags = {name: [*ROWS[name], *extra] for name in chosen_rows(args, ROWS)}

    threads = max(1, (os.cpu_count() or 1) // len(flags))
    began = time.time()
    probe_outs = {name: out / "probe" / slug(name) for name in flags}
    # Every epoch checked: each rewrite of metrics.csv times one (a GPU's own default checks less often)
    probes = {
        name: start([*flags[name], "--check-every", "1"], PROBE_EPOCHS, probe_outs[name], common, threads)
        for name in flags
    }
    written = epochs_written(probes, probe_outs, deadline)
    epoch_seconds = {name: seconds_per_epoch(written[name], name) for name in flags}
    # Start: from launch to the first epoch's end, less one epoch (the first also pays for warming up).
    start_seconds = {name: min(written[name].values()) - began - epoch_seconds[name] for name in flags}
    seconds_left = deadline - time.monotonic()
    epochs = {name: epochs_that_fit(seconds_left, start_seconds[name], epoch_seconds[name]) for name in flags}
    print(
        "side by side, seconds per epoch / epochs that fit: "
        + ", ".join(f"{name} {epoch_seconds[name]:.2f} / {epochs[name]}" for name in flags),
        flush=True,
    )

    runs = {name: start(flags[name], epochs[name], out / "runs" / slug(name), common, threads) for name in flags}
    endings = wait_all(runs, deadline)
    rows = []
    for name in flags:
        trained = history(out / "runs" / slug(name), name)
        rows.append(
            {
                "row": name,
                **scores(trained, args.datasets),
                "epochs": f"{len(trained)} of {epochs[name]}" + (f" ({endings[name]})" if name in endings else ""),
                "epoch_seconds": float(trained["epoch_seconds"].median()),
                "command": shown_command(flags[name], epochs[name], common),
            }
        )
    table = pd.DataFrame(rows)
    table.to_csv(out / "long_runs.csv", index=False)
    columns = ["row", *score_columns(args.datasets), "epochs", "epoch_seconds"]
    (out / "long_runs.md").write_text(markdown(table, columns))
    print(markdown(table, columns))


if __name__ == "__main__":
    run_job(main)

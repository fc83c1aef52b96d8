"""Where a run's figures come from, said on every figure: its data, the shipped model's epochs, the hardware and the
code's commit. A job records the hardware and the commit as it starts (provenance.json in its output folder); the
figures add the data and epochs from the model and its history."""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
from pathlib import Path

import torch

from medvq.config import Config
from medvq.devices import PRECISION_WORDS, device_words
from medvq.storage import is_file, is_uri, join, read_bytes, write_bytes

PROVENANCE_FILE = "provenance.json"
STRETCHES_JOINED_BY = ", then "  # a run's precisions, where a resume on other hardware changed it
REPO = Path(__file__).resolve().parents[1]


def code_commit() -> str:
    """The short commit of the medvq code that runs, "+changes" when its tracked files differ from it. Where the
    code is not a git checkout (the cluster image, a working directory Ray uploaded without .git): the commit the
    image was built from (MEDVQ_COMMIT, cluster/Dockerfile), else "unknown"."""
    try:
        commit, changes = (
            subprocess.run(
                ["git", "-C", str(REPO), *command], capture_output=True, text=True, timeout=10, check=True
            ).stdout.strip()
            for command in (["rev-parse", "--short", "HEAD"], ["status", "--porcelain", "--untracked-files=no"])
        )
    except (OSError, subprocess.SubprocessError):
        return os.environ.get("MEDVQ_COMMIT") or "unknown"
    return commit + ("+changes" if changes else "")


def cpu_model() -> str:
    """This machine's CPU, as /proc/cpuinfo names it (else the platform's word for it)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def ray_hardware(totals: dict[str, float], autoscaling: bool) -> str:
    """The hardware of a Ray cluster from its resources (medvq.nodes.Capacity.totals)."""
    gpu_types = sorted(key.split(":", 1)[1] for key in totals if key.startswith("accelerator_type:"))
    gpus = totals.get("GPU", 0)
    gpu_text = f"{gpus:g} GPUs" + (f" ({', '.join(gpu_types)})" if gpu_types else "") if gpus else "no GPU"
    return (
        f"Ray cluster of {'up to ' if autoscaling else ''}{totals.get('CPU', 0):g} CPUs, {gpu_text}; "
        f"driver on {cpu_model()}"
    )


def local_hardware(accelerator: str) -> str:
    """This machine, and the GPU a local run trains on (`accelerator` as devices.resolve_accelerator names it)."""
    gpu = "no GPU" if accelerator == "cpu" else device_words(accelerator)
    return f"{torch.get_num_threads()} CPU threads of {cpu_model()}, {gpu}"


def write_provenance(folder: Path, hardware: str, out: str, run: dict | None = None) -> None:
    """Record this start of a job in `folder`, the local folder it writes `out` (a path or a URI) from, and at once
    in `out` itself, so that a URI has it even after a SIGKILL. When `out` has a record already (a resumed run, or
    latents encoded again into a run's folder), its first start stays on top and this one is added to its
    `later_starts`. `run` (cli.run_record: the run's name and the settings it was started with) is kept from the
    first start, which a resumed run must repeat."""
    folder.mkdir(parents=True, exist_ok=True)
    now = {"hardware": hardware, "commit": code_commit(), "date": datetime.date.today().isoformat()}
    record = provenance_of(out)
    if record:
        record["later_starts"] = [*record.get("later_starts", []), now]
    else:
        record = {**now, **({"run": run} if run else {})}
    text = json.dumps(record, indent=2) + "\n"
    (folder / PROVENANCE_FILE).write_text(text)
    if is_uri(out):
        write_bytes(join(out, PROVENANCE_FILE), text.encode())


def provenance_of(out: str) -> dict:
    """`out`'s provenance.json (its first start on top), or {} when no job has written there."""
    earlier = join(out, PROVENANCE_FILE)
    return json.loads(read_bytes(earlier)) if is_file(earlier) else {}


def precision_words(precision: str) -> str:
    """A checkpoint's trained_precision in words: "bf16-mixed, then 32-true" -> "bf16 mixed precision, then float32"."""
    stretches = precision.split(STRETCHES_JOINED_BY)
    return STRETCHES_JOINED_BY.join(PRECISION_WORDS.get(stretch, stretch) for stretch in stretches)


def caption(run: Path, config: Config | None, epochs: int | None, precision: str | None = None) -> str:
    """One line for a run's figures: data, epochs and the precision trained in (Lightning's name, where the
    checkpoint keeps it), and what provenance.json says (nothing for an older run)."""
    parts = []
    if config is not None:
        parts.append(f"data: {', '.join(config.datasets)} at {config.size} px")
    if epochs is not None:
        parts.append(f"model: {epochs} epochs" + (f" in {precision_words(precision)}" if precision else ""))
    if (run / PROVENANCE_FILE).is_file():
        record = json.loads((run / PROVENANCE_FILE).read_text())
        parts += [record["hardware"], f"medvq {record['commit']}, {record['date']}"]
        later = [start["commit"] for start in record.get("later_starts", []) if start["commit"] != record["commit"]]
        if later:
            parts.append(f"then medvq {', '.join(dict.fromkeys(later))}")
    return " | ".join(parts)

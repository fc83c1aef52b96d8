"""The README's quick start stays true: its sample output has the lines, in the order and shape, that a smoke run
prints at its end (checked against a real one by tests/test_multinode.py, which runs the smoke job anyway), its stated
time fits the sample's own seconds, and every job command it shows parses with that job's own flags."""

from __future__ import annotations

import importlib
import re
import shlex

import pytest

from medvq.latent_space import SUMMARY_COLUMNS
from tests.conftest import REPO

README = (REPO / "README.md").read_text()
QUICK_START = README.split("\n## Quick start\n")[1].split("\n## ")[0]

# What each line of the sample abstracts to: numbers, paths and trial ids are the run's own, the words are the code's.
PATH = re.compile(r"(?<!\S)[\w.~:-]*(?:/+[\w.:~-]+)+/?")  # /abs/path, runs/smoke, s3://bucket/run; not "latents/,"
TRIAL = re.compile(r"\b[0-9a-f]{5}_\d{5}\b")  # Tune's trial id, ed804_00001
NUMBER = re.compile(r"(?<![\w-])-?\d+(?:\.\d+)?%?(?![\w-])")  # 3421, 11.85, 46.9%, not 11-NN
STATUSES = re.compile(r"^(\d+ trials) \([^()]*\)")  # "(1 finished, 1 stopped)": how the tiny trials end varies
# Ray's and Python's own lines that may fall between the job's when its output is a Ray job's log
NOISE = re.compile(r"^(\d{4}-\d\d-\d\d[ T]\d|\[\d{4}-\d\d-\d\d |\(\w+ pid=|\S+\.py:\d+: \w*Warning|  warnings\.warn)")


def sample() -> list[str]:
    """The quick start's sample output: its first code block without a language."""
    blocks, block = [], None
    for line in QUICK_START.splitlines():
        if line.startswith("```"):
            block = [line] if block is None else blocks.append(block)
        elif block is not None:
            block.append(line)
    return next(block[1:] for block in blocks if block[0] == "```")


def printed_tail(output: str) -> list[str]:
    """The lines a smoke run prints at its end, from its 'encoded ...' line to its 'wrote ...' line."""
    lines = [line for line in output.splitlines() if not NOISE.match(line)]
    start = max(i for i, line in enumerate(lines) if line.startswith("encoded "))
    end = next(i for i in range(start, len(lines)) if lines[i].startswith("wrote "))
    return lines[start : end + 1]


def shape(lines: list[str]) -> list[str]:
    """Each line with its numbers, paths and trial ids abstracted; a table's rows as one line per run of rows (the
    README's run has four datasets, the tests' two)."""
    shaped = []
    for line in lines:
        if line.startswith("| dataset |") or line.startswith("| --- |"):  # the table's columns, as they are
            pass
        elif line.startswith("| "):  # a row: its dataset, then numbers
            cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
            line = "| NAME | " + " | ".join(
                "N" if NUMBER.fullmatch(cell) or cell == "n/a" else cell for cell in cells[1:]
            )
            line += " |"
            if shaped and shaped[-1] == line:
                continue
        else:
            line = NUMBER.sub("N", TRIAL.sub("TRIAL", PATH.sub("PATH", STATUSES.sub(r"\1 (STATUSES)", line))))
        shaped.append(line)
    return shaped


def assert_prints_like_the_readme(output: str) -> None:
    """A real smoke run's `output` ends with the README sample's lines, in its order and shape, and its table's
    columns. Called on the output of a smoke run that a test makes anyway (tests/test_multinode.py)."""
    printed, shown = shape(printed_tail(output)), shape(sample())
    assert printed == shown, (
        "the README's quick-start sample no longer matches a smoke run's output:\n"
        + "\n".join(f"{'  ' if a == b else '! '}{b!r}\n  printed {a!r}" for a, b in zip(printed, shown, strict=False))
        + f"\n({len(printed)} lines printed, {len(shown)} shown)"
    )


def test_the_sample_is_the_tail_of_a_smoke_run():
    lines = sample()
    kinds = [line.split(" ", 1)[0] for line in lines]
    header = "| " + " | ".join(SUMMARY_COLUMNS.values()) + " |"
    assert kinds[:5] == ["encoded", "2", "final", "checkpoint", "seconds:"], lines[:5]
    assert lines[5] == header and lines[6] == "|" + " --- |" * len(SUMMARY_COLUMNS)  # the code's own columns
    rows = [line for line in lines[7:] if line.startswith("| ")]
    assert rows and all(line.count("|") == len(SUMMARY_COLUMNS) + 1 for line in rows)
    assert lines[7 + len(rows) :] == ["", lines[-1]] and kinds[-1] == "wrote"
    assert lines[-1].endswith(" to runs/smoke") and "python jobs/sweep.py --smoke " in QUICK_START
    assert shape(printed_tail("\n".join(["Tune's table", *lines, "Job succeeded"]))) == shape(lines)
    older = "encoded 25328 images to /work/main/runs/smoke/latents in 26.4 s; UMAP 54.0 s; probes 56.6 s"
    assert shape([older, *lines[1:]]) != shape(lines)  # a line in other words (1b5693c's) does not pass for it


STEPS = ["ray_init", "search", "final_fit", "encode", "neighbours", "probes", "umap", "training_plots", "plots"]


def test_the_quick_starts_stated_time_fits_its_samples_seconds():
    """The time the README states is the sample run's: at least its steps (the probes beside the UMAP and then the
    latents' figures: the longer of the two counts, and the training's figures join whichever ends first), plus
    Python's imports and Ray's start-up."""
    (wall,) = [int(value) for value in re.findall(r"it took (\d+) s wall", QUICK_START)]
    (seconds,) = [line for line in sample() if line.startswith("seconds: ")]
    items = (item.rsplit(" ", 1) for item in seconds.removeprefix("seconds: ").split(", "))
    steps = {step: float(value) for step, value in items}
    assert list(steps) == STEPS
    beside = max(steps.pop("umap") + steps.pop("plots"), steps.pop("probes"), steps.pop("training_plots"))
    total = sum(steps.values()) + beside
    assert total <= wall <= total + 60, (wall, total)
    assert re.search(r"At [0-9a-f]{7,} on a \d+-vCPU ", QUICK_START), "say the commit and the machine it ran on"


def commands() -> list[list[str]]:
    """Every `python jobs/<job>.py ...` line in the README's code blocks, as argv (a `ray job submit`'s after --)."""
    found, in_code = [], False
    for line in README.splitlines():
        in_code = in_code != line.startswith("```")
        if in_code and "python jobs/" in line:
            found.append(shlex.split(line.split(" -- ")[-1].split("#")[0]))
    return found


@pytest.mark.parametrize("argv", commands(), ids=lambda argv: " ".join(argv[1:4]))
def test_every_job_command_parses_with_the_jobs_own_flags(argv):
    assert argv[0] == "python" and argv[1].startswith("jobs/"), argv
    job = importlib.import_module(argv[1].removesuffix(".py").replace("/", "."))
    flags = job.parser()
    args = flags.parse_args(argv[2:])
    if argv[1] == "jobs/sweep.py":
        sweep = job.sweep_from_args(args, flags)
        if "--batch-size" in argv:  # a GPU command: docs/behaviour.md's advice, batch 128 and one worker a trial
            assert sweep.base.batch_size == 128 and sweep.base.workers == 1 and (args.gpus_per_trial or 0) <= 1

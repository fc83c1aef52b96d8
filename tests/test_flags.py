"""Every flag of every job, given a bad value: one line naming the flag and what it takes, exit 2, nothing
written, and Ray never started. In this process (the jobs' own `main` under `run_job`), so the table stays
cheap; tests/test_jobs.py runs the refusals that need a cluster as real processes."""

from __future__ import annotations

import importlib
import signal
import sys
from pathlib import Path

import pytest
import ray
import torch

from medvq.cli import run_job
from medvq.config import Config, settings
from medvq.module import VQVAEModule
from tests.conftest import SYNTHETIC_DATASETS, TINY

WHOLE, POSITIVE, AT_LEAST_ZERO = "takes a whole number > 0", "takes a number > 0", "takes a number >= 0"
TRAINING = [  # flags jobs/train.py and jobs/sweep.py share
    (["--data-root", ""], "argument --data-root: takes a non-empty value"),
    (["--data-root", "/nonexistent/medmnist"], "is not in /nonexistent/medmnist"),
    (["--datasets", ""], "argument --datasets: takes a non-empty value"),
    (["--datasets", ","], "datasets: name at least one dataset"),
    (["--datasets", "breastmnist,nosuchmnist"], "unknown dataset 'nosuchmnist'"),
    (["--out", ""], "argument --out: takes a non-empty value"),
    (["--epochs", "0"], f"argument --epochs: {WHOLE}"),
    (["--epochs", "2.5"], f"argument --epochs: {WHOLE}"),
    (["--size", "-28"], f"argument --size: {WHOLE}"),
    (["--size", "30"], "image size 30 is not divisible"),
    (["--batch-size", "0"], f"argument --batch-size: {WHOLE}"),
    (["--learning-rate", "0"], f"argument --learning-rate: {POSITIVE}"),
    (["--learning-rate", "nan"], f"argument --learning-rate: {POSITIVE}"),
    (["--learning-rate", "inf"], f"argument --learning-rate: {POSITIVE}"),
    (["--mixing", "even"], "argument --mixing: invalid choice: 'even'"),
    (["--limit-batches", "0"], f"argument --limit-batches: {WHOLE}"),
    (["--accelerator", "tpu"], "argument --accelerator: invalid choice: 'tpu'"),
    (["--seed", "-1"], "argument --seed: takes a whole number >= 0"),
    (["--seed", "x"], "argument --seed: takes a whole number >= 0"),
    (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
]
TRAIN = [
    (["--codebook-size", "0"], f"argument --codebook-size: {WHOLE}"),
    (["--commitment-weight", "-1"], f"argument --commitment-weight: {POSITIVE}"),
    (["--workers", "0"], f"argument --workers: {WHOLE}"),
    (["--workers", "two"], f"argument --workers: {WHOLE}"),
    (["--cpus-per-worker", "0"], f"argument --cpus-per-worker: {POSITIVE}"),
    (["--storage", ""], "argument --storage: takes a non-empty value"),
    (["--codebook-sizes", "64"], "unrecognized arguments: --codebook-sizes"),
    (["--accelerator", "gpu"], "--accelerator gpu was asked for, but no CUDA GPU is visible here"),
]
SWEEP = [
    (["--codebook-sizes", ","], "the search space is empty"),
    (
        ["--codebook-sizes", "64,0"],
        f"argument --codebook-sizes: takes a comma-separated list; each item {WHOLE}, got '0'",
    ),
    (["--codebook-sizes", "64;128"], f"argument --codebook-sizes: takes a comma-separated list; each item {WHOLE}"),
    (
        ["--commitment-weights", "0.1,-1"],
        f"argument --commitment-weights: takes a comma-separated list; each item {POSITIVE}",
    ),
    (
        ["--commitment-weights", ","],
        "argument --commitment-weights: takes LOW:HIGH (two numbers > 0) or a comma-separated list of numbers > 0, "
        "got ','",
    ),
    (["--commitment-weights", "2:0.5"], "commitment range must satisfy 0 < low <= high"),
    (["--commitment-weights", "1:2:3"], "argument --commitment-weights: takes LOW:HIGH (two numbers > 0)"),
    (["--commitment-weights", ":2"], "argument --commitment-weights: takes LOW:HIGH (two numbers > 0)"),
    (["--commitment-weights", "0:2"], "argument --commitment-weights: takes LOW:HIGH (two numbers > 0)"),
    (["--num-samples", "0"], f"argument --num-samples: {WHOLE}"),
    (["--workers-per-trial", "0"], f"argument --workers-per-trial: {WHOLE}"),
    (["--gpus-per-trial", "-1"], f"argument --gpus-per-trial: {AT_LEAST_ZERO}"),
    (["--cpus-per-worker", "0"], f"argument --cpus-per-worker: {POSITIVE}"),
    (["--max-concurrent-trials", "0"], f"argument --max-concurrent-trials: {WHOLE}"),
    (["--storage", ""], "argument --storage: takes a non-empty value"),
    (["--codebook-size", "256"], "unrecognized arguments: --codebook-size 256"),  # not --codebook-sizes
    (["--smoke", "--codebook-sizes", "16", "--num-samples", "2"], "drop --codebook-sizes, --num-samples"),
]
ENCODE = [
    (["--checkpoint", ""], "argument --checkpoint: takes a non-empty value"),
    (["--checkpoint", "/nonexistent/model.ckpt"], "--checkpoint /nonexistent/model.ckpt is not a file"),
    (["--checkpoint", "{garbage}"], "is not a checkpoint of plain tensors and data"),
    (["--checkpoint", "{unsafe}"], "Unsafe was not an allowed global by default)"),
    (["--checkpoint", "{truncated}"], "is not a readable checkpoint (PytorchStreamReader failed"),
    (["--datasets", "nosuchmnist"], "unknown dataset 'nosuchmnist'"),
    (["--data-root", ""], "argument --data-root: takes a non-empty value"),
    (["--out", ""], "argument --out: takes a non-empty value"),
    (["--actors", "0"], f"argument --actors: {WHOLE}"),
    (["--gpus-per-actor", "-0.5"], f"argument --gpus-per-actor: {AT_LEAST_ZERO}"),
]
PLOT = [
    (["--run", ""], "argument --run: takes a non-empty value"),
    (["--run", "{out}"], "does not exist: point --run at the --out folder"),
    (["--data-root", ""], "argument --data-root: takes a non-empty value"),
]
CASES = [
    *(("train", *case) for case in TRAINING + TRAIN),
    *(("sweep", *case) for case in TRAINING + SWEEP),
    *(("encode", *case) for case in ENCODE),
    *(("plot", *case) for case in PLOT),
]


class Unsafe:
    """Not plain data: torch's weights-only loader refuses to rebuild it."""


@pytest.fixture
def files(synthetic_root, tmp_path) -> dict[str, str]:
    checkpoint = tmp_path / "model.ckpt"
    module = VQVAEModule(Config(**{**TINY, "data_root": str(synthetic_root)}))
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, checkpoint)
    (tmp_path / "garbage.ckpt").write_bytes(b"not a checkpoint")
    torch.save({"hyper_parameters": {}, "extra": Unsafe()}, tmp_path / "unsafe.ckpt")
    (tmp_path / "truncated.ckpt").write_bytes(checkpoint.read_bytes()[:1000])
    return {
        "root": str(synthetic_root),
        "out": str(tmp_path / "out"),
        "checkpoint": str(checkpoint),
        "garbage": str(tmp_path / "garbage.ckpt"),
        "unsafe": str(tmp_path / "unsafe.ckpt"),
        "truncated": str(tmp_path / "truncated.ckpt"),
    }


def base_flags(job: str, files: dict[str, str]) -> list[str]:
    """Good flags that the case's bad one is added to (argparse keeps the last of a repeated flag)."""
    data = ["--data-root", files["root"]]
    return {
        "train": [*data, "--datasets", ",".join(SYNTHETIC_DATASETS), "--out", files["out"]],
        "sweep": [*data, "--datasets", ",".join(SYNTHETIC_DATASETS), "--out", files["out"]],
        "encode": ["--checkpoint", files["checkpoint"], *data, "--out", files["out"]],
        "plot": ["--run", files["out"]],
    }[job]


@pytest.mark.parametrize("job, flags, message", CASES, ids=[f"{job}{' '.join(flags)}" for job, flags, _ in CASES])
def test_a_bad_flag_is_one_line_and_exit_2_before_anything_starts(job, flags, message, files, monkeypatch, capsys):
    if flags == ["--accelerator", "gpu"] and torch.cuda.is_available():
        pytest.skip("a GPU is visible here: the job would train")
    flags = [flag.format(**files) for flag in flags]
    monkeypatch.setattr(sys, "argv", [f"jobs/{job}.py", *base_flags(job, files), *flags])
    monkeypatch.setattr(ray, "init", lambda *args, **kwargs: pytest.fail("Ray started: the bad flag got through"))
    sigterm = signal.getsignal(signal.SIGTERM)  # run_job sets its own; this process keeps pytest's
    try:
        with pytest.raises(SystemExit) as stopped:
            run_job(importlib.import_module(f"jobs.{job}").main)
    finally:
        signal.signal(signal.SIGTERM, sigterm)
    stderr = capsys.readouterr().err
    assert stopped.value.code == 2, stderr
    assert stderr.count("\n") == 1 and stderr.startswith("error: ") and message in stderr, stderr
    assert not Path(files["out"]).exists()


def changed_value(value, choices: tuple[str, ...]):
    """A valid value other than a setting's default, as flag text (None: a switch) and as the config holds it."""
    if isinstance(value, bool):
        return None, not value
    if isinstance(value, tuple):
        return ",".join(map(str, value[:1])), value[:1]
    if choices:
        other = next(choice for choice in choices if choice != value)
        return other, other
    changed = 1 if value is None else (value * 0.5 if isinstance(value, float) else value + 1)
    return str(changed), changed


@pytest.mark.parametrize("job", ["train", "sweep"])
def test_every_setting_with_a_flag_reaches_the_config(job, synthetic_root):
    """Each generated flag sets its own field and nothing else: the flags are the declarations, not a copy."""
    module = importlib.import_module(f"jobs.{job}")
    parser = module.parser()
    generated = parser.generated[Config]
    searched = {"codebook_size", "commitment_weight"} if job == "sweep" else set()  # the sweep takes lists of them
    assert set(generated) == {name for name, setting in settings(Config).items() if setting.flag != ""} - searched
    argv, wanted = ["--out", "unused", "--data-root", str(synthetic_root)], {}
    for name in generated:
        if name in ("data_root", "size", "downsample", "accelerator", "datasets"):
            continue  # paths, the image-to-grid pair and "gpu": the bad-flag table covers them
        text, value = changed_value(getattr(Config, name), settings(Config)[name].choices)
        flag = settings(Config)[name].flag or f"--{name.replace('_', '-')}"
        argv += [flag if value else flag.replace("--", "--no-")] if text is None else [flag, text]
        wanted[name] = value
    config = module.config_from_args(parser, parser.parse_args(argv))
    assert {name: getattr(config, name) for name in wanted} == wanted
    untouched = set(Config.__dataclass_fields__) - set(wanted) - {"data_root"}
    assert all(getattr(config, name) == getattr(Config, name) for name in untouched)

"""What every job script shares: the common flags, config from flags, and clean user errors."""

from __future__ import annotations

import argparse
import logging
import math
import os
import signal
import sys
from typing import Any, Callable

import ray
from medmnist.info import DEFAULT_ROOT

from medvq.config import ACCELERATORS, MIXINGS, Config
from medvq.errors import RunFailed, Stopped, UserError
from medvq.storage import absolute, join


def flag_value(kind: type, what: str, accepts: Callable[[float], bool] = lambda value: True) -> Callable[[str], Any]:
    """An argparse `type`: the flag's text as `kind`, refused in one line (naming `what` it takes) otherwise."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not math.isfinite(value) or not accepts(value):
            raise argparse.ArgumentTypeError(f"takes {what}, got {text!r}")
        return value

    parse.__name__ = what  # argparse names the type in some messages
    return parse


def text_value(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("takes a non-empty value")
    return text


POSITIVE_INT = flag_value(int, "a whole number > 0", lambda value: value > 0)
NON_NEGATIVE_INT = flag_value(int, "a whole number >= 0", lambda value: value >= 0)
POSITIVE = flag_value(float, "a number > 0", lambda value: value > 0)
NON_NEGATIVE = flag_value(float, "a number >= 0", lambda value: value >= 0)


class JobParser(argparse.ArgumentParser):
    """A job's parser: no prefix matching (a misspelt --codebook-size never silently means --codebook-sizes), and
    a bad flag is a UserError like every other mistake: one line, exit 2, no usage dump."""

    def error(self, message: str):
        raise UserError(f"{message} (see --help)")


def job_parser(description: str) -> argparse.ArgumentParser:
    return JobParser(description=description, allow_abbrev=False)


def add_data_flags(parser: argparse.ArgumentParser, datasets_default: str | None = ",".join(Config.datasets)) -> None:
    """--data-root and --datasets, with the same names and meanings in every job."""
    parser.add_argument("--data-root", type=text_value,
                        help="folder (on a cluster, every node's: a shared volume) or URI (s3://...) "
                        "of the MedMNIST .npz files (default: $MEDVQ_DATA_ROOT, else medmnist's ~/.medmnist)")
    parser.add_argument("--datasets", type=text_value, default=datasets_default,
                        help="comma-separated MedMNIST names (default: %(default)s)")


def common_parser(description: str) -> argparse.ArgumentParser:
    """Flags every training job takes."""
    parser = job_parser(description)
    add_data_flags(parser)
    parser.add_argument("--out", required=True, type=text_value,
                        help="output folder, or a URI (s3://...) to upload the outputs to")
    parser.add_argument("--epochs", type=POSITIVE_INT, default=Config.epochs, help="default: %(default)s")
    return parser


def add_searched_flags(parser: argparse.ArgumentParser) -> None:
    """The two values the sweep searches, for jobs that train one model."""
    parser.add_argument("--codebook-size", type=POSITIVE_INT, default=Config.codebook_size)
    parser.add_argument("--commitment-weight", type=POSITIVE, default=Config.commitment_weight)


def add_training_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--size", type=POSITIVE_INT, default=Config.size, help="image side: 28, 64, 128 or 224")
    parser.add_argument("--batch-size", type=POSITIVE_INT, default=Config.batch_size, help="per worker")
    parser.add_argument("--learning-rate", type=POSITIVE, default=Config.learning_rate)
    parser.add_argument("--mixing", choices=MIXINGS, default=Config.mixing)
    parser.add_argument("--limit-batches", type=POSITIVE_INT, help="at most this many train and val batches per epoch")
    parser.add_argument("--accelerator", choices=ACCELERATORS, default=Config.accelerator)
    parser.add_argument("--seed", type=NON_NEGATIVE_INT, default=Config.seed)
    parser.add_argument("--compile", dest="compile_model", action="store_true",
                        help="torch.compile the encoder and decoder (compiling first takes ~20 s on a 2-core CPU)")


def parse_list(text: str, item: Callable[[str], Any], flag: str) -> tuple:
    """"64,128" -> (64, 128), each item parsed by a `flag_value`, with a one-line error naming the flag."""
    try:
        return tuple(item(part) for part in text.split(",") if part.strip())
    except argparse.ArgumentTypeError as error:
        raise UserError(f"{flag} takes a comma-separated list; each item {error}") from None


def default_storage(out: str) -> str:
    """Ray's storage when --storage is not given: OUT/ray_results (an absolute path, or under the URI)."""
    return join(absolute(out), "ray_results")


def storage_from_args(args: argparse.Namespace) -> tuple[str, str]:
    """(Ray's storage, how to name it in an error): --storage, else OUT/ray_results."""
    if args.storage:
        return absolute(args.storage), f"--storage {args.storage}"
    return default_storage(args.out), f"--out {args.out} (Ray's storage defaults to OUT/ray_results; or give --storage)"


def parse_range(text: str, flag: str) -> tuple[float, float]:
    """"0.05:2" -> (0.05, 2.0), with a one-line error naming the flag."""
    parts = text.split(":")
    try:
        low, high = (POSITIVE(part) for part in parts) if len(parts) == 2 else (None, None)
    except argparse.ArgumentTypeError:
        low = None
    if low is None:
        raise UserError(f"{flag} takes LOW:HIGH (two numbers > 0) or a comma-separated list of numbers > 0, "
                        f"got {text!r}")
    return low, high


def resolve_data_root(flag: str | None) -> str:
    """--data-root, else $MEDVQ_DATA_ROOT, else medmnist's own ~/.medmnist: an absolute path or a URI."""
    return absolute(flag or os.environ.get("MEDVQ_DATA_ROOT") or DEFAULT_ROOT)


def dataset_names(flag: str) -> tuple[str, ...]:
    return tuple(name.strip() for name in flag.split(",") if name.strip())


def config_from_args(args: argparse.Namespace) -> Config:
    """Build the one Config from parsed flags; flags a job does not define keep their defaults."""
    names = dataset_names(args.datasets)
    flag_fields = ("size", "codebook_size", "commitment_weight", "batch_size", "learning_rate", "mixing",
                   "limit_batches", "accelerator", "seed", "epochs", "compile_model")
    values = {name: getattr(args, name) for name in flag_fields if hasattr(args, name)}
    return Config(data_root=resolve_data_root(args.data_root), datasets=names, **values)


EXIT_CODES = {UserError: 2, RunFailed: 1, Stopped: 130}


def stop_like_ctrl_c(signum: int, frame) -> None:
    signal.raise_signal(signal.SIGINT)


def start_ray() -> None:
    """Join the cluster under `ray job submit` (RAY_ADDRESS), else start a local instance. Worker logs stay in Ray's
    log files and dashboard. ray.init makes SIGTERM exit at once: it gets back the meaning run_job gives it."""
    ray.init(log_to_driver=False)
    signal.signal(signal.SIGTERM, stop_like_ctrl_c)


def run_job(main: Callable[[], None]) -> None:
    """Run a job's main. A UserError, RunFailed or Stopped becomes one line on stderr and its exit code, with
    no traceback. SIGTERM (`ray job stop`, a scheduler's preemption) means what Ctrl-C means: Ray Tune and
    Lightning then stop at a point the same command continues from."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    signal.signal(signal.SIGTERM, stop_like_ctrl_c)
    try:
        main()
    except KeyboardInterrupt:
        print("error: stopped by a signal: run the same command to continue", file=sys.stderr)
        sys.exit(EXIT_CODES[Stopped])
    except tuple(EXIT_CODES) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(EXIT_CODES[type(error)])

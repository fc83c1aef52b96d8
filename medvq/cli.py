"""What every job script shares: the common flags, config from flags, and clean user errors."""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import re
import signal
import sys
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from typing import Any, get_args, get_origin, get_type_hints

import ray

from medvq.collector import WORKER_SETUP_HOOK, space_out_full_collections
from medvq.config import BOUNDS, Config, Setting, SweepConfig, results_shaping, settings
from medvq.data import DEFAULT_ROOT
from medvq.errors import RunFailed, Stopped, UserError
from medvq.provenance import provenance_of
from medvq.storage import absolute, join


def flag_value(kind: type, what: str, accepts: Callable[[Any], bool] = lambda value: True) -> Callable[[str], Any]:
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


def list_value(item: Callable[[str], Any]) -> Callable[[str], tuple]:
    """An argparse `type` for "a,b,c": each item parsed by `item`; an empty list is left to the config to refuse."""

    def parse(text: str) -> tuple:
        text_value(text)
        try:
            return tuple(item(part.strip()) for part in text.split(",") if part.strip())
        except argparse.ArgumentTypeError as error:
            raise argparse.ArgumentTypeError(f"takes a comma-separated list; each item {error}") from None

    return parse


def number_value(kind: type, bound: str | None) -> Callable[[str], Any]:
    """int -> "a whole number > 0", float -> "a number in (0, 1)": a `flag_value` for a declared bound."""
    what = "a whole number" if kind is int else "a number"
    return flag_value(kind, f"{what} {bound}" if bound else what, BOUNDS[bound] if bound else lambda value: True)


POSITIVE_INT, NON_NEGATIVE_INT = number_value(int, "> 0"), number_value(int, ">= 0")
POSITIVE, NON_NEGATIVE = number_value(float, "> 0"), number_value(float, ">= 0")


class JobParser(argparse.ArgumentParser):
    """A job's parser: no prefix matching (a misspelt --codebook-size never silently means --codebook-sizes), and
    a bad flag is a UserError like every other mistake: one line, exit 2, no usage dump. Flags of config fields
    come from their declaration (`add_settings`), and `build` turns them back into that config."""

    def __init__(self, description: str):
        super().__init__(description=description, allow_abbrev=False)
        self.generated: dict[type, list[str]] = {}

    def error(self, message: str):
        raise UserError(f"{message} (see --help)")

    def add_settings(self, config_class: type, names: Iterable[str] | None = None, **defaults: Any) -> None:
        """One flag per field of `config_class` that has a flag (all, or `names`), with its declared help, default
        and allowed values; `defaults` replaces a default for this job."""
        declared, hints = settings(config_class), get_type_hints(config_class)
        for name in names or [name for name, s in declared.items() if s.flag != ""]:
            setting, default = declared[name], defaults.get(name, getattr(config_class, name))
            flag = setting.flag or f"--{name.replace('_', '-')}"
            shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
            help = setting.help + (f" (default: {shown})" if default is not None else "")
            if hints[name] is bool:
                self.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=default, help=help)
            else:
                self.add_argument(
                    flag,
                    dest=name,
                    default=default,
                    help=help,
                    type=flag_type(hints[name], setting),
                    choices=setting.choices or None,
                )
            self.generated.setdefault(config_class, []).append(name)

    def build(self, config_class: type, args: argparse.Namespace, **values: Any):
        """`config_class` from the flags `add_settings` made for it, and `values` for the rest."""
        return config_class(
            **{**{name: getattr(args, name) for name in self.generated.get(config_class, [])}, **values}
        )


def flag_type(hint: Any, setting: Setting) -> Callable[[str], Any]:
    """How a flag's text becomes the field's type: int, float, str, an optional one, or a tuple of them."""
    if get_origin(hint) is tuple:
        return list_value(flag_type(get_args(hint)[0], setting))
    kind = next((arg for arg in get_args(hint) if arg is not type(None)), hint)  # int | None -> int
    return text_value if kind is str else number_value(kind, setting.bound)


def add_data_flags(parser: JobParser, **defaults: Any) -> None:
    """--data-root and --datasets, with the same names and meanings in every job."""
    parser.add_settings(Config, ("data_root", "datasets"), **defaults)


def add_run_flags(parser: JobParser) -> None:
    """--run and --data-root of a job that reads what a run left (its figures, its latents)."""
    parser.add_argument(
        "--run",
        required=True,
        type=text_value,
        help="the --out folder (or URI) of jobs/sweep.py, train.py or encode.py",
    )
    parser.add_argument(
        "--data-root",
        type=text_value,
        help="MedMNIST files for the pictures of images (default: the data root the model was trained on)",
    )


def add_storage_flag(parser: JobParser) -> None:
    parser.add_argument(
        "--storage",
        type=text_value,
        help="Ray Train/Tune storage: a folder, shared mount or s3:// "
        "URI (default: OUT/ray_results); the same command resumes from it",
    )


def add_out_flag(parser: JobParser, help: str) -> None:
    parser.add_argument("--out", required=True, type=text_value, help=help)


def training_parser(description: str, *, searched: bool = False) -> JobParser:
    """The flags of a job that trains: every setting of Config that has a flag; the two the sweep searches only
    when the job trains one model (`searched`: the sweep takes lists of them instead)."""
    parser = JobParser(description)
    add_out_flag(parser, "output folder, or a URI (s3://...) to upload the outputs to")
    add_storage_flag(parser)
    parser.add_settings(
        Config,
        [
            name
            for name, setting in settings(Config).items()
            if setting.flag != "" and (searched or name not in ("codebook_size", "commitment_weight"))
        ],
    )
    return parser


def default_storage(out: str) -> str:
    """Ray's storage when --storage is not given: OUT/ray_results (an absolute path, or under the URI)."""
    return join(absolute(out), "ray_results")


def storage_from_args(args: argparse.Namespace) -> tuple[str, str]:
    """(Ray's storage, how to name it in an error): --storage, else OUT/ray_results."""
    if args.storage:
        return absolute(args.storage), f"--storage {args.storage}"
    return default_storage(args.out), f"--out {args.out} (Ray's storage defaults to OUT/ray_results; or give --storage)"


def run_record(job: str, out: str, config: Config | SweepConfig) -> dict:
    """A run is what its --out names. Its Ray name comes from that location (Ray's advice: no timestamps or random
    values), so the same command resumes it and a new --out is a new run, also with a shared --storage; with it
    goes what shapes the run's results, by flag, which a resumed run must repeat (`check_same_run`)."""
    location = absolute(out).rstrip("/")
    words = re.sub(r"[^A-Za-z0-9_]+", "-", location.rsplit("/", 1)[-1]).strip("-")[:40]
    name = "-".join(filter(None, [f"medvq-{job}", words, hashlib.sha1(location.encode()).hexdigest()[:10]]))
    return {"job": job, "name": name, "settings": json.loads(json.dumps(shaping_flags(results_shaping(config))))}


def shaping_flags(values: dict[str, Any]) -> dict[str, Any]:
    """config.results_shaping's values, flattened and named by their flags ("--epochs"; a field whose flag a job
    declares itself by its own name)."""
    declared = {**settings(Config), **settings(SweepConfig)}
    flat = {}
    for name, value in values.items():
        if isinstance(value, dict):
            flat.update(shaping_flags(value))
        else:
            flag = declared[name].flag
            flat[flag or (name if flag == "" else f"--{name.replace('_', '-')}")] = value
    return flat


def check_same_run(out: str, record: dict) -> None:
    """Refuse, in one line and before anything starts, to continue in `out` a run of another job or of other
    settings than its first start's (provenance.json); a new folder, or one from before runs recorded this, passes."""
    first = provenance_of(out).get("run")
    if not first:
        return
    if first["job"] != record["job"]:
        raise UserError(f"--out {out} holds a run of jobs/{first['job']}.py: give a new --out")
    had, now = first["settings"], record["settings"]
    shown = lambda value: ",".join(map(str, value)) if isinstance(value, list) else str(value)
    # Only settings both starts knew: one added by an upgrade since has no value in the record to compare with
    changed = [
        f"{flag} {shown(now[flag])} (it has {shown(had[flag])})"
        for flag in now
        if had.get(flag, now[flag]) != now[flag]
    ]
    if changed:
        raise UserError(
            f"--out {out} holds a run of jobs/{record['job']}.py started with other settings: {'; '.join(changed)}; "
            "repeat its flags to continue it, or give a new --out"
        )


def resolve_data_root(flag: str | None) -> str:
    """--data-root, else $MEDVQ_DATA_ROOT, else medmnist's own ~/.medmnist: an absolute path or a URI."""
    return absolute(flag or os.environ.get("MEDVQ_DATA_ROOT") or DEFAULT_ROOT)


def config_from_args(parser: JobParser, args: argparse.Namespace, **values: Any) -> Config:
    """The one Config of a job's flags, its data root resolved; flags a job does not have keep their defaults."""
    return parser.build(Config, args, **{"data_root": resolve_data_root(args.data_root), **values})


EXIT_CODES = {UserError: 2, RunFailed: 1, Stopped: 130}


def stop_like_ctrl_c(signum: int, frame) -> None:
    signal.raise_signal(signal.SIGINT)


JOB_RUNTIME_ENV = {"worker_process_setup_hook": WORKER_SETUP_HOOK}  # every Ray worker of a job


def start_ray() -> None:
    """Join the cluster under `ray job submit` (RAY_ADDRESS), else start a local instance. Worker logs stay in Ray's
    log files and dashboard; each of the job's workers sets Python's collector as the driver does (medvq.collector).
    ray.init makes SIGTERM exit at once: it gets back the meaning run_job gives it."""
    ray.init(log_to_driver=False, runtime_env=JOB_RUNTIME_ENV)
    signal.signal(signal.SIGTERM, stop_like_ctrl_c)


@contextmanager
def ray_stopped_at_the_end():
    """Stop the local Ray instance that the block started, as it ends, its autoscaler's monitor first: Ray's own exit
    hook waits for late worker errors, then stops the monitor after the GCS, without which the monitor cannot leave
    (benchmarks/RESULTS.md); the monitor keeps no state. A cluster the block joined is left to Ray's hook, which
    records an unexpected error there; a Ray already running in this process (a test's) is left running."""
    started_here = not ray.is_initialized()
    try:
        yield
    finally:
        node = ray._private.worker._global_node  # the local instance's processes: Ray has no public handle
        if started_here and node is not None and node.all_processes:  # none when it joined a cluster
            node.kill_monitor(check_alive=False)
            ray.shutdown()


def run_job(main: Callable[[], None]) -> None:
    """Run a job's main. A UserError, RunFailed or Stopped becomes one line on stderr and its exit code, with
    no traceback. SIGTERM (`ray job stop`, a scheduler's preemption) means what Ctrl-C means: Ray Tune and
    Lightning then stop at a point the same command continues from."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    signal.signal(signal.SIGTERM, stop_like_ctrl_c)
    space_out_full_collections()
    try:
        with ray_stopped_at_the_end():
            main()
    except KeyboardInterrupt:
        print("error: stopped by a signal: run the same command to continue", file=sys.stderr)
        sys.exit(EXIT_CODES[Stopped])
    except tuple(EXIT_CODES) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(EXIT_CODES[type(error)])

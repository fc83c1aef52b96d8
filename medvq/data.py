"""MedMNIST files -> verified uint8 arrays, read with numpy alone: a Tune trial's driver checks files and needs no torch
(a second of a core to import). Their tensors and batches: medvq.batches.

Everything known about a dataset (channels, labels, split sizes, md5, file names) comes from
`medmnist.INFO`; nothing is copied by hand, so any 2D MedMNIST set works the same way.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path

import numpy as np

from medvq.config import Config
from medvq.errors import UserError
from medvq.storage import cached_copy, is_file, is_uri, join

log = logging.getLogger(__name__)


def _medmnist_info():
    """The module medmnist.info, medmnist's table of datasets, run on its own: importing it as medmnist.info runs the
    package's __init__ first, whose Evaluator imports scikit-learn, seconds of every process that reads a dataset (the
    job's driver, each Train worker, each encoder actor; benchmarks/RESULTS.md). It imports nothing of medmnist's."""
    package = Path(importlib.util.find_spec("medmnist").origin).parent
    spec = importlib.util.spec_from_file_location("medvq._medmnist_info", package / "info.py")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except ImportError:  # a later medmnist whose info.py needs its package: the slow way
        import medmnist.info as module
    return module


_MEDMNIST = _medmnist_info()
INFO, DEFAULT_ROOT = _MEDMNIST.INFO, _MEDMNIST.DEFAULT_ROOT

SPLITS = ("train", "val", "test")
SIZES = (28, 64, 128, 224)
LABEL_CHARS = 22  # longer class names are cut, so legends and captions stay beside their pictures


def dataset_info(name: str) -> dict:
    """`medmnist.INFO[name]`, for the 2D single-label sets medvq can learn from."""
    two_d = sorted(n for n in INFO if not n.endswith("3d"))
    if name not in INFO or name.endswith("3d"):
        raise UserError(f"unknown dataset {name!r}: choose from {', '.join(two_d)}")
    if INFO[name]["task"].startswith("multi-label"):
        raise UserError(f"{name} is multi-label; medvq needs one class per image")
    return INFO[name]


def short_label(name: str) -> str:
    """ "immature granulocytes(myelocytes, ...)" -> "immature granulocytes"; long names end in an ellipsis."""
    name = name.split("(")[0].strip()
    return name if len(name) <= LABEL_CHARS else name[: LABEL_CHARS - 1].rstrip() + "\u2026"


def file_name(name: str, size: int) -> str:
    """MedMNIST's own naming: `bloodmnist.npz` at 28x28, `bloodmnist_64.npz` for MedMNIST+."""
    if size not in SIZES:
        raise UserError(f"image size must be one of {', '.join(map(str, SIZES))}, got {size}")
    return f"{name}.npz" if size == 28 else f"{name}_{size}.npz"


def _size_key(size: int) -> str:
    return "" if size == 28 else f"_{size}"


def ensure_file(name: str, root: str | Path | None, size: int = 28) -> Path:
    """A local path of the dataset's file under `root` (None: medmnist's ~/.medmnist): the file itself, a
    node-local copy of it when `root` is a URI (s3://bucket/medmnist), or downloaded when it is missing."""
    info, stored_as = dataset_info(name), file_name(name, size)
    url = info[f"url{_size_key(size)}"]
    if is_uri(root):
        location = join(str(root), stored_as)
        if not is_file(location):
            raise UserError(f"{location} does not exist: upload {url} there, or point --data-root elsewhere")
        return cached_copy(location)
    path = Path(DEFAULT_ROOT if root is None else root) / stored_as
    if not path.exists():
        _download(info, path, size, url)
    return path


def _download(info: dict, path: Path, size: int, url: str) -> None:
    """Download through medmnist into a folder beside `path`, then move the file into place: processes that
    find the file missing at once never read (or write) a half-written one."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=path.parent, prefix=".medvq-download-") as folder:
            import medmnist  # here: downloads alone need the package (see _medmnist_info)

            dataset_class = getattr(medmnist, info["python_class"])
            dataset_class(split="train", root=folder, size=size, download=True)
            os.replace(Path(folder) / path.name, path)
    except Exception as error:  # medmnist raises a bare RuntimeError for any network failure
        raise UserError(
            f"{path.name} is not in {path.parent} and the download failed ({type(error).__name__}): "
            f"fetch {url} into that folder, or point --data-root / MEDVQ_DATA_ROOT at a folder that has it"
        ) from None


@cache
def _md5(path: Path, mtime_ns: int) -> str:
    """The file's md5, once per file version (`mtime_ns`)."""
    digest = hashlib.md5()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _structure_problem(path: Path, name: str, size: int) -> str | None:
    """Why the file is not a MedMNIST file of this dataset and size, or None if its structure holds."""
    info = dataset_info(name)
    expected_keys = {f"{split}_{kind}" for split in SPLITS for kind in ("images", "labels")}
    image_shape = (size, size) if info["n_channels"] == 1 else (size, size, info["n_channels"])
    if not zipfile.is_zipfile(path):  # np.load would return a bare array for a .npy file, not an archive
        return "not a readable npz file (not a zip archive)"
    try:
        with np.load(path) as npz:
            if set(npz.files) != expected_keys:
                return f"keys {sorted(npz.files)} are not the six MedMNIST keys"
            for split in SPLITS:
                images, labels = npz[f"{split}_images"], npz[f"{split}_labels"]
                count = info["n_samples"][split]
                if images.dtype != np.uint8:
                    return f"{split}_images has dtype {images.dtype}, not uint8"
                if images.shape != (count, *image_shape):
                    return f"{split}_images has shape {images.shape}, expected {(count, *image_shape)}"
                if labels.shape not in ((count,), (count, 1)):
                    return f"{split}_labels has shape {labels.shape}, expected ({count},) or ({count}, 1)"
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
        return f"not a readable npz file ({error})"
    return None


def _matches_medmnists_md5(path: Path, name: str, size: int) -> bool:
    return _md5(path, path.stat().st_mtime_ns) == dataset_info(name)[f"MD5{_size_key(size)}"]


@cache
def _verify(path: Path, name: str, size: int, mtime_ns: int) -> None:
    """Check the md5 from medmnist.INFO; on mismatch accept a structurally valid copy with a warning.

    Cached per file version (`mtime_ns`), so loading three splits checks the file once.
    """
    if _matches_medmnists_md5(path, name, size):
        return
    problem = _structure_problem(path, name, size)
    if problem:
        raise UserError(f"{path} is not a valid {name} file: {problem}; delete it and download it again")
    log.warning("%s: md5 differs from medmnist's, but its structure is valid; using it", path)


def verified_file(name: str, root: str | Path | None, size: int = 28) -> Path:
    """The dataset's file, downloaded if missing and checked; raises UserError if it is unusable."""
    path = ensure_file(name, root, size)
    _verify(path, name, size, path.stat().st_mtime_ns)
    return path


def is_medmnists_own(name: str, root: str | Path | None, size: int = 28) -> bool:
    """Whether the dataset's file is MedMNIST's own, byte for byte (its md5 in medmnist.INFO)."""
    return _matches_medmnists_md5(verified_file(name, root, size), name, size)


def check_data(config: Config) -> None:
    """Fail early, before anything is written, if any dataset file is missing or corrupt."""
    for name in config.datasets:
        verified_file(name, config.data_root, config.size)


_kept_splits: dict | None = None  # (path, its mtime, split) -> load_split's arrays, inside each_split_read_once


def load_split(name: str, split: str, root: str | Path, size: int = 28) -> tuple[np.ndarray, np.ndarray]:
    """One split of one dataset: images uint8 (N, H, W, C) with C as stored, labels int64 (N,)."""
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r}: choose from {', '.join(SPLITS)}")
    path = verified_file(name, root, size)
    key = (path, path.stat().st_mtime_ns, split)
    if _kept_splits is not None and key in _kept_splits:
        return _kept_splits[key]
    with np.load(path) as npz:
        images, labels = npz[f"{split}_images"], npz[f"{split}_labels"]
    if images.ndim == 3:
        images = images[..., None]  # (N, H, W) -> (N, H, W, 1)
    loaded = images, labels.reshape(-1).astype(np.int64)
    if _kept_splits is not None:
        for array in loaded:
            array.flags.writeable = False  # shared by every caller in the block
        _kept_splits[key] = loaded
    return loaded


@contextmanager
def each_split_read_once() -> Iterator[None]:
    """Inside this block load_split reads a split from its file once and hands every caller the same read-only
    arrays: the report after training (probes on pixels, figures, the explorer) looks at the same images several
    times. Not around training: its arrays are copied into tensors, and a kept copy would double their memory."""
    global _kept_splits
    outer, _kept_splits = _kept_splits, {} if _kept_splits is None else _kept_splits
    try:
        yield
    finally:
        _kept_splits = outer


def rgb(images: np.ndarray) -> np.ndarray:
    """uint8 (N, H, W, 1 or 3) -> (N, H, W, 3), grayscale replicated as the model sees it: a read-only view."""
    return np.broadcast_to(images, (*images.shape[:3], 3))

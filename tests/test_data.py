"""medvq.data and medvq.batches: MedMNIST files -> verified uint8 arrays with ids -> batches."""

from __future__ import annotations

import importlib.util
import io
import logging
import shutil
from pathlib import Path
from types import SimpleNamespace

import medmnist
import numpy as np
import pytest
import torch
from medmnist import INFO
from medmnist.dataset import MedMNIST

from medvq import data
from medvq.batches import IndexBatches, load_splits, to_float_images
from medvq.data import SPLITS, each_split_read_once, file_name, load_split
from medvq.errors import UserError
from medvq.synthetic import write_synthetic_npz

REAL_DATASETS = ("bloodmnist", "pneumoniamnist", "retinamnist", "breastmnist")


def warnings_in(caplog) -> list[logging.LogRecord]:
    return [record for record in caplog.records if record.levelno >= logging.WARNING]


def real_file(root: Path, name: str) -> Path:
    path = root / file_name(name, 28)
    if not path.exists():
        pytest.skip(f"{path} is not here")
    return path


@pytest.fixture
def offline(monkeypatch):
    """medmnist's download fails, as it does without network; returns the (root, size) of each try."""
    tries = []

    def fail(dataset):
        tries.append((dataset.root, dataset.size))
        raise RuntimeError("no network in tests")

    monkeypatch.setattr(MedMNIST, "download", fail)
    return tries


# --- load_split: the contract --------------------------------------------------------------------


@pytest.mark.parametrize("name", ["breastmnist", "retinamnist"])
@pytest.mark.parametrize("split", SPLITS)
def test_load_split_shapes_dtypes_and_counts(synthetic_root, name, split):
    images, labels = load_split(name, split, synthetic_root)
    n = INFO[name]["n_samples"][split]
    assert images.dtype == np.uint8 and images.shape == (n, 28, 28, INFO[name]["n_channels"])
    assert labels.dtype == np.int64 and labels.shape == (n,)
    assert set(np.unique(labels)) <= set(range(len(INFO[name]["label"])))


def test_inside_each_split_read_once_a_split_is_read_once_and_shared_read_only(synthetic_root, monkeypatch):
    reads = []
    monkeypatch.setattr(data.np, "load", lambda path: reads.append(path) or np.lib.npyio.NpzFile(open(path, "rb")))
    with each_split_read_once():
        first, again = (load_split("retinamnist", "test", synthetic_root) for _ in range(2))
        with each_split_read_once():  # a nested block shares the outer one's arrays
            nested = load_split("retinamnist", "test", synthetic_root)
        load_split("retinamnist", "val", synthetic_root)
        assert len(reads) == 2 and first[0] is again[0] is nested[0] and not first[0].flags.writeable
    after = load_split("retinamnist", "test", synthetic_root)
    assert len(reads) == 3 and after[0] is not first[0] and after[0].flags.writeable  # outside: read afresh, owned
    np.testing.assert_array_equal(after[0], first[0])


def test_flat_labels_load_like_official_layout(tmp_path):
    official = write_synthetic_npz(tmp_path / "official", "retinamnist", seed=3)
    flat = write_synthetic_npz(tmp_path / "flat", "retinamnist", seed=3, flat_labels=True)
    with np.load(official) as a, np.load(flat) as b:
        assert a["train_labels"].ndim == 2 and b["train_labels"].ndim == 1
    for split in SPLITS:
        (images_a, labels_a), (images_b, labels_b) = (
            load_split("retinamnist", split, path.parent) for path in (official, flat)
        )
        assert np.array_equal(images_a, images_b) and np.array_equal(labels_a, labels_b)
        assert labels_b.shape == (INFO["retinamnist"]["n_samples"][split],)


def test_size_64_uses_medmnist_plus_naming(tmp_path):
    path = write_synthetic_npz(tmp_path, "breastmnist", size=64)
    assert path.name == "breastmnist_64.npz"
    images, labels = load_split("breastmnist", "val", tmp_path, size=64)
    assert images.shape == (INFO["breastmnist"]["n_samples"]["val"], 64, 64, 1) and len(labels) == len(images)


# --- the real files ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", REAL_DATASETS)
@pytest.mark.parametrize("split", SPLITS)
def test_real_split_equals_what_medmnist_reads(real_root, name, split):
    real_file(real_root, name)
    images, labels = load_split(name, split, real_root)
    reference = getattr(medmnist, INFO[name]["python_class"])(split=split, root=str(real_root))
    assert images.shape == (INFO[name]["n_samples"][split], 28, 28, INFO[name]["n_channels"])
    assert np.array_equal(images.reshape(reference.imgs.shape), reference.imgs)
    assert labels.dtype == np.int64 and np.array_equal(labels, reference.labels.reshape(-1))


@pytest.mark.parametrize("name", REAL_DATASETS)
def test_real_file_passes_md5_without_warning(real_root, tmp_path, caplog, name):
    # A copy has a new path, so the md5 is computed afresh rather than taken from the cache.
    shutil.copy(real_file(real_root, name), tmp_path)
    with caplog.at_level(logging.WARNING, logger="medvq.data"):
        load_split(name, "val", tmp_path)
    assert warnings_in(caplog) == []


# --- integrity ------------------------------------------------------------------------------------


def test_synthetic_file_is_accepted_with_one_warning(tmp_path, caplog):
    path = write_synthetic_npz(tmp_path, "breastmnist")
    with caplog.at_level(logging.WARNING, logger="medvq.data"):
        for split in SPLITS:
            load_split("breastmnist", split, tmp_path)
    warnings = warnings_in(caplog)
    assert len(warnings) == 1 and str(path) in warnings[0].getMessage()


def _edited(edit):
    """A writer that saves the source's arrays, changed by `edit`, under the target's name."""

    def write(source: Path, target: Path) -> None:
        with np.load(source) as npz:
            arrays = {key: npz[key] for key in npz.files}
        np.savez(target, **edit(arrays))

    return write


def _replaced(key: str, change):
    return _edited(lambda arrays: {**arrays, key: change(arrays[key])})


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


NOT_NPZ, NOT_KEYS = "not a readable npz file", "are not the six MedMNIST keys"
BROKEN_FILES = {
    "truncated": (lambda s, t: t.write_bytes(s.read_bytes()[: s.stat().st_size // 2]), NOT_NPZ),
    "text": (lambda s, t: t.write_text("not an archive\n"), NOT_NPZ),
    "npy": (lambda s, t: t.write_bytes(_npy_bytes(np.zeros((3, 28, 28), np.uint8))), NOT_NPZ),
    "extra key": (_edited(lambda a: {**a, "extra_images": a["val_images"]}), NOT_KEYS),
    "missing key": (_edited(lambda a: {k: v for k, v in a.items() if k != "test_labels"}), NOT_KEYS),
    "rgb images": (_replaced("train_images", lambda x: np.stack([x] * 3, -1)), "train_images has shape"),
    "wrong side": (_replaced("val_images", lambda x: x[:, :27, :27]), "val_images has shape"),
    "wrong dtype": (_replaced("val_images", lambda x: x.astype(np.float32)), "val_images has dtype float32"),
    "image count": (_replaced("test_images", lambda x: x[:-1]), "test_images has shape"),
    "label count": (_replaced("train_labels", lambda x: x[1:]), "train_labels has shape"),
    "label columns": (_replaced("train_labels", lambda x: np.hstack([x, x])), "train_labels has shape"),
}


@pytest.mark.parametrize("write, problem", BROKEN_FILES.values(), ids=BROKEN_FILES.keys())
def test_broken_file_is_refused_with_a_clear_message(tmp_path, write, problem):
    source = write_synthetic_npz(tmp_path / "source", "breastmnist")
    target = tmp_path / "root" / source.name
    target.parent.mkdir()
    write(source, target)
    with pytest.raises(UserError) as error:
        load_split("breastmnist", "test", target.parent)
    message = str(error.value)
    assert str(target) in message and problem in message and "download it again" in message
    assert "\n" not in message


# --- names, splits and sizes ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, split, size",
    [
        ("nosuchmnist", "train", 28),
        ("organmnist3d", "train", 28),  # 3D
        ("chestmnist", "train", 28),  # multi-label
        ("breastmnist", "training", 28),
        ("breastmnist", "train", 32),
    ],
)
def test_bad_request_is_a_user_error_and_writes_nothing(tmp_path, offline, name, split, size):
    with pytest.raises(UserError):
        load_split(name, split, tmp_path / "data", size)
    assert list(tmp_path.iterdir()) == [] and offline == []


@pytest.mark.parametrize("size", [28, 64])
def test_missing_file_offline_says_what_where_and_how(tmp_path, offline, size):
    root = tmp_path / "data"
    with pytest.raises(UserError) as error:
        load_split("breastmnist", "train", root, size)
    message = str(error.value)
    assert file_name("breastmnist", size) in message and str(root) in message
    assert "--data-root" in message and "MEDVQ_DATA_ROOT" in message
    assert INFO["breastmnist"]["url" if size == 28 else f"url_{size}"] in message
    ((tried, tried_size),) = offline  # into a folder beside the file, moved into place only when complete
    assert Path(tried).parent == root and Path(tried).name.startswith(".medvq-download-") and tried_size == size
    assert [path for path in tmp_path.rglob("*") if path != root] == []


def test_missing_file_is_downloaded_through_medmnist(tmp_path, monkeypatch):
    def download(dataset):  # stands in for the network: writes the file where medmnist would
        write_synthetic_npz(dataset.root, dataset.flag, size=dataset.size)

    monkeypatch.setattr(MedMNIST, "download", download)
    images, _ = load_split("breastmnist", "val", tmp_path / "data", size=64)
    assert images.shape[1:] == (64, 64, 1)
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["breastmnist_64.npz"]


# --- several datasets together --------------------------------------------------------------------


@pytest.mark.parametrize("datasets", [("breastmnist", "retinamnist"), ("retinamnist", "breastmnist")])
def test_load_splits_concatenates_and_traces_rows_back(synthetic_root, datasets):
    arrays = load_splits(datasets, "val", synthetic_root)
    sources = [load_split(name, "val", synthetic_root) for name in datasets]
    assert arrays.images.dtype == torch.uint8
    assert arrays.images.shape == (sum(len(labels) for _, labels in sources), 28, 28, 3)
    for dataset_id, (_, labels) in enumerate(sources):
        rows = arrays.dataset_ids == dataset_id
        assert torch.equal(arrays.indices[rows].sort().values, torch.arange(len(labels)))
    grey = arrays.images[arrays.dataset_ids == datasets.index("breastmnist")]
    assert torch.equal(grey[..., 0], grey[..., 1]) and torch.equal(grey[..., 0], grey[..., 2])

    rows = torch.randperm(len(arrays), generator=torch.Generator().manual_seed(0))[:20]
    batch = arrays[rows]
    for image, label, dataset_id, index in zip(batch["image"], batch["label"], batch["dataset_id"], batch["index"]):
        source_images, source_labels = sources[dataset_id]
        expected = np.broadcast_to(source_images[index], (28, 28, 3))
        assert np.array_equal(image.numpy(), expected) and label == source_labels[index]


def test_to_float_images_is_unit_range_channels_first():
    images = torch.randint(0, 256, (4, 28, 28, 3), dtype=torch.uint8)
    images[0, 0, 0] = torch.tensor([0, 255, 128], dtype=torch.uint8)
    floats = to_float_images(images)
    assert floats.dtype == torch.float32 and floats.shape == (4, 3, 28, 28)
    assert floats.min() == 0 and floats.max() == 1
    assert torch.equal(floats * 255, images.permute(0, 3, 1, 2).float())
    assert floats.is_contiguous(memory_format=torch.channels_last)


# --- IndexBatches ---------------------------------------------------------------------------------


def epoch_rows(sampler: IndexBatches, epoch: int) -> torch.Tensor:
    sampler.set_epoch(epoch)
    batches = list(sampler)
    assert len(batches) == len(sampler)
    assert all(len(batch) <= sampler.batch_size for batch in batches)
    return torch.cat(batches)


def two_datasets(big: int = 1000, small: int = 50) -> torch.Tensor:
    return torch.cat([torch.zeros(big, dtype=torch.int64), torch.ones(small, dtype=torch.int64)])


def test_shuffle_gives_full_batches_of_distinct_rows_and_changes_each_epoch():
    ids = two_datasets(90, 13)  # 103 rows: 10 full batches, 3 rows left over
    sampler = IndexBatches(ids, batch_size=10, order="shuffle", seed=1)
    first, again, second = epoch_rows(sampler, 0), epoch_rows(sampler, 0), epoch_rows(sampler, 1)
    assert all(len(batch) == 10 for batch in sampler) and len(sampler) == 10
    for rows in (first, second):
        assert len(rows) == len(set(rows.tolist())) == 100 and set(rows.tolist()) <= set(range(len(ids)))
    assert set(first.tolist()) != set(second.tolist())  # a different few left over
    assert torch.equal(first, again) and not torch.equal(first, second)
    assert torch.equal(first, epoch_rows(IndexBatches(ids, 10, "shuffle", seed=1), 0))


def test_fewer_rows_than_a_batch_make_one_short_batch():
    sampler = IndexBatches(two_datasets(5, 2), batch_size=10, order="shuffle")
    assert [len(batch) for batch in sampler] == [7] and len(sampler) == 1


@pytest.mark.parametrize("order", ["shuffle", "balanced"])
@pytest.mark.parametrize("n", [101, 100])
def test_training_orders_give_ranks_disjoint_rows_and_equal_batches(order, n):
    ids = two_datasets(n - 30, 30)
    ranks = [IndexBatches(ids, batch_size=10, order=order, seed=2, rank=r, world_size=2) for r in (0, 1)]
    for epoch in (0, 3):
        rows = [epoch_rows(sampler, epoch) for sampler in ranks]
        assert len(list(ranks[0])) == len(list(ranks[1]))
        if order == "shuffle":
            assert len(rows[0]) == len(rows[1]) == n // 2 // 10 * 10
            assert len(set(rows[0].tolist()) | set(rows[1].tolist())) == 2 * len(rows[0])


def test_balanced_draws_each_dataset_about_equally_often():
    ids = two_datasets(1000, 50)
    sampler = IndexBatches(ids, batch_size=64, order="balanced", seed=0)
    draws = torch.bincount(ids[epoch_rows(sampler, 0)], minlength=2).float()
    assert draws.sum() == len(ids) // 64 * 64  # full batches only
    assert (draws - draws.mean()).abs().max() < 0.2 * draws.mean()
    assert not torch.equal(epoch_rows(sampler, 0), epoch_rows(sampler, 1))


def test_fixed_is_the_same_every_epoch_and_ranks_partition_rows():
    ids = two_datasets(90, 11)
    ranks = [IndexBatches(ids, batch_size=8, order="fixed", seed=5, rank=r, world_size=2) for r in (0, 1)]
    rows = [epoch_rows(sampler, 0) for sampler in ranks]
    assert all(torch.equal(epoch_rows(sampler, 7), r) for sampler, r in zip(ranks, rows))
    assert torch.equal(torch.cat(rows).sort().values, torch.arange(len(ids)))


def test_batches_of_rows_go_to_the_arrays_device():
    sampler = IndexBatches(two_datasets(30, 5), batch_size=8, order="shuffle", device="meta")
    assert all(batch.device.type == "meta" for batch in sampler)


# --- a data root that is a URI (file:// here; s3:// in tests/test_multinode.py) -------------------------


def test_a_uri_data_root_is_read_through_a_local_copy_with_the_same_checks(tmp_path):
    remote = tmp_path / "bucket"
    write_synthetic_npz(remote, "breastmnist")
    images, labels = load_split("breastmnist", "test", f"file://{remote}")
    assert images.shape == (INFO["breastmnist"]["n_samples"]["test"], 28, 28, 1) and len(labels) == len(images)
    (remote / "breastmnist.npz").write_bytes(b"not an npz archive")
    with pytest.raises(UserError, match="is not a valid breastmnist file"):
        load_split("breastmnist", "test", f"file://{remote}")
    with pytest.raises(UserError, match="retinamnist.npz does not exist: upload"):
        load_split("retinamnist", "test", f"file://{remote}")


def test_medmnists_table_is_medmnists_own_read_alone_or_through_the_package(tmp_path, monkeypatch):
    """medvq reads medmnist/info.py without the package's __init__ (scikit-learn); a later medmnist whose info.py
    needs its package is imported whole instead."""
    assert data.INFO == INFO and data.DEFAULT_ROOT == medmnist.info.DEFAULT_ROOT
    (tmp_path / "info.py").write_text("from .helpers import INFO\n")  # a relative import: it needs its package
    found = SimpleNamespace(origin=str(tmp_path / "__init__.py"))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: found)
    assert data._medmnist_info().INFO == INFO

"""The pixel probes a run does not measure: kept for MedMNIST's own files and today's probes only, and what the probes
measure there."""

import shutil

import pytest
import torch

from medvq.baselines import PIXEL_PROBES, PIXEL_PROBES_PROTOCOL
from medvq.data import is_medmnists_own, load_split
from medvq.latent_space import PROBE_SPLITS, _pixels, class_probes, pixel_probes
from medvq.probes import protocol
from tests.conftest import SYNTHETIC_DATASETS


def labels_of(name: str, root, size: int = 28) -> dict:
    return {split: load_split(name, split, root, size)[1] for split in PROBE_SPLITS}


def measured(name: str, root, size: int = 28) -> dict:
    pixels = {split: _pixels(name, split, root, size) for split in PROBE_SPLITS}
    return class_probes(pixels, labels_of(name, root, size))


def test_the_kept_pixel_probes_were_measured_with_todays_probes():
    """A change to the probes' settings needs the table measured again (the test below prints its new values); until
    then a run measures the pixel probes itself."""
    assert PIXEL_PROBES_PROTOCOL == protocol()


@pytest.mark.parametrize("name, size", sorted(PIXEL_PROBES))
def test_the_kept_pixel_probes_are_what_the_probes_measure_on_medmnists_own_files(real_root, name, size):
    if not is_medmnists_own(name, real_root, size):
        pytest.skip(f"MedMNIST's own {name} at {size} px is not in {real_root}")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as they were measured
    try:
        now = measured(name, real_root, size)
    finally:
        torch.set_num_threads(threads)
    kept = PIXEL_PROBES[(name, size)]
    assert now["knn"] == pytest.approx(kept["knn"], abs=1e-6), f"measured now: {now}"  # exact neighbours
    # L-BFGS sums in another order on another CPU or thread count: a few test images may change sides, never a point
    assert now["linear"] == pytest.approx(kept["linear"], abs=0.01), f"measured now: {now}"
    assert pixel_probes(name, labels_of(name, real_root, size), str(real_root), size) == kept  # what a run takes


def test_a_run_measures_the_pixel_probes_of_any_other_file(synthetic_root):
    name = SYNTHETIC_DATASETS[0]
    assert (name, 28) in PIXEL_PROBES and not is_medmnists_own(name, synthetic_root)
    taken = pixel_probes(name, labels_of(name, synthetic_root), str(synthetic_root), 28)
    assert taken == measured(name, synthetic_root) != PIXEL_PROBES[(name, 28)]


def test_one_changed_byte_makes_a_file_not_medmnists_own(real_root, tmp_path):
    name = SYNTHETIC_DATASETS[0]
    shutil.copy(real_root / f"{name}.npz", tmp_path / f"{name}.npz")
    with open(tmp_path / f"{name}.npz", "r+b") as handle:  # the zip's last byte: still a valid MedMNIST file
        handle.seek(-1, 2)
        last = handle.read(1)
        handle.seek(-1, 2)
        handle.write(bytes([last[0] ^ 1]))
    assert is_medmnists_own(name, real_root) and not is_medmnists_own(name, tmp_path)

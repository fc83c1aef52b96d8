"""Ray Data encoding to Parquet on a real local Ray instance, read back the way users read it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import torch
from medmnist import INFO

from medvq import report
from medvq.batches import to_float_images
from medvq.checkpoints import checkpoint_config
from medvq.config import Config
from medvq.data import SPLITS, load_split, rgb
from medvq.encode import RECONSTRUCTION, THUMB, encode_latents, encoder_pool, thumbnail_images
from medvq.errors import UserError
from medvq.latent_space import NEIGHBOURS, write_summary
from medvq.model import FEATURE_GRID
from medvq.module import VQVAEModule
from medvq.probes import nearest
from medvq.report import RECONSTRUCTIONS_FILE, encode_and_measure, replace_folder, write_latents
from medvq.train import train_local
from tests.conftest import SYNTHETIC_DATASETS, TINY

pytestmark = pytest.mark.integration
README = Path(__file__).resolve().parents[1] / "README.md"

# Run in a fresh interpreter: proves the Parquet needs nothing but pandas (no Ray extension types).
PLAIN_PANDAS_READER = """
import json, sys
import numpy as np, pandas as pd
frame = pd.read_parquet(sys.argv[1])
assert "ray" not in sys.modules
print(json.dumps({
    "rows": len(frame),
    "unique_keys": int((~frame.duplicated(["dataset", "split", "index"])).sum()),
    "dtypes": {name: str(dtype) for name, dtype in frame.dtypes.items()},
    "features_shape": list(np.stack(frame["features"].to_numpy()).shape),
    "features_dtype": str(np.stack(frame["features"].to_numpy()).dtype),
    "codes_shape": list(np.stack(frame["codes"].to_numpy()).shape),
}))
"""


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, synthetic_root) -> str:
    """A real (barely trained) checkpoint, shared by the module's tests."""
    config = Config(**{**TINY, "data_root": str(synthetic_root), "limit_batches": 2})
    out = tmp_path_factory.mktemp("trained")
    train_local(config, out)
    return str(out / "model.ckpt")


def image_count(datasets) -> int:
    return sum(INFO[name]["n_samples"][split] for name in datasets for split in SPLITS)


def test_latents_parquet_reads_back_with_plain_pandas(ray_instance, checkpoint, tmp_path):
    config = checkpoint_config(checkpoint)
    latents = encode_latents(checkpoint, config, actors=2)
    rows = latents.num_rows
    write_latents(latents, tmp_path)
    read = subprocess.run(
        [sys.executable, "-c", PLAIN_PANDAS_READER, str(tmp_path / "latents")],
        capture_output=True,
        text=True,
        check=True,
    )
    table = json.loads(read.stdout)
    expected = image_count(SYNTHETIC_DATASETS)
    assert rows == table["rows"] == table["unique_keys"] == expected
    assert all(table["dtypes"][name] in ("str", "object") for name in ("dataset", "split", "label_name"))
    assert table["dtypes"]["index"] == table["dtypes"]["label"] == "int64"
    assert all(table["dtypes"][name] == "float32" for name in ("mse", "mae", "psnr", "ssim"))
    assert table["features_shape"] == [expected, config.hidden_channels * FEATURE_GRID**2]
    assert table["features_dtype"] == "float32"
    assert table["codes_shape"] == [expected, config.latent_side**2]


def test_rows_trace_back_to_their_images_and_labels(ray_instance, checkpoint, tmp_path):
    config = checkpoint_config(checkpoint).with_changes(datasets=("breastmnist",))
    frame = encode_latents(checkpoint, config, actors=1).to_pandas()
    test = frame[frame["split"] == "test"].sort_values("index")
    _, labels = load_split("breastmnist", "test", config.data_root)
    np.testing.assert_array_equal(test["label"].to_numpy(), labels)
    assert set(test["label_name"]) <= set(INFO["breastmnist"]["label"].values())
    assert (np.stack(frame["codes"].to_numpy()) < config.codebook_size).all()
    # Each row's thumbnail is the model's reconstruction of its own image, losslessly
    model = VQVAEModule.load_from_checkpoint(checkpoint, map_location="cpu").model.eval()
    images = torch.from_numpy(rgb(load_split("breastmnist", "test", config.data_root)[0]).copy())
    with torch.inference_mode():
        x = to_float_images(images)
        recon = model(x)[0]
        expected = recon.clamp(0, 1).mul(255).permute(0, 2, 3, 1).numpy()
        hidden = model.encoder.net[:-1](x)  # the layer before the projection into the codes' space
    shown = thumbnail_images(test[RECONSTRUCTION]).astype(float)
    assert shown.shape == (len(test), THUMB, THUMB, 3) and np.abs(shown - expected).max() <= 1  # rounding
    # ... its scores its own (a CPU encodes a batch in chunks: 156 images span two)
    np.testing.assert_allclose(test["mse"], (recon - x).pow(2).mean(dim=(1, 2, 3)).numpy(), rtol=1e-4)
    # ... and its features that layer's means over the 3x3 layout: its top-left cell covers grid rows and columns 0-2
    features = np.stack(test["features"].to_numpy()).reshape(len(test), FEATURE_GRID, FEATURE_GRID, -1)
    np.testing.assert_allclose(features[:, 0, 0], hidden[:, :, :3, :3].mean(dim=(2, 3)).numpy(), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(features[:, 2, 1], hidden[:, :, 4:, 2:5].mean(dim=(2, 3)).numpy(), rtol=1e-4, atol=1e-6)


def test_encoding_projects_measures_and_replaces_on_rerun(ray_instance, checkpoint, tmp_path):
    # The datasets in the other order than the model's: the summary follows the order asked for.
    config = checkpoint_config(checkpoint).with_changes(datasets=tuple(reversed(SYNTHETIC_DATASETS)))
    for _ in range(2):  # a re-run replaces the latents rather than appending to them
        records, seconds = encode_and_measure(checkpoint, config, tmp_path, actors=2)
    write_summary(records, tmp_path)
    assert set(seconds) == {"encode", "neighbours", "umap", "probes"}
    frame = pd.read_parquet(tmp_path / "latents")
    written = sorted(path.name for path in (tmp_path / "latents").iterdir())
    assert written == [RECONSTRUCTIONS_FILE, "latents.parquet"]  # written once, whole; pandas reads only the latents
    assert len(frame) == image_count(SYNTHETIC_DATASETS) and not frame.duplicated(["dataset", "split", "index"]).any()
    assert frame[["umap_x", "umap_y"]].notna().all().all() and frame["umap_x"].std() > 0
    # Each image's neighbours, row numbers of the file as pandas reads it, are the nearest other images' features
    rows = np.arange(0, len(frame), 97)
    expected, distances = nearest(np.stack(frame["features"].to_numpy()), NEIGHBOURS, rows)
    np.testing.assert_array_equal(np.stack(frame["neighbours"].to_numpy()[rows]), expected)
    np.testing.assert_allclose(np.stack(frame["neighbour_distances"].to_numpy()[rows]), distances, rtol=1e-5)
    assert not (tmp_path / "latents.partial").exists() and not (tmp_path / "latents.old").exists()
    records = json.loads((tmp_path / "summary.json").read_text())
    assert [record["dataset"] for record in records] == list(reversed(SYNTHETIC_DATASETS))
    for record in records:
        assert record["test_images"] == INFO[record["dataset"]]["n_samples"]["test"]
        probes = [f"{probe}_{features}" for probe in ("knn", "linear") for features in ("features", "pixels")]
        for key in (*probes, "majority_class", "dataset_recovered", "codes_used", "supervised_ceiling"):
            assert 0 <= record[key] <= 1
    table = (tmp_path / "summary.md").read_text()
    assert all(f"| {name} |" in table for name in SYNTHETIC_DATASETS)
    # The README's pandas snippet, as a user would paste it, on these latents
    snippet = README.read_text().split("```python\n")[1].split("```")[0]
    assert '"runs/smoke/latents"' in snippet
    snippet = snippet.replace('"runs/smoke/latents"', repr(str(tmp_path / "latents")))
    shown = subprocess.run([sys.executable, "-c", snippet], capture_output=True, text=True, check=True).stdout
    features = config.hidden_channels * FEATURE_GRID**2
    assert shown.startswith(f"{len(frame)} ({len(frame)}, {features})") and "label_name" in shown


@pytest.mark.parametrize(("gpus_per_actor", "free_cpus", "started_after"), [(0.0, 2, 0), (0.0, 1, 1), (1.0, 8, 3)])
def test_when_the_umaps_process_starts_beside_the_encoding(monkeypatch, gpus_per_actor, free_cpus, started_after):
    """On a CPU the UMAP's process starts before the encoding if the encoder's one actor leaves a CPU free, else once
    that actor, which reads the images too, holds its CPU (the first batch); with GPUs the reads are tasks that it
    could starve: it waits for the last batch."""
    events = []

    def batches(checkpoint, config, pool):
        for number in range(3):
            events.append("batch")
            yield pa.table({"number": [number]})

    monkeypatch.setattr(report, "encoded_batches", batches)
    monkeypatch.setattr(report, "start_projector", lambda: events.append("projector") or "the actor")
    table, projector = report.encoded_while_the_umap_starts("model.ckpt", Config(), (1, gpus_per_actor, 2), free_cpus)
    assert events.index("projector") == started_after and events.count("batch") == 3
    assert table.column("number").to_pylist() == [0, 1, 2] and projector == "the actor"


def test_replacing_the_latents_keeps_a_whole_folder_if_it_stops_half_way(tmp_path, monkeypatch):
    old, new = tmp_path / "latents", tmp_path / "latents.partial"
    for folder, rows in ((old, b"old rows"), (new, b"new rows")):
        folder.mkdir()
        (folder / "latents.parquet").write_bytes(rows)
    moves = []
    real_rename = Path.rename

    def rename_then_stop(self, target):  # the old folder moves aside, then the process dies
        if moves:
            raise KeyboardInterrupt
        moves.append(target)
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", rename_then_stop)
    with pytest.raises(KeyboardInterrupt):
        replace_folder(new, old)
    assert (tmp_path / "latents.old" / "latents.parquet").read_bytes() == b"old rows"
    assert (new / "latents.parquet").read_bytes() == b"new rows"
    monkeypatch.setattr(Path, "rename", real_rename)
    replace_folder(new, old)  # the next run finishes the move
    assert (old / "latents.parquet").read_bytes() == b"new rows" and sorted(tmp_path.iterdir()) == [old]


def test_a_pool_the_cluster_cannot_hold_is_an_error(ray_instance):
    with pytest.raises(UserError, match="do not fit"):
        encoder_pool(actors=1, gpus_per_actor=1)
    with pytest.raises(UserError, match="do not fit"):
        encoder_pool(actors=64, gpus_per_actor=0)

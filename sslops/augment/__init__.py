"""Fused per-sample SSL augmentations (SimCLR / BYOL recipes), decode once, many views.

One kernel turns a batch of uint8 images (B, 3, H, W), in any memory format,
into normalised views with per-sample parameters, with the semantics of
torchvision.transforms.v2.functional applied to ``x / 255`` in this order::

    resized_crop(top, left, height, width, [size, size], bilinear, antialias)
    -> horizontal_flip                       if flip
    -> adjust_brightness / contrast / saturation / hue, in the view's order,  if jitter
    -> rgb_to_grayscale(3 channels)          if grayscale
    -> gaussian_blur([k, k], [sigma, sigma]) if sigma > 0 (reflect padding)
    -> solarize(0.5)                         if solarize
    -> normalize(mean, std)

(outputs agree with that to 2e-3 on the [0, 1] scale).  Identity jitter factors
(1, 1, 1, 0) are skipped by the fused kernels; on [0, 1] images they only
change rounding.

Backends: ``cuda`` (csrc/cuda/augment.cu), ``triton`` (triton_kernels/augment.py,
wired in when present), ``cpu`` (csrc/cpu/augment.cpp), ``reference``
(per-sample torchvision calls, sslops.reference.augment).

Kernel design
-------------
*CUDA.*  Four launches per call, none of which writes an image-sized
intermediate:

1. ``prep``: per view, the resampling taps of the crop (rows and columns, the
   flip folded into the column table; ATen's bilinear / antialias weights
   from csrc/common/augment.h) and the view's gaussian weights, into a small
   workspace (N x 2 x size x taps floats).
2. ``contrast_mean`` (only views whose jitter has a contrast factor != 1):
   contrast blends with the mean gray value of the image *after the jitter ops
   that precede contrast in that view's order*.  Instead of materialising that
   intermediate image, one wave of persistent blocks walks the (view, row
   band) items, skipping views without contrast, and recomputes each band on the fly
   (resample from the uint8 source, which stays in L2, then the preceding
   point-wise ops) and reduces gray(r, g, b) to one partial sum per
   (view, row band) in global memory; the main kernel adds the partials of its
   view in a fixed order (deterministic, no atomics).  Cost: one extra
   resampling pass for views with contrast, zero extra global traffic beyond
   N x bands floats.
3. ``main``: one block per (view, 32 x 32 output tile).  The block computes
   the pre-blur pixels of its tile plus a halo of k // 2 (reflected at the
   image border by index arithmetic, so the halo of border tiles needs no
   padding) straight from the source -- resample, flip, jitter in order with
   the contrast mean, grayscale -- into shared memory, runs the separable blur
   (rows into a second shared buffer, then columns), solarises, normalises and
   writes bf16/fp16/fp32 (NCHW or channels_last).  Launched twice: views
   without blur first, with no shared memory (so they are not limited by the
   blur's per-block buffers), then views with blur.

*CPU.*  Views in parallel (the V views of an image back to back, so the
source is read from memory once), or rows in parallel when there are fewer
views than threads; a view is resampled into a per-thread fp32 buffer that
stays in L2, and every colour op, the blur passes (symmetric taps) and the
store are vectorised loops over rows, compiled twice (baseline and AVX2/FMA,
picked at run time; ``SSLOPS_CPU_ISA=base`` forces the baseline).  The
contrast mean is a per-row partial sum accumulated in the pass that applies
the preceding ops, summed in row order (deterministic).

CUDA limits: the blur's shared-memory tile needs kernel_size // 2 <= ~46 on
an H100/H200 (227 KB per block); larger kernels raise a clear error.
"""
from __future__ import annotations

import importlib.util
import math
import numbers
from typing import List, Optional, Sequence

import torch
from torch import Tensor

from .. import _backend, _checks, reference
from .params import (
    BRIGHTNESS, CONTRAST, HUE, IMAGENET_MEAN, IMAGENET_STD, RECIPES, SATURATION, AugmentParams, Recipe,
    sample_crops, sample_params,
)

__all__ = [
    "AugmentParams",
    "Recipe",
    "RECIPES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "sample_params",
    "sample_crops",
    "apply",
    "SSLViews",
    "default_kernel_size",
    "BRIGHTNESS",
    "CONTRAST",
    "SATURATION",
    "HUE",
]

OUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_FLOAT_INPUTS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _triton_available() -> bool:
    try:
        return importlib.util.find_spec("sslops.triton_kernels.augment") is not None
    except (ImportError, ValueError):  # pragma: no cover
        return False


_TRITON = _triton_available()
# The dtype of backend choice is the output dtype (any input dtype is read as
# float32); under the Triton interpreter bf16 outputs are refused.
_backend.register_op("augment", compiled=("augment",), triton=_TRITON, dtypes={"triton": OUT_DTYPES})


# ----------------------------------------------------------------------------
# Fake kernel of the compiled op (schema: csrc/sslops.cpp)
# ----------------------------------------------------------------------------
def _empty_views(images: Tensor, n: int, size: int, out_dtype: torch.dtype, channels_last: bool) -> Tensor:
    if channels_last:
        return images.new_empty((n, size, size, 3), dtype=out_dtype).permute(0, 3, 1, 2)
    return images.new_empty((n, 3, size, size), dtype=out_dtype)


if _backend.compiled_available():

    @torch.library.register_fake("sslops::augment")
    def _(images, crop, flip, jitter, brightness, contrast, saturation, hue, order, grayscale, blur_sigma,
          solarize, size, kernel_size, antialias, mean, std, out_dtype, channels_last):
        return _empty_views(images, crop.shape[0], size, out_dtype, channels_last)


# ----------------------------------------------------------------------------
# Triton op (triton_kernels/augment.py), exposed as a torch custom op
# ----------------------------------------------------------------------------
if _TRITON:

    @torch.library.custom_op("sslops::augment_triton", mutates_args=())
    def augment_triton(images: Tensor, crop: Tensor, flip: Tensor, jitter: Tensor, brightness: Tensor,
                       contrast: Tensor, saturation: Tensor, hue: Tensor, order: Tensor, grayscale: Tensor,
                       blur_sigma: Tensor, solarize: Tensor, size: int, kernel_size: int, antialias: bool,
                       mean: List[float], std: List[float], out_dtype: torch.dtype,
                       channels_last: bool) -> Tensor:
        from ..triton_kernels import augment as tk

        return tk.augment_views(images, crop, flip, jitter, brightness, contrast, saturation, hue, order,
                                grayscale, blur_sigma, solarize, size, kernel_size, antialias, tuple(mean),
                                tuple(std), out_dtype, channels_last)

    @augment_triton.register_fake
    def _(images, crop, flip, jitter, brightness, contrast, saturation, hue, order, grayscale, blur_sigma,
          solarize, size, kernel_size, antialias, mean, std, out_dtype, channels_last):
        return _empty_views(images, crop.shape[0], size, out_dtype, channels_last)


# ----------------------------------------------------------------------------
# Argument checks
# ----------------------------------------------------------------------------
def default_kernel_size(size: int) -> int:
    """The odd number nearest to 10% of ``size`` (ties go up), at least 1: 23 at 224, 3 at 32."""
    return max(1, int(math.floor(size / 10 / 2)) * 2 + 1)


def _check_images(images) -> None:
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
    if images.dtype != torch.uint8 and images.dtype not in _FLOAT_INPUTS:
        raise TypeError(f"images must be uint8 (0..255) or floating (0..1), got {images.dtype}")
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must have shape (B, 3, H, W), got {tuple(images.shape)}")
    if images.shape[2] < 1 or images.shape[3] < 1:
        raise ValueError(f"images must have H, W >= 1, got shape {tuple(images.shape)}")


def _check_triple(values, name: str, nonzero: bool = False) -> tuple:
    if isinstance(values, torch.Tensor):
        values = values.tolist()
    if not isinstance(values, (tuple, list)) or len(values) != 3:
        raise ValueError(f"{name} must be a sequence of 3 numbers (one per channel), got {values!r}")
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
            raise ValueError(f"{name} must hold 3 finite numbers, got {values!r}")
        if nonzero and v == 0:
            raise ValueError(f"{name} must be nonzero, got {values!r}")
        out.append(float(v))
    return tuple(out)


def _check_call(images, params, size, kernel_size, antialias, mean, std, out_dtype, channels_last, n_views,
                validate=True):
    """Validates a call; returns the normalised (size, kernel_size, mean, std).

    Structure (types, shapes, dtypes, devices) is always checked, from metadata.
    The values (crops inside the image, factors, float images in [0, 1]) are
    checked only with ``validate`` and outside torch.compile: that reads data back
    to the host (one sync)."""
    _check_images(images)
    if not isinstance(params, AugmentParams):
        raise TypeError(f"params must be an AugmentParams, got {type(params).__name__}")
    size = _checks.integer(size, "size", 1)
    if kernel_size is None:
        kernel_size = default_kernel_size(size)
    kernel_size = _checks.integer(kernel_size, "kernel_size", 1)
    if kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be odd, got {kernel_size}")
    if kernel_size // 2 >= size:
        raise ValueError(
            f"kernel_size // 2 must be smaller than size for reflect padding, got kernel_size={kernel_size}, "
            f"size={size}"
        )
    if not isinstance(antialias, bool):
        raise TypeError(f"antialias must be a bool, got {type(antialias).__name__}")
    if not isinstance(channels_last, bool):
        raise TypeError(f"channels_last must be a bool, got {type(channels_last).__name__}")
    if out_dtype not in OUT_DTYPES:
        raise TypeError(f"out_dtype must be one of {OUT_DTYPES}, got {out_dtype!r}")
    mean = _check_triple(mean, "mean")
    std = _check_triple(std, "std", nonzero=True)
    if not isinstance(validate, bool):
        raise TypeError(f"validate must be a bool, got {type(validate).__name__}")
    params.check_structure(n_views, images.device)
    if not validate or torch.compiler.is_compiling():
        return size, kernel_size, mean, std
    errors = params.value_errors(tuple(images.shape[2:]))
    if images.is_floating_point() and images.numel() > 0:
        lo, hi = torch.aminmax(images.detach())
        lo, hi = float(lo), float(hi)
        if not (lo >= 0.0 and hi <= 1.0):
            errors.append(f"floating images must be in [0, 1] (uint8 images are scaled by 1/255), got [{lo}, {hi}]")
    if errors:
        raise ValueError("; ".join(errors))
    return size, kernel_size, mean, std


# ----------------------------------------------------------------------------
# Dispatch
# ----------------------------------------------------------------------------
def _run(images, params, size, kernel_size, antialias, mean, std, out_dtype, channels_last, backend) -> Tensor:
    """All views of a validated call: params has N = V * B rows, row n cuts image n % B."""
    be = _backend.resolve("augment", backend, images.device, out_dtype)
    images = images.detach()
    if len(params) == 0:
        return _empty_views(images, 0, size, out_dtype, channels_last)
    if be == "reference":
        return reference.augment(images, params, size, kernel_size, antialias, mean, std, out_dtype, channels_last)
    if be == "triton":  # one launch for all N = V * B views, like the compiled op
        return augment_triton(images, *params.tensors(), size, kernel_size, antialias, list(mean), list(std),
                              out_dtype, channels_last)
    return _backend.ops(be).augment(images, *params.tensors(), size, kernel_size, antialias, list(mean), list(std),
                                    out_dtype, channels_last)


def apply(images: Tensor, params: AugmentParams, size: int, *, kernel_size: Optional[int] = None,
          antialias: bool = True, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
          out_dtype: torch.dtype = torch.float32, channels_last: bool = False, backend: str = "auto",
          validate: bool = True) -> Tensor:
    """Augment a batch: one view per image with per-sample parameters.

    Args:
        images: uint8 (B, 3, H, W) in 0..255 (any memory format; FFCV hands
            channels_last) or floating in [0, 1].
        params: an :class:`AugmentParams` of batch size B on the images' device
            (see :func:`sample_params`).
        size: output side; views are (size, size).
        kernel_size: odd gaussian kernel size; default: the odd number nearest
            10% of ``size`` (23 at 224).
        antialias: antialiased bilinear downscaling (torchvision's default).
        mean, std: per-channel normalisation (ImageNet by default).
        out_dtype: float32, float16 or bfloat16.
        channels_last: return channels_last strides.
        backend: "auto" | "cuda" | "triton" | "cpu" | "reference".
        validate: check the parameter values (and that float images are in
            [0, 1]) with one device-to-host sync.  ``False`` for the hot path:
            no sync; invalid values then give wrong views but never out-of-bounds
            memory access (the GPU kernels clamp crops to the image; the cpu
            kernel checks them itself and raises).  Under torch.compile the
            value checks are skipped the same way.

    Returns:
        (B, 3, size, size) views in ``out_dtype``.
    """
    _check_images(images)
    size, kernel_size, mean, std = _check_call(images, params, size, kernel_size, antialias, mean, std, out_dtype,
                                               channels_last, images.shape[0], validate)
    return _run(images, params, size, kernel_size, antialias, mean, std, out_dtype, channels_last, backend)


class SSLViews(torch.nn.Module):
    """Draw a recipe's parameters and produce ``views`` augmented views of a batch.

    >>> make_views = SSLViews("simclr", size=224, views=2)
    >>> x1, x2 = make_views(images)        # images: uint8 (B, 3, H, W)

    All views come from one kernel call that reads each source image once
    (N = views * B parameter rows, row v * B + b cuts image b).  View v uses
    ``sample_params(..., view=v)`` (BYOL's asymmetric blur/solarisation).
    ``forward(images, params=None)`` also takes explicit per-view params (a
    list of AugmentParams); :meth:`sample` draws them.  ``validate=False``
    skips the value checks of drawn or given parameters (no host sync; see
    :func:`apply`).  Under ``torch.compile(fullgraph=True)`` it compiles
    without a ``generator`` (a torch.Generator cannot be traced): parameters
    then come from the global RNG.
    """

    def __init__(self, recipe="simclr", size: int = 224, views: int = 2, *, kernel_size: Optional[int] = None,
                 antialias: bool = True, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                 out_dtype: torch.dtype = torch.float32, channels_last: bool = False, backend: str = "auto",
                 generator: Optional[torch.Generator] = None, validate: bool = True):
        super().__init__()
        if isinstance(recipe, str) and recipe not in RECIPES:
            raise ValueError(f"recipe must be one of {tuple(RECIPES)} or a Recipe, got {recipe!r}")
        if not isinstance(recipe, (str, Recipe)):
            raise TypeError(f"recipe must be a str or a Recipe, got {type(recipe).__name__}")
        self.recipe = recipe
        self.size = _checks.integer(size, "size", 1)
        self.views = _checks.integer(views, "views", 1)
        self.kernel_size = default_kernel_size(self.size) if kernel_size is None else _checks.integer(kernel_size,
                                                                                                  "kernel_size", 1)
        self.antialias = antialias
        self.mean = _check_triple(mean, "mean")
        self.std = _check_triple(std, "std", nonzero=True)
        if out_dtype not in OUT_DTYPES:
            raise TypeError(f"out_dtype must be one of {OUT_DTYPES}, got {out_dtype!r}")
        self.out_dtype = out_dtype
        self.channels_last = channels_last
        if backend not in _backend.BACKENDS:
            raise ValueError(f"backend must be one of {_backend.BACKENDS}, got {backend!r}")
        self.backend = backend
        self.generator = generator
        if not isinstance(validate, bool):
            raise TypeError(f"validate must be a bool, got {type(validate).__name__}")
        self.validate = validate

    def sample(self, images: Tensor) -> List[AugmentParams]:
        """Parameters of every view for this batch, drawn on the images' device."""
        _check_images(images)
        b, hw = images.shape[0], tuple(images.shape[2:])
        return [sample_params(b, hw, recipe=self.recipe, view=v, generator=self.generator, device=images.device)
                for v in range(self.views)]

    def forward(self, images: Tensor, params: Optional[Sequence[AugmentParams]] = None) -> List[Tensor]:
        _check_images(images)
        if params is None:
            params = self.sample(images)
        if isinstance(params, AugmentParams) or len(params) != self.views:
            raise ValueError(f"params must be a list of {self.views} AugmentParams (one per view)")
        batch = images.shape[0]
        for i, p in enumerate(params):
            if not isinstance(p, AugmentParams):
                raise TypeError(f"params[{i}] must be an AugmentParams, got {type(p).__name__}")
            p.check_structure(batch, images.device, name=f"params[{i}]")
        stacked = AugmentParams.cat(list(params))
        size, k, mean, std = _check_call(images, stacked, self.size, self.kernel_size, self.antialias, self.mean,
                                         self.std, self.out_dtype, self.channels_last, len(stacked), self.validate)
        out = _run(images, stacked, size, k, self.antialias, mean, std, self.out_dtype, self.channels_last,
                   self.backend)
        return list(out.split(batch)) if batch > 0 else [out] * self.views

    def extra_repr(self) -> str:
        return (f"recipe={self.recipe!r}, size={self.size}, views={self.views}, kernel_size={self.kernel_size}, "
                f"out_dtype={self.out_dtype}, backend={self.backend!r}")

"""Per-sample augmentation parameters and the SimCLR / BYOL recipes.

:class:`AugmentParams` holds one row per view; :func:`sample_params` draws a
whole batch of them on the target device with a handful of tensor ops (no
per-sample Python loop), reproducibly from a ``torch.Generator``.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from .. import _checks

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Jitter op codes of AugmentParams.order.
BRIGHTNESS, CONTRAST, SATURATION, HUE = 0, 1, 2, 3

_FIELDS = (
    # name, dtype, trailing shape
    ("crop", torch.int64, (4,)),
    ("flip", torch.bool, ()),
    ("jitter", torch.bool, ()),
    ("brightness", torch.float32, ()),
    ("contrast", torch.float32, ()),
    ("saturation", torch.float32, ()),
    ("hue", torch.float32, ()),
    ("order", torch.int64, (4,)),
    ("grayscale", torch.bool, ()),
    ("blur_sigma", torch.float32, ()),
    ("solarize", torch.bool, ()),
)


@dataclasses.dataclass
class AugmentParams:
    """Per-view augmentation parameters; every field has length B.

    Fields (applied in this order by :func:`sslops.augment.apply`):
        crop:       int64 (B, 4): (top, left, height, width) of the crop on the source.
        flip:       bool (B,): horizontal flip.
        jitter:     bool (B,): apply the four colour-jitter ops below.
        brightness, contrast, saturation: float32 (B,) factors, 1 = identity, >= 0.
        hue:        float32 (B,) in [-0.5, 0.5], 0 = identity.
        order:      int64 (B, 4): a permutation of 0..3 per view, the jitter order
                    (0 brightness, 1 contrast, 2 saturation, 3 hue).
        grayscale:  bool (B,): convert to gray (3 equal channels).
        blur_sigma: float32 (B,): gaussian blur sigma, 0 = no blur.
        solarize:   bool (B,): solarize with threshold 0.5.
    """

    crop: Tensor
    flip: Tensor
    jitter: Tensor
    brightness: Tensor
    contrast: Tensor
    saturation: Tensor
    hue: Tensor
    order: Tensor
    grayscale: Tensor
    blur_sigma: Tensor
    solarize: Tensor

    # -- container helpers -------------------------------------------------
    def tensors(self) -> Tuple[Tensor, ...]:
        """The fields in declaration order (the order the kernels take them)."""
        return tuple(getattr(self, name) for name, _, _ in _FIELDS)

    def __len__(self) -> int:
        return int(self.crop.shape[0])

    @property
    def batch_size(self) -> int:
        return len(self)

    @property
    def device(self) -> torch.device:
        return self.crop.device

    def to(self, device) -> "AugmentParams":
        return AugmentParams(*(t.to(device) for t in self.tensors()))

    def __getitem__(self, index) -> "AugmentParams":
        """Rows ``index`` of every field (an int keeps a batch of one)."""
        if isinstance(index, int):
            n = len(self)
            if not -n <= index < n:  # the slice below would give an empty batch silently
                raise IndexError(f"index {index} is out of range for AugmentParams of batch size {n}")
            index = slice(index, index + 1 if index != -1 else None)
        return AugmentParams(*(t[index] for t in self.tensors()))

    @staticmethod
    def cat(params: Sequence["AugmentParams"]) -> "AugmentParams":
        """Concatenate along the batch dimension."""
        if not params:
            raise ValueError("params must hold at least one AugmentParams")
        return AugmentParams(*(torch.cat(ts) for ts in zip(*(p.tensors() for p in params))))

    @staticmethod
    def identity(batch_size: int, image_size, device=None) -> "AugmentParams":
        """Parameters that only resize the whole image (no flip, jitter, blur...)."""
        h, w = _image_size(image_size)
        b = _batch_size(batch_size)
        dev = torch.device(device) if device is not None else torch.device("cpu")
        z = torch.zeros(b, dtype=torch.bool, device=dev)
        one = torch.ones(b, dtype=torch.float32, device=dev)
        return AugmentParams(
            crop=torch.tensor([0, 0, h, w], dtype=torch.int64, device=dev).repeat(b, 1),
            flip=z.clone(), jitter=z.clone(), brightness=one.clone(), contrast=one.clone(),
            saturation=one.clone(), hue=torch.zeros(b, device=dev),
            order=torch.arange(4, device=dev).repeat(b, 1), grayscale=z.clone(),
            blur_sigma=torch.zeros(b, device=dev), solarize=z.clone(),
        )

    # -- validation ----------------------------------------------------------
    def check_structure(self, batch_size: int, device: torch.device, name: str = "params") -> None:
        """Types, dtypes, shapes and device of every field (no data access)."""
        for field, dtype, tail in _FIELDS:
            t = getattr(self, field)
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name}.{field} must be a torch.Tensor, got {type(t).__name__}")
            if t.dtype != dtype:
                raise TypeError(f"{name}.{field} must be {dtype}, got {t.dtype}")
            want = (batch_size,) + tail
            if tuple(t.shape) != want:
                raise ValueError(
                    f"{name}.{field} must have shape {want} (the batch size is {batch_size}), got {tuple(t.shape)}"
                )
            if t.device != device:
                raise ValueError(f"{name}.{field} is on {t.device} but the images are on {device}")

    def value_errors(self, image_size, name: str = "params") -> list:
        """Checks on the values; returns a list of error messages (empty: valid).

        All conditions are reduced on the device and read back with one
        transfer; only when one fails are the offending rows looked up."""
        h, w = _image_size(image_size)
        if len(self) == 0:
            return []
        top, left, ch, cw = self.crop.unbind(1)
        finite_nonneg = lambda t: (t >= 0) & torch.isfinite(t)
        checks = [
            # ch <= h - top, not top + ch <= h: the sum wraps in int64 for a huge top
            ("crop", (top >= 0) & (left >= 0) & (ch >= 1) & (cw >= 1) & (ch <= h - top) & (cw <= w - left),
             f"rows must be (top, left, height, width) with height, width >= 1 inside the {h}x{w} image"),
            ("order", (torch.sort(self.order, dim=1).values == torch.arange(4, device=self.order.device)).all(1),
             "rows must be permutations of 0..3"),
            ("brightness", finite_nonneg(self.brightness), "factors must be finite and >= 0"),
            ("contrast", finite_nonneg(self.contrast), "factors must be finite and >= 0"),
            ("saturation", finite_nonneg(self.saturation), "factors must be finite and >= 0"),
            ("hue", (self.hue >= -0.5) & (self.hue <= 0.5), "must be in [-0.5, 0.5]"),
            ("blur_sigma", finite_nonneg(self.blur_sigma), "must be finite and >= 0 (0 = no blur)"),
        ]
        ok = torch.stack([mask.all() for _, mask, _ in checks]).tolist()  # one device->host transfer
        errors = []
        for good, (field, mask, msg) in zip(ok, checks):
            if good:
                continue
            values = getattr(self, field)
            bad = (~mask).nonzero().flatten()[:3].tolist()
            shown = ", ".join(f"row {i}: {values[i].tolist()}" for i in bad)
            errors.append(f"{name}.{field} {msg}; got {shown}")
        return errors


# ----------------------------------------------------------------------------
# Recipes
# ----------------------------------------------------------------------------
def _check_pair(value, name: str, lo: float, hi: float, lo_open: bool = False) -> Tuple[float, float]:
    """A (min, max) range with lo <= (or <) min <= max <= hi, both finite."""
    try:
        a, b = (float(v) for v in value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a pair of numbers (min, max), got {value!r}") from None
    ok = (lo < a if lo_open else lo <= a) and a <= b <= hi and math.isfinite(b)
    if not ok:
        bound = f"{lo} {'<' if lo_open else '<='} min <= max <= {hi}"
        raise ValueError(f"{name} must satisfy {bound}, got {value!r}")
    return a, b


@dataclasses.dataclass(frozen=True)
class Recipe:
    """Probabilities and ranges of a recipe; per-view entries are (view 0, view 1)."""

    scale: Tuple[float, float] = (0.08, 1.0)
    ratio: Tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
    flip_p: float = 0.5
    jitter_p: float = 0.8
    jitter: Tuple[float, float, float, float] = (0.8, 0.8, 0.8, 0.2)  # brightness, contrast, saturation, hue
    grayscale_p: float = 0.2
    blur_p: Tuple[float, float] = (0.5, 0.5)
    sigma: Tuple[float, float] = (0.1, 2.0)
    solarize_p: Tuple[float, float] = (0.0, 0.0)

    def __post_init__(self):
        """Check every field when the recipe is made, not when it is first sampled."""
        def pair(name, lo, hi, lo_open=False):
            _check_pair(getattr(self, name), f"Recipe.{name}", lo, hi, lo_open)

        def prob(name, value):
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= value <= 1.0:
                raise ValueError(f"Recipe.{name} must be a probability in [0, 1], got {value!r}")

        pair("scale", 0.0, math.inf, lo_open=True)
        pair("ratio", 0.0, math.inf, lo_open=True)  # log-uniform: ratios > 0
        pair("sigma", 0.0, math.inf, lo_open=True)
        prob("flip_p", self.flip_p)
        prob("jitter_p", self.jitter_p)
        prob("grayscale_p", self.grayscale_p)
        for name in ("blur_p", "solarize_p"):
            value = getattr(self, name)
            if not isinstance(value, (tuple, list)) or len(value) != 2:
                raise TypeError(f"Recipe.{name} must be a pair (view 0, view 1), got {value!r}")
            for v in value:
                prob(name, v)
        jitter = self.jitter
        if not isinstance(jitter, (tuple, list)) or len(jitter) != 4 or any(
                isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v) or v < 0
                for v in jitter):
            raise ValueError("Recipe.jitter must be 4 finite strengths >= 0 (brightness, contrast, saturation, "
                             f"hue), got {jitter!r}")
        if jitter[3] > 0.5:
            raise ValueError(f"Recipe.jitter hue strength must be <= 0.5 (hue factors lie in [-0.5, 0.5]), "
                             f"got {jitter[3]!r}")


RECIPES = {
    # SimCLR (Chen et al. 2020), colour-distortion strength s = 1.
    "simclr": Recipe(),
    # BYOL (Grill et al. 2020): asymmetric blur and solarisation between the views.
    "byol": Recipe(jitter=(0.4, 0.4, 0.2, 0.1), blur_p=(1.0, 0.1), solarize_p=(0.0, 0.2)),
}


def _batch_size(batch_size) -> int:
    return _checks.integer(batch_size, "batch_size", 0)


def _image_size(image_size) -> Tuple[int, int]:
    if isinstance(image_size, numbers.Integral) and not isinstance(image_size, bool):
        h = w = int(image_size)
    elif isinstance(image_size, (tuple, list, torch.Size)) and len(image_size) == 2 and all(
        isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in image_size
    ):
        h, w = int(image_size[0]), int(image_size[1])
    else:
        raise TypeError(f"image_size must be an int or a (height, width) pair of ints, got {image_size!r}")
    if h < 1 or w < 1:
        raise ValueError(f"image_size must be >= 1, got {(h, w)}")
    return h, w


def _uniform(shape, lo: float, hi: float, generator, device, dtype=torch.float32) -> Tensor:
    return torch.rand(shape, generator=generator, device=device, dtype=dtype) * (hi - lo) + lo


def _jitter_range(strength: float, center: float) -> Tuple[float, float]:
    # torchvision ColorJitter._check_input: [max(0, 1 - s), 1 + s] (hue: [-s, s]).
    return (max(center - strength, 0.0), center + strength) if center == 1.0 else (-strength, strength)


def sample_crops(batch_size: int, image_size, scale=(0.08, 1.0), ratio=(3.0 / 4.0, 4.0 / 3.0), generator=None,
                 device=None) -> Tensor:
    """RandomResizedCrop.get_params for a batch: (B, 4) int64 (top, left, height, width).

    Ten tries per sample at once; the first try that fits wins, else
    torchvision's fallback (a centre crop clipped to the ratio range)."""
    b = _batch_size(batch_size)
    h, w = _image_size(image_size)
    # unchecked, a reversed, negative or NaN range gave crops silently and a 1-tuple an IndexError
    scale = _check_pair(scale, "scale", 0.0, math.inf, lo_open=True)
    ratio = _check_pair(ratio, "ratio", 0.0, math.inf, lo_open=True)
    tries = 10
    area = float(h * w)
    log_r = (math.log(ratio[0]), math.log(ratio[1]))
    target = area * _uniform((b, tries), scale[0], scale[1], generator, device, torch.float64)
    aspect = torch.exp(_uniform((b, tries), log_r[0], log_r[1], generator, device, torch.float64))
    cw = torch.round(torch.sqrt(target * aspect)).long()
    ch = torch.round(torch.sqrt(target / aspect)).long()
    fits = (cw > 0) & (cw <= w) & (ch > 0) & (ch <= h)
    first = fits.long().argmax(1, keepdim=True)  # the first fitting try
    found = fits.any(1)
    cw = cw.gather(1, first).squeeze(1)
    ch = ch.gather(1, first).squeeze(1)
    u_top = torch.rand(b, generator=generator, device=device, dtype=torch.float64)
    u_left = torch.rand(b, generator=generator, device=device, dtype=torch.float64)
    # torch.randint(0, n + 1) as a uniform draw: floor(u * (n + 1)).
    top = torch.floor(u_top * (h - ch + 1)).long().clamp_(max=h - ch)
    left = torch.floor(u_left * (w - cw + 1)).long().clamp_(max=w - cw)
    # Fallback: torchvision's central crop.
    in_ratio = w / h
    if in_ratio < min(ratio):
        fw, fh = w, int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        fh, fw = h, int(round(h * max(ratio)))
    else:
        fw, fh = w, h
    ch = torch.where(found, ch, torch.full_like(ch, fh))
    cw = torch.where(found, cw, torch.full_like(cw, fw))
    top = torch.where(found, top, torch.full_like(top, (h - fh) // 2))
    left = torch.where(found, left, torch.full_like(left, (w - fw) // 2))
    return torch.stack([top, left, ch, cw], dim=1)


def sample_params(batch_size: int, image_size: Union[int, Tuple[int, int]], *, recipe: str = "simclr", view: int = 0,
                  generator: Optional[torch.Generator] = None, device=None) -> AugmentParams:
    """Draw a recipe's parameters for a batch, on ``device``, in one go.

    Args:
        batch_size: B.
        image_size: (H, W) of the source images (or an int for square ones).
        recipe: "simclr" or "byol" (see ``RECIPES``), or a :class:`Recipe`.
        view: which view of an asymmetric recipe (BYOL: view 0 always blurs and
            never solarises; view 1 blurs with p 0.1 and solarises with p 0.2);
            views >= 2 alternate.
        generator: a ``torch.Generator`` on ``device`` for reproducible draws
            (default: the device's global generator).
        device: where the parameters live (default: the generator's device, else CPU).
    """
    b = _batch_size(batch_size)
    h, w = _image_size(image_size)
    if isinstance(recipe, str):
        if recipe not in RECIPES:
            raise ValueError(f"recipe must be one of {tuple(RECIPES)} or a Recipe, got {recipe!r}")
        rec = RECIPES[recipe]
    elif isinstance(recipe, Recipe):
        rec = recipe
    else:
        raise TypeError(f"recipe must be a str or a Recipe, got {type(recipe).__name__}")
    if isinstance(view, bool) or not isinstance(view, numbers.Integral) or view < 0:
        raise ValueError(f"view must be an int >= 0, got {view!r}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    if device is None:
        device = generator.device if generator is not None else torch.device("cpu")
    device = torch.device(device)
    if generator is not None and generator.device.type != device.type:
        raise ValueError(f"generator is on {generator.device} but device is {device}")
    v = view % 2
    g = generator

    def rand(*shape):
        return torch.rand(shape, generator=g, device=device)

    crop = sample_crops(b, (h, w), rec.scale, rec.ratio, g, device)
    flip = rand(b) < rec.flip_p
    jitter = rand(b) < rec.jitter_p
    bs, cs, ss, hs = rec.jitter
    brightness = _uniform(b, *_jitter_range(bs, 1.0), g, device)
    contrast = _uniform(b, *_jitter_range(cs, 1.0), g, device)
    saturation = _uniform(b, *_jitter_range(ss, 1.0), g, device)
    hue = _uniform(b, *_jitter_range(hs, 0.0), g, device)
    order = rand(b, 4).argsort(dim=1)  # a uniform random permutation per row
    grayscale = rand(b) < rec.grayscale_p
    blur = rand(b) < rec.blur_p[v]
    sigma = torch.where(blur, _uniform(b, rec.sigma[0], rec.sigma[1], g, device), torch.zeros((), device=device))
    solarize = rand(b) < rec.solarize_p[v]
    return AugmentParams(crop=crop, flip=flip, jitter=jitter, brightness=brightness, contrast=contrast,
                         saturation=saturation, hue=hue, order=order, grayscale=grayscale, blur_sigma=sigma,
                         solarize=solarize)

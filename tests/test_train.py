"""sslops-train on the CPU, tiny budgets: end to end, exact resume, LR schedule, bad inputs, views."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("ffcv")
pytest.importorskip("mlxtend")

import sslops  # noqa: E402
from sslops import SSLViews  # noqa: E402
from sslops.data import ViewLoader, embedded_dataset, split_indices, write_beton  # noqa: E402
from sslops.train import cli, loop, methods, optim  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def beton(tmp_path_factory):
    images, labels = embedded_dataset()
    pick = np.random.default_rng(0).permutation(len(images))[:320]  # mnist_5k is sorted by class: mix them
    assert len(set(labels[pick].tolist())) == 10
    path = str(tmp_path_factory.mktemp("data") / "small.beton")
    return write_beton(path, images[pick], labels[pick])


@pytest.fixture(autouse=True)
def _threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _args(beton, out, *extra):
    return ["--data", beton, "--out", str(out), "--epochs", "2", "--batch-size", "64", "--threads", "1",
            "--num-workers", "1", "--no-progress", "--seed", "3", *extra]


def test_end_to_end_outputs(beton, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    dead = subprocess.Popen(["true"])
    dead.wait()
    (out / f"checkpoint.pt.tmp{dead.pid}").write_bytes(b"torn")  # a writer killed mid-save: removed at start
    assert cli.main(_args(beton, out)) == 0
    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    epochs = [r for r in records if not r.get("final")]
    assert [r["epoch"] for r in epochs] == [0, 1]
    for r in epochs:
        assert {"epoch", "loss", "lr", "images_per_s"} <= set(r) and math.isfinite(r["loss"]) and r["images_per_s"] > 0
    final = records[-1]
    assert final["final"] and 0 <= final["knn_top1"] <= 1 and 0 <= final["knn_top1_init"] <= 1
    ckpt = torch.load(out / "checkpoint.pt", weights_only=False)
    assert {"model", "optimizer", "rng", "epoch", "config"} <= set(ckpt) and ckpt["epoch"] == 1
    assert ckpt["config"]["flip_p"] == 0.5 and ckpt["config"]["crop_min"] == 0.25  # the recipe is on record
    encoder = torch.load(out / "encoder.pt", weights_only=True)
    backbone = methods.make_backbone("tiny")
    backbone.load_state_dict(encoder)  # strict: exactly the backbone's keys
    assert (out / "loss.png").stat().st_size > 0
    assert not [f for f in os.listdir(out) if ".tmp" in f]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])  # auto is one of them, by the CPU: test both
def test_resume_is_bitwise_equal(beton, tmp_path, monkeypatch, precision):
    def args(out, *extra):
        return _args(beton, out, "--precision", precision, *extra)

    full = tmp_path / "full"
    assert cli.main(args(full)) == 0

    part = tmp_path / "part"
    real_save = loop._atomic_save

    def save_then_die(obj, path):  # killed right after the first epoch's checkpoint
        real_save(obj, path)
        if path.endswith("checkpoint.pt"):
            raise KeyboardInterrupt

    monkeypatch.setattr(loop, "_atomic_save", save_then_die)
    assert cli.main(args(part)) == 130
    monkeypatch.setattr(loop, "_atomic_save", real_save)
    assert not (part / "encoder.pt").exists()
    assert cli.main(args(part, "--resume")) == 0

    a = torch.load(full / "encoder.pt", weights_only=True)
    b = torch.load(part / "encoder.pt", weights_only=True)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    recs = [json.loads(line) for line in open(part / "metrics.jsonl")]
    assert [r["epoch"] for r in recs if not r.get("final")] == [0, 1]  # every epoch logged once
    ref = [json.loads(line) for line in open(full / "metrics.jsonl")]
    assert [r["loss"] for r in recs if not r.get("final")] == [r["loss"] for r in ref if not r.get("final")]


def test_lr_schedule_formula():
    peak, total, warm = optim.scaled_lr(0.3, 512), 100, 10
    assert peak == pytest.approx(0.6)
    for s in range(warm):
        assert optim.lr_at(s, total, warm, peak) == pytest.approx(peak * (s + 1) / warm)
    for s in range(warm, total):
        want = 0.5 * peak * (1 + math.cos(math.pi * (s - warm) / (total - warm)))
        assert optim.lr_at(s, total, warm, peak) == pytest.approx(want)
    assert optim.lr_at(warm, total, warm, peak) == pytest.approx(peak)
    assert optim.lr_at(55, total, warm, peak) == pytest.approx(peak / 2)
    assert optim.lr_at(0, 5, 0, 1.0) == pytest.approx(1.0)  # no warmup


def test_no_decay_groups_hold_bias_and_norm():
    model = methods.SimCLR("tiny")
    decay, no_decay = optim.param_groups(model, 1e-4)
    norm_ids = {id(p) for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._NormBase)
                for p in m.parameters(recurse=False)}
    assert norm_ids and norm_ids <= {id(p) for p in no_decay["params"]}
    assert all(p.ndim >= 2 for p in decay["params"]) and no_decay["weight_decay"] == 0 and not no_decay["lars"]
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


# values that used to be accepted: a negative --clip-grad flipped every gradient, a negative or nan
# --weight-decay went into the optimizer, --warmup-epochs nan failed with "cannot convert float NaN to
# integer", --temperature 0 failed only at the first step, --lr inf trained on NaN, --threads -1 was a
# RuntimeError traceback, a negative --knn-bank dropped bank images silently
BAD_VALUES = {"clip_grad": ["--clip-grad", "-1"], "weight_decay": ["--weight-decay", "-0.1"],
              "warmup_nan": ["--warmup-epochs", "nan"], "temperature": ["--temperature", "0"],
              "lr_inf": ["--lr", "inf"], "threads": ["--threads", "-1"], "knn_bank": ["--knn-bank", "-5"],
              "flip_nan": ["--flip-p", "nan"], "flip_high": ["--flip-p", "1.5"]}


@pytest.mark.parametrize("case", ["missing", "out_is_file", "arch", "method", "resume_nothing", "not_empty",
                                  "resume_other_arch", "resume_other_method", "resume_corrupt", "precision",
                                  "clip_grad", "weight_decay", "warmup_nan", "temperature", "lr_inf", "threads",
                                  "knn_bank", "flip_nan", "flip_high"])
def test_bad_input_one_line(beton, tmp_path, capsys, case):
    out = tmp_path / "out"
    args = _args(beton, out)
    if case == "missing":
        args[1] = str(tmp_path / "nope.beton")
    elif case == "out_is_file":
        out.write_text("keep me")
    elif case == "arch":
        args += ["--arch", "resnet7"]
    elif case == "method":
        args += ["--method", "byol2"]
    elif case == "resume_nothing":
        args += ["--resume"]
    elif case == "not_empty":
        out.mkdir()
        (out / "checkpoint.pt").write_bytes(b"precious")
    elif case in ("resume_other_arch", "resume_other_method"):
        out.mkdir()
        config = {"method": "simclr", "arch": "tiny", "batch_size": 64, "seed": 3, "size": 32, "world_size": 1}
        config["arch" if case == "resume_other_arch" else "method"] = "resnet18" if case == "resume_other_arch" \
            else "mae"
        torch.save({"config": config}, out / "checkpoint.pt")
        args += ["--resume"]
    elif case == "resume_corrupt":
        out.mkdir()
        (out / "checkpoint.pt").write_bytes(os.urandom(300))
        args += ["--resume"]
    elif case == "precision":
        args += ["--precision", "fp16"]  # needs a GPU
    elif case in BAD_VALUES:
        args += BAD_VALUES[case]
    before = {f: (out / f).read_bytes() for f in os.listdir(out)} if out.is_dir() else None
    assert cli.main(args) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("sslops-train: error:"), err
    if case == "out_is_file":
        assert out.read_text() == "keep me"
    if before is not None:  # nothing already in --out is lost
        assert {f: (out / f).read_bytes() for f in os.listdir(out) if f in before} == before
    if case.startswith("resume_other"):
        assert ("arch" if case == "resume_other_arch" else "method") in err[0]
    if case in BAD_VALUES:  # refused before any work, naming the option
        assert BAD_VALUES[case][0] in err[0], err
        assert not out.exists()


@pytest.mark.parametrize("data, flip, expected", [(False, None, 0.0), (True, None, 0.5), (False, "0.3", 0.3),
                                                   (True, "0", 0.0)])
def test_flip_default_depends_on_the_data(beton, tmp_path, data, flip, expected):
    """Mirrored digits are other symbols: no flips on the embedded default unless asked; SimCLR's 0.5 with --data."""
    args = ["--out", str(tmp_path / "out")] + (["--data", str(beton)] if data else []) + \
        (["--flip-p", flip] if flip is not None else [])
    cfg = cli.build_parser().parse_args(args)
    cli._check(cfg)
    assert cfg.flip_p == expected


@pytest.mark.parametrize("device, native, expected", [("cpu", True, "bf16"), ("cpu", False, "fp32"),
                                                     ("cpu", None, None), ("cuda", False, "bf16")])
def test_precision_auto(tmp_path, monkeypatch, device, native, expected):
    """auto: bf16 autocast on a GPU and on a CPU with native bf16 instructions, fp32 on other CPUs."""
    if native is None:  # this machine: the private torch capability probe against the kernel's cpu flags
        flags = set()
        if os.path.exists("/proc/cpuinfo"):
            flags = {f for line in open("/proc/cpuinfo") if line.startswith("flags") for f in line.split()}
        if not flags:
            pytest.skip("no /proc/cpuinfo flags to compare with")
        expected = "bf16" if flags & {"avx512_bf16", "amx_bf16"} else "fp32"
    else:
        monkeypatch.setattr(cli, "cpu_has_native_bf16", lambda: native)
    if device == "cuda":
        monkeypatch.setattr(cli, "check_device", lambda device, error=ValueError: None)
    cfg = cli.build_parser().parse_args(["--out", str(tmp_path / "out"), "--device", device])
    cli._check(cfg)
    assert cfg.precision == expected


def test_simclr_loss_is_fp32_under_autocast():
    torch.manual_seed(0)
    model = methods.make_method("simclr", "tiny")
    views = [torch.randn(8, 3, 32, 32) for _ in range(2)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(views)
        z = model.projector(model.backbone(torch.cat(views)))
    assert z.dtype == torch.bfloat16 and loss.dtype == torch.float32
    want = sslops.nt_xent(*z.float().chunk(2), model.temperature, backend="reference")
    torch.testing.assert_close(loss, want)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)


def test_recipe_takes_crop_min_and_flip_p(beton, tmp_path, monkeypatch):
    seen = []

    class Stop(Exception):
        pass

    def views(recipe, **kwargs):
        seen.append(recipe)
        raise Stop

    monkeypatch.setattr(loop, "SSLViews", views)
    with pytest.raises(Stop):
        cli.main(_args(beton, tmp_path / "out", "--flip-p", "0.125", "--crop-min", "0.5"))
    assert seen[0].flip_p == 0.125 and seen[0].scale == (0.5, 1.0)


def test_corrupt_beton_subprocess(tmp_path):
    bad = tmp_path / "bad.beton"
    bad.write_bytes(os.urandom(4096))
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-m", "sslops.train", "--data", str(bad), "--out", str(tmp_path / "o")],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "bad.beton" in lines[0] and "Traceback" not in r.stderr, r.stderr


def test_views_differ_and_reproduce(beton):
    train_idx, val_idx = split_indices(320)
    assert not set(train_idx) & set(val_idx) and len(train_idx) + len(val_idx) == 320

    def first_batch(seed):
        loader = ViewLoader(beton, 32, SSLViews("simclr", size=32, views=2), num_workers=1, seed=seed,
                            indices=train_idx)
        _, (images, (v1, v2), labels) = next(iter(loader.epoch(0)))
        return images.clone(), v1, v2, labels.clone()

    im, a1, a2, lab = first_batch(5)
    assert im.dtype == torch.uint8 and im.shape == (32, 3, 32, 32) and a1.shape == (32, 3, 32, 32)
    assert not torch.allclose(a1, a2)  # two views of each image differ
    im_b, b1, b2, lab_b = first_batch(5)
    assert torch.equal(im, im_b) and torch.equal(lab, lab_b) and torch.equal(a1, b1) and torch.equal(a2, b2)
    _, c1, _, _ = first_batch(6)
    assert not torch.equal(a1, c1)


def _cli(*args):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return [sys.executable, "-m", "sslops.train", *args], env


def test_sigkill_mid_epoch_then_resume_is_bitwise_equal(beton, tmp_path):
    """A real SIGKILL of the training process in the middle of an epoch, then --resume."""
    import signal
    import time

    args = _args(beton, tmp_path / "x")[4:]  # drop --data/--out: set per run below
    args[args.index("--epochs") + 1] = "3"
    full, part = tmp_path / "full", tmp_path / "part"
    cmd, env = _cli("--data", beton, "--out", str(full), *args)
    subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=600)

    cmd, env = _cli("--data", beton, "--out", str(part), *args)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt, t0 = part / "checkpoint.pt", time.time()
    while not ckpt.exists():  # the first epoch is checkpointed: now kill it inside the second
        assert proc.poll() is None and time.time() - t0 < 300, "training ended before its first checkpoint"
        time.sleep(0.05)
    epoch_s = time.time() - t0
    time.sleep(min(0.3, epoch_s / 4))
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (part / "encoder.pt").exists()
    assert torch.load(ckpt, weights_only=False)["epoch"] in (0, 1)  # never a torn file

    cmd, env = _cli("--data", beton, "--out", str(part), *args, "--resume")
    subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=600)
    a = torch.load(full / "encoder.pt", weights_only=True)
    b = torch.load(part / "encoder.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    recs = [json.loads(line) for line in open(part / "metrics.jsonl")]
    assert [r["epoch"] for r in recs if not r.get("final")] == [0, 1, 2]
    assert sum(1 for r in recs if r.get("final")) == 1
    assert not [f for f in os.listdir(part) if ".tmp" in f]


def test_mae_end_to_end(beton, tmp_path):
    out = tmp_path / "mae"
    args = _args(beton, out, "--method", "mae")
    args[args.index("--epochs") + 1] = "1"
    assert cli.main(args) == 0
    recs = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["epoch"] for r in recs if not r.get("final")] == [0] and math.isfinite(recs[0]["loss"])
    assert 0 <= recs[-1]["knn_top1"] <= 1 and recs[-1]["final"]
    assert torch.load(out / "checkpoint.pt", weights_only=False)["config"]["optimizer"] == "adamw"
    methods.make_backbone("vit-micro").load_state_dict(torch.load(out / "encoder.pt", weights_only=True))
    assert (out / "reconstructions.png").stat().st_size > 0 and (out / "loss.png").stat().st_size > 0


def test_mae_needs_a_vit(beton, tmp_path, capsys):
    assert cli.main(_args(beton, tmp_path / "o", "--method", "mae", "--arch", "tiny")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "vit-micro" in err[0]


def test_loader_keeps_torch_threads(beton):
    """ffcv sets torch's threads to num_workers in Loader() and iter(): the trainer's setting must survive."""
    torch.set_num_threads(2)
    loader = ViewLoader(beton, 32, SSLViews("simclr", size=32, views=2), num_workers=1, seed=0)
    assert torch.get_num_threads() == 2
    next(iter(loader.epoch(0)))
    assert torch.get_num_threads() == 2


def test_stale_tmp_files_of_dead_writers_are_removed(tmp_path):
    """A writer killed between torch.save and os.replace leaves <name>.tmp<pid>: the next run removes it."""
    from sslops.train import loop

    dead = subprocess.Popen(["true"])
    dead.wait()
    names = [f"checkpoint.pt.tmp{dead.pid}", f"metrics.jsonl.tmp{dead.pid}", f"encoder.pt.tmp{dead.pid}",
             f"checkpoint.pt.tmp{os.getpid()}",  # a live writer: kept
             f"notes.txt.tmp{dead.pid}", "checkpoint.pt.tmpx", "checkpoint.pt"]  # not ours / not a pid: kept
    for name in names:
        (tmp_path / name).write_text("x")
    loop._remove_stale_tmp(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == sorted(names[3:])

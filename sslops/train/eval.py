"""``sslops-eval knn|linear``: evaluate a frozen encoder (``encoder.pt`` of sslops-train) on a .beton.

knn: similarity-weighted kNN top-1 (``sslops.train.knn``, k = 20, t = 0.07) of
the held-out images against the training images.

linear: a linear probe.  The backbone is frozen (``eval()`` mode, so BatchNorm
uses its running statistics; ``requires_grad`` off); its features are
extracted once under ``no_grad``, standardised with the training split's mean
and standard deviation, and an ``nn.Linear`` is trained on the cached features
(SGD, momentum 0.9, cosine learning-rate decay, ``--epochs``).  The backbone is
checked to be bit-for-bit unchanged afterwards.

Split: with ``--val-data`` the training images are all of ``--data`` and the
held-out ones all of ``--val-data``; without it, the fixed split of
``sslops.data.split_indices`` (the one sslops-train's kNN monitor uses: 20 %,
at most 1,000 images held out).  Prints one JSON line.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

MODES = ("knn", "linear")


class EvalError(ValueError):
    """Bad input found by sslops-eval (reported as one line by the CLI)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage wall
        self.exit(2, f"sslops-eval: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    from . import methods

    p = _Parser(prog="sslops-eval", description="kNN or linear-probe top-1 of a frozen encoder on a .beton.")
    p.add_argument("mode", metavar="MODE", help="knn or linear")
    p.add_argument("--checkpoint", required=True, help="encoder.pt written by sslops-train (or its checkpoint.pt)")
    p.add_argument("--data", required=True, help=".beton with fields image and label")
    p.add_argument("--val-data", default=None, help="held-out .beton (default: a fixed split of --data)")
    p.add_argument("--arch", default="tiny", help=f"one of {methods.ARCHS}")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    p.add_argument("--epochs", type=int, default=100, help="linear: epochs over the cached features")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--size", type=int, default=None, help="decode each image's central square resized to this "
                   "size (needed when the .beton's images have mixed sizes, e.g. 224 for ImageNet)")
    p.add_argument("--lr", type=float, default=0.1, help="linear: peak SGD learning rate")
    p.add_argument("--weight-decay", type=float, default=0.0, help="linear")
    p.add_argument("--k", type=int, default=20, help="knn: neighbours")
    p.add_argument("--temperature", type=float, default=0.07, help="knn: vote temperature")
    p.add_argument("--num-workers", type=int, default=2, help="ffcv decoding threads (explicit)")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave as is)")
    p.add_argument("--seed", type=int, default=0, help="linear: shuffling")
    return p


def _check(cfg) -> None:
    from . import methods

    if cfg.mode not in MODES:
        raise EvalError(f"MODE must be one of {MODES}, got {cfg.mode!r}")
    if cfg.arch not in methods.ARCHS:
        raise EvalError(f"--arch must be one of {methods.ARCHS}, got {cfg.arch!r}")
    for name in ("epochs", "batch_size", "num_workers", "k"):
        if getattr(cfg, name) < 1:
            raise EvalError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    for name in ("lr", "temperature"):
        if not 0 < getattr(cfg, name) < math.inf:
            raise EvalError(f"--{name} must be finite and > 0, got {getattr(cfg, name)}")
    if not 0 <= cfg.weight_decay < math.inf:
        raise EvalError(f"--weight-decay must be finite and >= 0, got {cfg.weight_decay}")
    if cfg.threads < 0:  # torch.set_num_threads(-1) was a RuntimeError traceback
        raise EvalError(f"--threads must be >= 0, got {cfg.threads}")
    if not os.path.isfile(cfg.checkpoint):
        raise EvalError(f"--checkpoint {cfg.checkpoint}: no such file")
    for name in ("data", "val_data"):
        path = getattr(cfg, name)
        if path is not None and not os.path.isfile(path):
            raise EvalError(f"--{name.replace('_', '-')} {path}: no such file")
    from .cli import check_device

    check_device(cfg.device, EvalError)


def _which_arch(state):
    """The arch whose backbone has exactly ``state``'s keys and shapes, or None."""
    import torch

    from . import methods

    for arch in methods.ARCHS:
        with torch.device("meta"):  # shapes only: no memory, no init
            ref = methods.make_backbone(arch).state_dict()
        if ref.keys() == state.keys() and all(tuple(ref[k].shape) == tuple(state[k].shape) for k in ref):
            return arch
    return None


def load_backbone(path: str, arch: str, device="cpu"):
    """``methods.make_backbone(arch)`` with the weights of ``path`` loaded strictly, frozen, in eval mode.

    ``path`` is an ``encoder.pt`` (the backbone's state_dict) or a training
    ``checkpoint.pt`` (its ``model`` entry's ``backbone.*`` keys are used)."""
    import torch

    from . import methods

    if not os.path.isfile(path):
        raise EvalError(f"--checkpoint {path}: no such file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise EvalError(f"--checkpoint {path}: not a readable weights file ({type(e).__name__})") from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):  # a training checkpoint.pt
        state = {k[len("backbone."):]: v for k, v in state["model"].items() if k.startswith("backbone.")}
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise EvalError(f"--checkpoint {path}: not a state_dict of tensors (expected sslops-train's encoder.pt)")
    backbone = methods.make_backbone(arch)
    ref = backbone.state_dict()
    if ref.keys() != state.keys() or any(tuple(ref[k].shape) != tuple(state[k].shape) for k in ref):
        guess = _which_arch(state)
        if guess is not None:
            raise EvalError(f"--checkpoint {path} holds a {guess!r} encoder, not --arch {arch!r} "
                            f"(pass --arch {guess})")
        missing, unexpected = sorted(ref.keys() - state.keys()), sorted(state.keys() - ref.keys())
        shapes = sorted(k for k in ref.keys() & state.keys() if tuple(ref[k].shape) != tuple(state[k].shape))
        first = (missing or unexpected or shapes)[0]
        raise EvalError(f"--checkpoint {path} does not fit --arch {arch!r} ({len(missing)} missing, "
                        f"{len(unexpected)} unexpected, {len(shapes)} wrongly shaped keys, e.g. {first!r}) "
                        f"and no arch of {methods.ARCHS} fits it")
    backbone.load_state_dict(state, strict=True)
    backbone.requires_grad_(False)
    return backbone.to(device).eval()


def _features(backbone, batches):
    """Un-normalised (N, D) float features and (N,) labels, backbone in eval mode, no grad."""
    import torch

    from .knn import normalise

    assert not backbone.training
    feats, labels = [], []
    with torch.no_grad():
        for images, y in batches:
            feats.append(backbone(normalise(images)).float())
            labels.append(y)
    return torch.cat(feats), torch.cat(labels).long()


def linear_probe(train_x, train_y, val_x, val_y, *, epochs: int = 100, batch_size: int = 256, lr: float = 0.1,
                 weight_decay: float = 0.0, seed: int = 0):
    """Train ``nn.Linear`` on cached features (standardised with the training split's statistics).

    SGD (momentum 0.9), cosine learning rate from ``lr`` to 0 over all steps,
    zero-initialised weights, batches shuffled by a ``seed``-ed generator.
    Returns ``(val_top1, train_top1, head)``."""
    import torch
    from torch import nn

    mean, std = train_x.mean(0), train_x.std(0, unbiased=False).clamp_min(1e-6)
    tx, vx = (train_x - mean) / std, (val_x - mean) / std
    n, d = tx.shape
    n_cls = int(max(train_y.max(), val_y.max())) + 1
    head = nn.Linear(d, n_cls).to(tx.device)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    g = torch.Generator().manual_seed(seed)
    steps_per_epoch = math.ceil(n / batch_size)
    total, step = epochs * steps_per_epoch, 0
    for _ in range(epochs):
        perm = torch.randperm(n, generator=g).to(tx.device)
        for i in range(0, n, batch_size):
            for group in opt.param_groups:
                group["lr"] = 0.5 * lr * (1 + math.cos(math.pi * step / total))
            idx = perm[i:i + batch_size]
            loss = nn.functional.cross_entropy(head(tx[idx]), train_y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
    with torch.no_grad():
        val_top1 = (head(vx).argmax(1) == val_y).float().mean().item()
        train_top1 = (head(tx).argmax(1) == train_y).float().mean().item()
    return val_top1, train_top1, head


def evaluate(cfg) -> dict:
    import numpy as np
    import torch

    from sslops.data.loader import beton_length, eval_batches, split_indices

    from . import knn

    t0 = time.perf_counter()
    device = torch.device(cfg.device)
    backbone = load_backbone(cfg.checkpoint, cfg.arch, device)
    n = beton_length(cfg.data)
    if cfg.val_data is None:
        train_idx, val_idx = split_indices(n)
        val_path = cfg.data
    else:
        train_idx, val_idx, val_path = np.arange(n), np.arange(beton_length(cfg.val_data)), cfg.val_data

    def batches(path, idx):
        return eval_batches(path, idx, cfg.batch_size, num_workers=cfg.num_workers, device=device,
                            decode_size=cfg.size)

    result = {"mode": cfg.mode, "arch": cfg.arch, "checkpoint": cfg.checkpoint, "data": cfg.data,
              "val_data": cfg.val_data, "n_train": int(len(train_idx)), "n_val": int(len(val_idx))}
    if cfg.mode == "knn":
        tr = knn.features(backbone, batches(cfg.data, train_idx))
        va = knn.features(backbone, batches(val_path, val_idx))
        result.update(top1=knn.knn_top1(*tr, *va, k=cfg.k, t=cfg.temperature), k=min(cfg.k, len(train_idx)),
                      temperature=cfg.temperature, feature_dim=int(tr[0].shape[1]))
    else:
        before = [t.detach().clone() for t in backbone.state_dict().values()]
        train_x, train_y = _features(backbone, batches(cfg.data, train_idx))
        val_x, val_y = _features(backbone, batches(val_path, val_idx))
        top1, train_top1, _ = linear_probe(train_x, train_y, val_x, val_y, epochs=cfg.epochs,
                                           batch_size=cfg.batch_size, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                           seed=cfg.seed)
        after = list(backbone.state_dict().values())
        if len(before) != len(after) or not all(torch.equal(a, b) for a, b in zip(before, after)):
            raise RuntimeError("the linear probe changed the backbone")  # never: it is frozen
        result.update(top1=top1, train_top1=train_top1, epochs=cfg.epochs, lr=cfg.lr,
                      weight_decay=cfg.weight_decay, feature_dim=int(train_x.shape[1]))
    result["wall_s"] = round(time.perf_counter() - t0, 2)
    return result


def main(argv=None) -> int:
    cfg = build_parser().parse_args(argv)
    try:
        _check(cfg)
        import torch

        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        result = evaluate(cfg)
    except (ValueError, TypeError, OSError) as e:
        print(f"sslops-eval: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sslops-eval: interrupted", file=sys.stderr)
        return 130
    print(json.dumps(result))
    return 0


if __name__ == "__main__":  # python -m sslops.train.eval
    raise SystemExit(main())

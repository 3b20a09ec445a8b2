"""The training loop: epochs of (views -> loss -> step), kNN monitoring, metrics, atomic checkpoints, resume."""
from __future__ import annotations

import json
import os
import time
from types import SimpleNamespace

import torch

from sslops import SSLViews
from sslops.data.loader import ViewLoader, beton_length, eval_batches, split_indices

from . import knn, methods, optim

CONFIG_KEYS = ("method", "arch", "batch_size", "epochs", "lr", "optimizer", "weight_decay", "warmup_epochs",
               "temperature", "seed", "size")


class TrainError(ValueError):
    """Bad input found by the trainer (reported as one line by the CLI)."""


def _atomic_save(obj, path: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _atomic_write(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _read_metrics(path: str):
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _append_metrics(path: str, record: dict, kept: list) -> None:
    kept.append(record)
    _atomic_write(path, "".join(json.dumps(r) + "\n" for r in kept))


def _load_checkpoint(path: str, cfg) -> dict:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        saved = ckpt["config"]
    except Exception as e:
        raise TrainError(f"--resume: {path} is not a readable checkpoint ({type(e).__name__})") from None
    for key in ("method", "arch", "batch_size", "seed", "size"):
        if saved.get(key) != getattr(cfg, key):
            raise TrainError(f"--resume: checkpoint has {key}={saved.get(key)!r}, this run has "
                             f"{key}={getattr(cfg, key)!r}")
    return ckpt


def _knn_eval(model, data, train_idx, val_idx, cfg, device) -> float:
    bs = 512
    tr = knn.features(model.backbone, eval_batches(data, train_idx, bs, num_workers=cfg.num_workers, device=device))
    va = knn.features(model.backbone, eval_batches(data, val_idx, bs, num_workers=cfg.num_workers, device=device))
    return knn.knn_top1(*tr, *va)


def train(cfg: SimpleNamespace) -> dict:
    """Run (or resume) a training run described by ``cfg``; returns the final metrics record."""
    t_start = time.time()
    device = torch.device(cfg.device)
    out = cfg.out
    ckpt_path, metrics_path = os.path.join(out, "checkpoint.pt"), os.path.join(out, "metrics.jsonl")
    n = beton_length(cfg.data)
    train_idx, val_idx = split_indices(n)
    bank_idx = train_idx[:cfg.knn_bank] if cfg.knn_bank else train_idx

    torch.manual_seed(cfg.seed)
    model = methods.make_method(cfg.method, cfg.arch, temperature=cfg.temperature).to(device)
    views = SSLViews("simclr", size=cfg.size, views=2, validate=False)
    loader = ViewLoader(cfg.data, cfg.batch_size, views, num_workers=cfg.num_workers, seed=cfg.seed,
                        indices=train_idx, device=device)
    steps_per_epoch = len(loader)
    total_steps = steps_per_epoch * cfg.epochs
    warmup_steps = min(total_steps, round(cfg.warmup_epochs * steps_per_epoch))
    peak_lr = optim.scaled_lr(cfg.lr, cfg.batch_size)
    opt = optim.make_optimizer(cfg.optimizer, model, peak_lr, cfg.weight_decay)

    start_epoch, kept = 0, []
    if cfg.resume:
        ckpt = _load_checkpoint(ckpt_path, cfg)
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        start_epoch, knn_init = ckpt["epoch"] + 1, ckpt["knn_top1_init"]
        # every epoch logged exactly once: drop records of epochs the checkpoint does not hold
        kept = [r for r in _read_metrics(metrics_path) if not r.get("final") and r["epoch"] < start_epoch]
        _atomic_write(metrics_path, "".join(json.dumps(r) + "\n" for r in kept))
    else:
        knn_init = _knn_eval(model, cfg.data, bank_idx, val_idx, cfg, device)
        _atomic_write(metrics_path, "")

    from tqdm import tqdm

    record = None
    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        t0, loss_sum, seen = time.time(), 0.0, 0
        bar = tqdm(total=steps_per_epoch, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not cfg.progress,
                   leave=False, dynamic_ncols=True)
        for step, (_, v, _) in loader.epoch(epoch):
            lr = optim.lr_at(epoch * steps_per_epoch + step, total_steps, warmup_steps, peak_lr)
            optim.set_lr(opt, lr)
            loss = model(v)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.clip_grad:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
            opt.step()
            loss_sum += loss.item()
            seen += v[0].shape[0]
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}", img_s=f"{seen / (time.time() - t0):.0f}")
        bar.close()
        record = {"epoch": epoch, "loss": loss_sum / steps_per_epoch, "lr": lr,
                  "images_per_s": seen / (time.time() - t0)}
        last = epoch == cfg.epochs - 1
        if last or (cfg.knn_every and (epoch + 1) % cfg.knn_every == 0):
            record["knn_top1"] = _knn_eval(model, cfg.data, bank_idx, val_idx, cfg, device)
        _append_metrics(metrics_path, record, kept)
        _atomic_save({"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch,
                      "rng": {"torch": torch.get_rng_state()}, "knn_top1_init": knn_init,
                      "config": {k: getattr(cfg, k) for k in CONFIG_KEYS}}, ckpt_path)

    if record is None:
        raise TrainError(f"--resume: the run in {out} already finished {cfg.epochs} epochs")
    _atomic_save(model.backbone.state_dict(), os.path.join(out, "encoder.pt"))
    final = {"final": True, "epoch": cfg.epochs - 1, "knn_top1": record["knn_top1"], "knn_top1_init": knn_init,
             "wall_s": time.time() - t_start}
    _append_metrics(metrics_path, final, kept)
    if cfg.plot:
        from .plot import plot_metrics

        plot_metrics(kept, os.path.join(out, "loss.png"))
    return final

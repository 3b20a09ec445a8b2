"""The training loop: epochs of (views -> loss -> step), kNN monitoring, metrics, atomic checkpoints, resume."""
from __future__ import annotations

import json
import os
import random
import time
from contextlib import nullcontext
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist

from sslops import SSLViews
from sslops.augment import Recipe
from sslops.data.loader import (ViewLoader, beton_length, constant_image_size, eval_batches, split_indices,
                                step_generator)

from . import knn, methods, optim

CONFIG_KEYS = ("method", "arch", "batch_size", "epochs", "lr", "optimizer", "weight_decay", "warmup_epochs",
               "temperature", "crop_min", "flip_p", "seed", "size", "precision", "world_size")
MAE_RECIPE = Recipe(scale=(0.2, 1.0), jitter_p=0.0, grayscale_p=0.0, blur_p=(0.0, 0.0))
OUTPUTS = ("checkpoint.pt", "metrics.jsonl", "encoder.pt")  # the files written through a .tmp<pid> file
TRACE_ENV = "SSLOPS_TRAIN_TRACE"  # test hook: a directory where each rank writes what it saw (tests/test_train_ddp.py)


def rank_world():
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier():
    if rank_world()[1] > 1:
        dist.barrier()


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _autocast(cfg, device):
    if cfg.precision == "fp32":
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if cfg.precision == "bf16" else torch.float16)


class TrainError(ValueError):
    """Bad input found by the trainer (reported as one line by the CLI)."""


def _tmp_path(path: str, pid: int | None = None) -> str:
    """Where a writer puts ``path`` before os.replace: ``<path>.tmp<pid>`` (_remove_stale_tmp parses it)."""
    return f"{path}.tmp{os.getpid() if pid is None else pid}"


def _atomic_save(obj, path: str) -> None:
    tmp = _tmp_path(path)
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _atomic_write(path: str, text: str) -> None:
    tmp = _tmp_path(path)
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _remove_stale_tmp(out: str) -> None:
    """Delete ``<name>.tmp<pid>`` files that a killed writer left behind (its pid no longer runs)."""
    for name in os.listdir(out):
        stem, _, pid = name.rpartition(".tmp")
        if stem not in OUTPUTS or not pid.isdigit() or name != _tmp_path(stem, int(pid)):
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            os.remove(os.path.join(out, name))
        except PermissionError:  # a live process of another user
            pass


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
    for key in ("method", "arch", "batch_size", "seed", "size", "world_size"):
        if saved.get(key) != getattr(cfg, key):
            raise TrainError(f"--resume: checkpoint has {key}={saved.get(key)!r}, this run has "
                             f"{key}={getattr(cfg, key)!r}")
    return ckpt


def _knn_eval(backbone, data, train_idx, val_idx, cfg, device):
    """kNN top-1 on rank 0 (None on the other ranks, which wait)."""
    value = None
    if rank_world()[0] == 0:
        bs = 512
        with _autocast(cfg, device):
            tr = knn.features(backbone, eval_batches(data, train_idx, bs, num_workers=cfg.num_workers, device=device,
                                                        decode_size=cfg.eval_decode))
            va = knn.features(backbone, eval_batches(data, val_idx, bs, num_workers=cfg.num_workers, device=device,
                                                        decode_size=cfg.eval_decode))
        value = knn.knn_top1(*tr, *va)
    _barrier()
    return value


def train(cfg: SimpleNamespace) -> dict:
    """Run (or resume) a training run described by ``cfg``; returns the final metrics record.

    Under torchrun (torch.distributed initialised by the CLI) every rank trains
    on its own ffcv shard (same seed on every rank: disjoint shards), the loss
    gathers embeddings across ranks, and only rank 0 writes files."""
    t_start = time.time()
    rank, world = rank_world()
    device = torch.device(cfg.device)
    out = cfg.out
    ckpt_path, metrics_path = os.path.join(out, "checkpoint.pt"), os.path.join(out, "metrics.jsonl")
    n = beton_length(cfg.data)
    train_idx, val_idx = split_indices(n)
    bank_idx = train_idx[:cfg.knn_bank] if cfg.knn_bank else train_idx
    trace = os.environ.get(TRACE_ENV)

    torch.manual_seed(cfg.seed)
    core = methods.make_method(cfg.method, cfg.arch, temperature=cfg.temperature, size=cfg.size,
                               gather_distributed=world > 1).to(device)
    if device.type == "cuda":
        core = core.to(memory_format=torch.channels_last)
        if world > 1:
            core = torch.nn.SyncBatchNorm.convert_sync_batchnorm(core)
    model = torch.nn.parallel.DistributedDataParallel(core) if world > 1 else core
    if cfg.method == "simclr":
        recipe = Recipe(scale=(cfg.crop_min, 1.0), flip_p=cfg.flip_p)
        views = SSLViews(recipe, size=cfg.size, views=2, validate=False)
    else:  # MAE: crop and flip only (He et al. 2022)
        views = SSLViews(MAE_RECIPE, size=cfg.size, views=1, validate=False)
    mixed = constant_image_size(cfg.data) is None  # e.g. ImageNet: decode the central square, then crop views
    cfg.train_decode, cfg.eval_decode = (round(cfg.size * 8 / 7), cfg.size) if mixed else (None, None)
    loader = ViewLoader(cfg.data, cfg.batch_size, views, num_workers=cfg.num_workers, seed=cfg.seed,
                        indices=train_idx, device=device, distributed=world > 1, decode_size=cfg.train_decode)
    steps_per_epoch = len(loader)
    total_steps = steps_per_epoch * cfg.epochs
    warmup_steps = min(total_steps, round(cfg.warmup_epochs * steps_per_epoch))
    peak_lr = optim.scaled_lr(cfg.lr, cfg.batch_size * world)  # the global batch
    opt = optim.make_optimizer(cfg.optimizer, core, peak_lr, cfg.weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")

    start_epoch, kept = 0, []
    if rank == 0 and os.path.isdir(out):
        _remove_stale_tmp(out)
    if cfg.resume:
        ckpt = _load_checkpoint(ckpt_path, cfg)
        core.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        _set_rng_state(ckpt["rng"])
        start_epoch, knn_init = ckpt["epoch"] + 1, ckpt["knn_top1_init"]
        # every epoch logged exactly once: drop records of epochs the checkpoint does not hold
        kept = [r for r in _read_metrics(metrics_path) if not r.get("final") and r["epoch"] < start_epoch]
        if rank == 0:
            _atomic_write(metrics_path, "".join(json.dumps(r) + "\n" for r in kept))
    else:
        knn_init = _knn_eval(core.backbone, cfg.data, bank_idx, val_idx, cfg, device)
        if rank == 0:
            _atomic_write(metrics_path, "")

    from tqdm import tqdm

    record, seen_labels = None, []
    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        t0, loss_sum, seen = time.time(), torch.zeros((), dtype=torch.float64, device=device), 0
        bar = tqdm(total=steps_per_epoch, desc=f"epoch {epoch + 1}/{cfg.epochs}",
                   disable=not cfg.progress or rank != 0, leave=False, dynamic_ncols=True)
        for step, (images, v, labels) in loader.epoch(epoch):
            lr = optim.lr_at(epoch * steps_per_epoch + step, total_steps, warmup_steps, peak_lr)
            optim.set_lr(opt, lr)
            if device.type == "cuda":
                v = [x.contiguous(memory_format=torch.channels_last) for x in v]
            with _autocast(cfg, device):
                if cfg.method == "simclr":
                    loss = model(v)
                else:  # masking noise: a pure function of (seed, epoch, step, rank), like the views
                    loss = model(v, generator=step_generator(cfg.seed, epoch, step, device, rank, world, stream=1))
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if cfg.clip_grad:
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(core.parameters(), cfg.clip_grad)
            scaler.step(opt)
            scaler.update()
            step_loss = loss.detach().double()
            if world > 1:  # the global-batch loss: the mean of the ranks' losses (nt_xent's DDP convention)
                dist.all_reduce(step_loss)
                step_loss /= world
            loss_sum += step_loss
            seen += v[0].shape[0] * world
            if trace:
                seen_labels.append(labels.cpu().tolist())
                if epoch == start_epoch and step == 0:
                    torch.save({"views": [x.cpu() for x in v], "loss": step_loss.item()},
                               os.path.join(trace, f"step0_rank{rank}.pt"))
            bar.update(1)
            if step % 10 == 0 or step == steps_per_epoch - 1:
                bar.set_postfix(loss=f"{step_loss.item():.3f}", img_s=f"{seen / (time.time() - t0):.0f}")
        bar.close()
        record = {"epoch": epoch, "loss": loss_sum.item() / steps_per_epoch, "lr": lr,
                  "images_per_s": seen / (time.time() - t0)}
        last = epoch == cfg.epochs - 1
        if last or (cfg.knn_every and (epoch + 1) % cfg.knn_every == 0):
            record["knn_top1"] = _knn_eval(core.backbone, cfg.data, bank_idx, val_idx, cfg, device)
        if rank == 0:
            _append_metrics(metrics_path, record, kept)
            _atomic_save({"model": core.state_dict(), "optimizer": opt.state_dict(), "scaler": scaler.state_dict(),
                          "epoch": epoch, "step": (epoch + 1) * steps_per_epoch, "rng": _rng_state(),
                          "knn_top1_init": knn_init, "config": {k: getattr(cfg, k) for k in CONFIG_KEYS}},
                         ckpt_path)
        _barrier()

    if trace:
        with open(os.path.join(trace, f"labels_rank{rank}.json"), "w") as f:
            json.dump(seen_labels, f)
    if record is None:
        raise TrainError(f"--resume: the run in {out} already finished {cfg.epochs} epochs")
    final = {"final": True, "epoch": cfg.epochs - 1, "knn_top1": record["knn_top1"], "knn_top1_init": knn_init,
             "wall_s": time.time() - t_start}
    if rank == 0:
        _atomic_save(core.backbone.state_dict(), os.path.join(out, "encoder.pt"))
        _append_metrics(metrics_path, final, kept)
        if cfg.plot:
            from .plot import plot_metrics

            plot_metrics(kept, os.path.join(out, "loss.png"))
            if cfg.method == "mae":
                from .mae import plot_reconstructions

                images = next(iter(eval_batches(cfg.data, val_idx[:8], 8, num_workers=cfg.num_workers,
                                                device=device, decode_size=cfg.eval_decode)))[0]
                x = knn.normalise(images)
                masked, recon = core.reconstruct(x, step_generator(cfg.seed, cfg.epochs, 0, device, stream=1))
                plot_reconstructions(x, masked, recon, os.path.join(out, "reconstructions.png"))
    _barrier()
    return final

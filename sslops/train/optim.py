"""LARS and AdamW with bias / norm parameters excluded; per-iteration warmup + cosine LR."""
from __future__ import annotations

import math

import torch
from torch import nn

OPTIMIZERS = ("lars", "adamw")


def param_groups(model: nn.Module, weight_decay: float):
    """Two groups: weights (decayed, LARS-adapted) and biases / norm parameters (neither)."""
    decay, no_decay = [], []
    named = dict(model.named_parameters())
    skip = set()  # timm's convention: a module's no_weight_decay() names tokens and position embeddings
    for prefix, module in model.named_modules():
        if hasattr(module, "no_weight_decay"):
            skip |= {id(named[f"{prefix}.{n}" if prefix else n]) for n in module.no_weight_decay()
                     if (f"{prefix}.{n}" if prefix else n) in named}
    for module in model.modules():
        norm = isinstance(module, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm))
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            (no_decay if norm or name == "bias" or p.ndim <= 1 or id(p) in skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay, "lars": True},
            {"params": no_decay, "weight_decay": 0.0, "lars": False}]


class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise trust ratio (You et al. 2017), as in SimCLR.

    A group with ``lars=False`` (biases, norm parameters) gets neither weight
    decay nor the trust ratio."""

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 1e-6,
                 eta: float = 0.001, lars: bool = True):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, lars=lars))

    @torch.no_grad()
    def step(self, closure=None):
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is None:
                    continue
                d = p.grad
                if g["lars"]:
                    if g["weight_decay"]:
                        d = d.add(p, alpha=g["weight_decay"])
                    pn, dn = torch.linalg.vector_norm(p), torch.linalg.vector_norm(d)
                    trust = torch.where((pn > 0) & (dn > 0), g["eta"] * pn / dn, torch.ones_like(pn))
                    d = d.mul(trust)
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.clone(d).detach()
                else:
                    state["mu"].mul_(g["momentum"]).add_(d)
                p.add_(state["mu"], alpha=-g["lr"])


def make_optimizer(name: str, model: nn.Module, lr: float, weight_decay: float):
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {name!r}")
    groups = param_groups(model, weight_decay)
    if name == "lars":
        return LARS(groups, lr=lr)
    for g in groups:
        g.pop("lars")
    return torch.optim.AdamW(groups, lr=lr)


def scaled_lr(base_lr: float, batch_size: int) -> float:
    """The linear scaling rule: base_lr * batch_size / 256."""
    return base_lr * batch_size / 256


def lr_at(step: int, total_steps: int, warmup_steps: int, peak_lr: float, final_lr: float = 0.0) -> float:
    """Linear warmup from 0 over ``warmup_steps`` (step s gets peak*(s+1)/warmup), then cosine to final_lr."""
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return final_lr + 0.5 * (peak_lr - final_lr) * (1 + math.cos(math.pi * min(1.0, t)))


def set_lr(optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr

"""Encoders and the methods: SimCLR (backbone + projection MLP + ``sslops.nt_xent``) and MAE (mae.py)."""
from __future__ import annotations

import torch
from torch import nn

import sslops

from .mae import MAE, VIT_ARCHS, make_vit

CNN_ARCHS = ("tiny", "resnet18", "resnet18-cifar", "resnet50", "resnet50-cifar")
ARCHS = CNN_ARCHS + VIT_ARCHS
METHODS = ("simclr", "mae")


class TinyCNN(nn.Module):
    """A small conv net (4 conv-BN-ReLU blocks, strides 2, 2, 2, 1, global average pool).

    Fast enough for 2 CPU cores at 32 px (the first conv downsamples at once).  Width 48: on the
    embedded digits 48 gives kNN 0.918 in 90 s where 32 gives 0.895 in 53 s (bench/RESULTS.md)."""

    def __init__(self, width: int = 48):
        super().__init__()
        w = width
        layers, c_in = [], 3
        for c_out, stride in ((w, 2), (2 * w, 2), (4 * w, 2), (4 * w, 1)):
            layers += [nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
            c_in = c_out
        self.features = nn.Sequential(*layers)
        self.out_dim = c_in

    def forward(self, x):
        return self.features(x).mean((2, 3))


def make_backbone(arch: str, img_size: int = 32) -> nn.Module:
    """A backbone mapping (B, 3, H, W) to (B, D) features; ``.out_dim`` is D.

    ``img_size`` is used by the ViTs only (timm ViTs have a fixed grid; patch 4)."""
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
    if arch in VIT_ARCHS:
        return make_vit(arch, img_size)
    if arch == "tiny":
        return TinyCNN()
    import torchvision

    net = getattr(torchvision.models, arch.split("-")[0])(weights=None)
    if arch.endswith("-cifar"):  # CIFAR-style stem for small images: 3x3 stride-1 conv, no max-pool
        net.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        net.maxpool = nn.Identity()
    out_dim = net.fc.in_features
    net.fc = nn.Identity()
    net.out_dim = out_dim
    return net


class SimCLR(nn.Module):
    """Backbone, 2-layer projection MLP, NT-Xent loss over two views."""

    def __init__(self, arch: str = "tiny", proj_dim: int = 128, temperature: float = 0.5,
                 gather_distributed: bool = False, img_size: int = 32):
        super().__init__()
        self.backbone = make_backbone(arch, img_size)
        d = self.backbone.out_dim
        self.projector = nn.Sequential(nn.Linear(d, d, bias=False), nn.BatchNorm1d(d), nn.ReLU(inplace=True),
                                       nn.Linear(d, proj_dim))
        self.temperature = temperature
        self.gather_distributed = gather_distributed

    def forward(self, views, images=None, generator=None):  # images, generator: MAE's call, unused here
        x1, x2 = views
        z = self.projector(self.backbone(torch.cat([x1, x2])))
        z1, z2 = z.float().chunk(2)  # the loss in fp32 under bf16/fp16 autocast (as cross-entropy would be)
        with torch.autocast(z.device.type, enabled=False):
            return sslops.nt_xent(z1, z2, self.temperature, gather_distributed=self.gather_distributed)


def make_method(method: str, arch: str, *, size: int = 32, **kwargs) -> nn.Module:
    """SimCLR(arch, **kwargs) or MAE(arch, **kwargs) for ``size``-pixel images.  MAE needs a ViT arch
    and has no temperature or gather: those keywords are accepted and dropped so one call site serves both."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
    if method == "mae":
        if arch not in VIT_ARCHS:
            raise ValueError(f"method 'mae' needs a ViT arch, one of {VIT_ARCHS}; got {arch!r}")
        kwargs.pop("temperature", None)
        kwargs.pop("gather_distributed", None)
        return MAE(arch, img_size=size, **kwargs)
    return SimCLR(arch, img_size=size, **kwargs)

"""MAE (He et al. 2022) for the trainer: a timm ViT encoder on sslops' fused masking and attention.

Encoder (``MAE.backbone``, a timm ``VisionTransformer`` with :func:`sslops.nn.patch_timm` applied):
patch_embed -> prefix (cls) tokens in front -> :func:`sslops.random_masking` with the positional
embedding added in the same pass (``num_prefix_tokens`` = the cls token) -> blocks -> norm.
Decoder: Linear to the decoder width -> :func:`sslops.restore_tokens` with a learned mask token ->
+ decoder pos_embed -> timm ``Block`` s (patched attention) -> norm -> Linear to ``patch_size**2 * 3``.
Loss: MSE on the masked patches only, against per-patch normalised pixels (MAE's ``norm_pix_loss``).

``MAE.backbone`` alone (no masking, all patches) maps (B, 3, H, W) -> (B, D) mean-pooled patch
features for kNN; its ``state_dict`` loads into ``make_vit(arch, img_size)`` (what encoder.pt holds).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
import torch
from torch import nn

import sslops
from sslops.augment import IMAGENET_MEAN, IMAGENET_STD

# "vit-micro": trains in minutes on 2 CPU cores at 32 px; the timm names are ViT recipes with the
# patch size and image size overridden for small images (patch 4 at 32 px: an 8 x 8 grid).
VIT_ARCHS = ("vit-micro", "vit_tiny_patch16_224", "vit_small_patch16_224", "vit_base_patch16_224")
_MICRO = dict(embed_dim=128, depth=4, num_heads=4, mlp_ratio=4.0)


def make_vit(arch: str = "vit-micro", img_size: int = 32, patch_size: int = 4, backend: str = "auto",
             **overrides) -> nn.Module:
    """A timm ViT for ``img_size`` images (no head, mean-pooled patch tokens, per-token final norm),
    attention on sslops' kernels.  ``.out_dim`` is the feature width.  ``overrides`` go to
    ``timm.create_model`` (e.g. ``depth=2``)."""
    if arch not in VIT_ARCHS:
        raise ValueError(f"arch must be one of {VIT_ARCHS}, got {arch!r}")
    for name, v in (("img_size", img_size), ("patch_size", patch_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if img_size % patch_size:
        raise ValueError(f"img_size ({img_size}) must be a multiple of patch_size ({patch_size})")
    import timm

    kwargs = dict(_MICRO) if arch == "vit-micro" else {}
    kwargs.update(overrides)
    name = "vit_tiny_patch16_224" if arch == "vit-micro" else arch
    net = timm.create_model(name, pretrained=False, img_size=img_size, patch_size=patch_size, num_classes=0,
                            global_pool="avg", fc_norm=False, **kwargs)
    sslops.nn.patch_timm(net, backend=backend)
    if net.pos_embed is not None:  # MAE's fixed 2-D sin-cos values as the start (still learned here)
        grid = img_size // patch_size
        n_pos = net.pos_embed.shape[1]
        with torch.no_grad():
            net.pos_embed.copy_(sincos_pos_embed(net.embed_dim, grid, n_pos - grid * grid))
    net.out_dim = net.num_features
    return net


def sincos_pos_embed(dim: int, grid: int, num_prefix_tokens: int = 0) -> torch.Tensor:
    """MAE's ``get_2d_sincos_pos_embed`` as (1, P + grid**2, dim) float32, zero rows for the P prefix tokens."""
    if dim % 4:
        raise ValueError(f"dim must be a multiple of 4 for the 2-D sin-cos embedding, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4.0))
    gh, gw = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64),
                            indexing="ij")
    # MAE: grid = meshgrid(w, h); the first half embeds w (columns), the second half h (rows)
    parts = []
    for pos in (gw.reshape(-1), gh.reshape(-1)):
        out = pos[:, None] * omega[None]
        parts += [out.sin(), out.cos()]
    emb = torch.cat(parts, 1)
    emb = torch.cat([emb.new_zeros(num_prefix_tokens, dim), emb], 0)
    return emb.float()[None]


def mask_generator(seed: int, epoch: int, step: int, rank: int = 0, device="cpu") -> torch.Generator:
    """A torch.Generator on ``device`` whose state derives from (seed, epoch, step, rank) only: the
    masks of a step are the same after a resume, and differ between DDP ranks."""
    for name, v in (("seed", seed), ("epoch", epoch), ("step", step), ("rank", rank)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
            raise ValueError(f"{name} must be a non-negative int, got {v!r}")
    state = np.random.SeedSequence([int(seed), int(epoch), int(step), int(rank)]).generate_state(1, np.uint64)[0]
    g = torch.Generator(device=device)
    g.manual_seed(int(state))
    return g


def patchify(images: torch.Tensor, p: int) -> torch.Tensor:
    """(B, 3, H, W) -> (B, (H/p)(W/p), p*p*3), patches in raster order, pixels (row, col, channel) as MAE."""
    B, C, H, W = images.shape
    h, w = H // p, W // p
    x = images.reshape(B, C, h, p, w, p)
    return torch.einsum("nchpwq->nhwpqc", x).reshape(B, h * w, p * p * C)


def unpatchify(patches: torch.Tensor, p: int, channels: int = 3) -> torch.Tensor:
    """Inverse of :func:`patchify` for a square grid."""
    B, N, _ = patches.shape
    h = w = math.isqrt(N)
    x = patches.reshape(B, h, w, p, p, channels)
    return torch.einsum("nhwpqc->nchpwq", x).reshape(B, channels, h * p, w * p)


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, norm_pix: bool = True) -> torch.Tensor:
    """MAE's loss: per-patch MSE (target normalised per patch with ``norm_pix``: mean 0, unbiased
    variance + 1e-6), averaged over the masked patches (mask 1) only.  Computed in float32 (float64
    inputs stay float64)."""
    dtype = torch.float64 if target.dtype == torch.float64 else torch.float32
    target = target.to(dtype)
    if norm_pix:
        mean = target.mean(-1, keepdim=True)
        var = target.var(-1, keepdim=True)
        target = (target - mean) / (var + 1e-6) ** 0.5
    loss = ((pred.to(dtype) - target) ** 2).mean(-1)
    mask = mask.to(dtype)
    return (loss * mask).sum() / mask.sum()


class MAE(nn.Module):
    """Masked autoencoder on a timm ViT.

    Args:
        arch: one of :data:`VIT_ARCHS` (default "vit-micro": width 128, depth 4, 4 heads).
        img_size, patch_size: 32 and 4 by default (an 8 x 8 grid of 64 patches).
        mask_ratio: fraction of patches removed per sample (0.75).
        decoder_dim, decoder_depth, decoder_heads: the decoder (64, 2, 4 by default; MAE's
            ViT-B decoder is 512, 8, 16 -- far too slow for the CPU budgets here).
        norm_pix: normalise each target patch (MAE's ``norm_pix_loss``, default True).
        backend: sslops backend for masking and attention ("auto").
        encoder_kwargs: extra ``timm.create_model`` arguments for the encoder.
    """

    def __init__(self, arch: str = "vit-micro", img_size: int = 32, patch_size: int = 4, mask_ratio: float = 0.75,
                 decoder_dim: int = 64, decoder_depth: int = 2, decoder_heads: int = 4, norm_pix: bool = True,
                 backend: str = "auto", **encoder_kwargs):
        super().__init__()
        self.backbone = make_vit(arch, img_size, patch_size, backend, **encoder_kwargs)
        enc = self.backbone
        if enc.pos_embed is None:
            raise ValueError(f"arch {arch!r} has no absolute pos_embed, which MAE's masking needs")
        self.img_size, self.patch_size, self.norm_pix, self.backend = img_size, patch_size, bool(norm_pix), backend
        self.num_patches = (img_size // patch_size) ** 2
        self.num_prefix_tokens = enc.num_prefix_tokens
        if isinstance(mask_ratio, bool) or not isinstance(mask_ratio, (int, float)):
            raise TypeError(f"mask_ratio must be a real number, got {type(mask_ratio).__name__}")
        keep = int(self.num_patches * (1 - mask_ratio))
        if not (0 < mask_ratio < 1) or keep < 1 or keep >= self.num_patches:
            raise ValueError(f"mask_ratio must leave between 1 and {self.num_patches - 1} of the "
                             f"{self.num_patches} patches visible, got {mask_ratio!r}")
        self.mask_ratio = float(mask_ratio)
        for name, v in (("decoder_dim", decoder_dim), ("decoder_depth", decoder_depth),
                        ("decoder_heads", decoder_heads)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if decoder_dim % decoder_heads or decoder_dim % 4:
            raise ValueError(f"decoder_dim ({decoder_dim}) must be a multiple of decoder_heads ({decoder_heads}) "
                             "and of 4")
        from timm.models.vision_transformer import Block

        P = self.num_prefix_tokens
        grid = img_size // patch_size
        self.decoder_embed = nn.Linear(enc.embed_dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.decoder_pos_embed = nn.Parameter(sincos_pos_embed(decoder_dim, grid, P))
        self.decoder_blocks = nn.Sequential(*[Block(decoder_dim, decoder_heads, mlp_ratio=4.0, qkv_bias=True)
                                              for _ in range(decoder_depth)])
        self.decoder_norm = nn.LayerNorm(decoder_dim)
        self.decoder_pred = nn.Linear(decoder_dim, patch_size ** 2 * 3)
        nn.init.normal_(self.mask_token, std=0.02)
        for m in [self.decoder_embed, self.decoder_pred, *self.decoder_blocks.modules()]:
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        sslops.nn.patch_timm(self.decoder_blocks, backend=backend)

    @torch.jit.ignore
    def no_weight_decay(self):
        """timm's convention: token and position parameters are not weight-decayed."""
        return {"backbone.cls_token", "backbone.reg_token", "backbone.pos_embed", "mask_token", "decoder_pos_embed"}

    def _check_images(self, x, name: str) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"{name} must be a float tensor (normalised images), got {x.dtype}")
        s = self.img_size
        if x.dim() != 4 or x.shape[1] != 3 or tuple(x.shape[2:]) != (s, s) or x.shape[0] < 1:
            raise ValueError(f"{name} must have shape (B, 3, {s}, {s}) with B >= 1, got {tuple(x.shape)}")

    def forward_encoder(self, x: torch.Tensor, generator: Optional[torch.Generator] = None,
                        noise: Optional[torch.Tensor] = None):
        """Visible tokens (B, P + K, D) after the encoder, mask (B, N) (1 = removed), ids_restore (B, N)."""
        enc = self.backbone
        t = enc.patch_embed(x)  # (B, N, D)
        B = t.shape[0]
        prefix = [tok.to(t.dtype).expand(B, -1, -1) for tok in (enc.cls_token, enc.reg_token) if tok is not None]
        pos = enc.pos_embed.to(t.dtype)
        if enc.no_embed_class:  # pos_embed covers the patches only: mask, then put the prefix in front
            vis, mask, ids_restore = sslops.random_masking(t, self.mask_ratio, noise=noise, generator=generator,
                                                           pos_embed=pos, backend=self.backend)
            if prefix:
                vis = torch.cat(prefix + [vis], 1)
        else:  # pos_embed covers the prefix too: prefix in front, mask the patches behind it
            if prefix:
                t = torch.cat(prefix + [t], 1)
            vis, mask, ids_restore = sslops.random_masking(t, self.mask_ratio, noise=noise, generator=generator,
                                                           pos_embed=pos, num_prefix_tokens=len(prefix),
                                                           backend=self.backend)
        vis = enc.norm_pre(enc.pos_drop(vis))
        vis = enc.blocks(vis)
        return enc.norm(vis), mask, ids_restore

    def forward_decoder(self, vis: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """Predicted pixels (B, N, patch_size**2 * 3) for every patch."""
        P = self.num_prefix_tokens
        y = self.decoder_embed(vis)
        y = sslops.restore_tokens(y, ids_restore, self.mask_token.to(y.dtype), num_prefix_tokens=P,
                                  backend=self.backend)
        y = y + self.decoder_pos_embed.to(y.dtype)
        y = self.decoder_norm(self.decoder_blocks(y))
        return self.decoder_pred(y)[:, P:]

    def _predict(self, x, generator, noise=None):
        vis, mask, ids_restore = self.forward_encoder(x, generator, noise)
        return self.forward_decoder(vis, ids_restore), mask

    def forward(self, views: Sequence[torch.Tensor], images: Optional[torch.Tensor] = None,
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """The loss on ``views[0]`` (float, normalised (B, 3, H, W)); further views are unused.
        ``images`` (the loader's raw uint8 batch) is accepted for a uniform call and unused.
        ``generator`` (on the views' device) draws the masks; default: torch's global RNG."""
        if isinstance(views, torch.Tensor) or not isinstance(views, (list, tuple)) or not views:
            raise TypeError("views must be a non-empty list of (B, 3, H, W) float tensors")
        x = views[0]
        self._check_images(x, "views[0]")
        pred, mask = self._predict(x, generator)
        return masked_mse(pred, patchify(x, self.patch_size), mask, self.norm_pix)

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor, generator: Optional[torch.Generator] = None,
                    paste_visible: bool = False):
        """(masked_input, reconstruction), both (B, 3, H, W) in x's (normalised) space, eval mode.

        masked_input: x with the removed patches set to 0 (the dataset mean after normalisation).
        reconstruction: the decoder output for every patch.  With ``norm_pix`` the model predicts
        per-patch normalised pixels; they are mapped back with each *true* patch's mean and std (as
        MAE's visualisations of norm-pix models do), so the mean colour of a masked patch is not the
        model's.  ``paste_visible`` puts the visible patches of x in (the paper shows raw outputs)."""
        self._check_images(x, "x")
        was_training = self.training
        self.eval()
        try:
            pred, mask = self._predict(x, generator)
        finally:
            self.train(was_training)
        target = patchify(x, self.patch_size).float()
        pred = pred.float()
        if self.norm_pix:
            mean = target.mean(-1, keepdim=True)
            std = (target.var(-1, keepdim=True) + 1e-6) ** 0.5
            pred = pred * std + mean
        m = mask.to(target.dtype)[..., None]
        if paste_visible:
            pred = pred * m + target * (1 - m)
        p = self.patch_size
        return unpatchify(target * (1 - m), p).to(x.dtype), unpatchify(pred, p).to(x.dtype)


def plot_reconstructions(originals: torch.Tensor, masked: torch.Tensor, recon: torch.Tensor, path: str,
                         mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                         max_images: int = 8) -> None:
    """A 3-row figure (originals, masked inputs, reconstructions) of up to ``max_images`` images,
    given as normalised (B, 3, H, W) floats (un-normalised with ``mean``/``std``, clipped to [0, 1])."""
    batch = []
    for name, t in (("originals", originals), ("masked", masked), ("recon", recon)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4 or t.shape[1] != 3 or t.shape[0] < 1:
            raise ValueError(f"{name} must be a (B, 3, H, W) tensor with B >= 1, "
                             f"got {getattr(t, 'shape', type(t).__name__)}")
        batch.append(t.shape)
    if len(set(batch)) != 1:
        raise ValueError(f"originals, masked and recon must have the same shape, got {[tuple(s) for s in batch]}")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = min(int(max_images), originals.shape[0])
    m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    rows = [("original", originals), ("masked input", masked), ("reconstruction", recon)]
    fig, axes = plt.subplots(3, n, figsize=(1.3 * n + 1.2, 4.2), squeeze=False)
    for r, (label, t) in enumerate(rows):
        imgs = (t[:n].detach().float().cpu() * s + m).clamp(0, 1).permute(0, 2, 3, 1).numpy()
        for c in range(n):
            ax = axes[r][c]
            ax.imshow(imgs[c], interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
        axes[r][0].set_ylabel(label, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)

"""A drop-in for timm's ViT ``Attention`` on sslops' fused attention kernels."""
from __future__ import annotations

from typing import Optional, Type

import torch
from torch import Tensor, nn

from .. import _backend, _checks
from ..attention import attention


def _additive_mask(attn_mask: Optional[Tensor], is_causal: bool, n: int, like: Tensor) -> Optional[Tensor]:
    """SDPA's mask semantics as an additive bias (timm's resolve_self_attn_mask):
    is_causal wins over attn_mask; a bool mask is True where attention is allowed."""
    if is_causal:
        return like.new_full((n, n), float("-inf")).triu_(1)
    if attn_mask is None:
        return None
    if not isinstance(attn_mask, Tensor):
        raise TypeError(f"attn_mask must be a torch.Tensor or None, got {type(attn_mask).__name__}")
    if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
        # SDPA's rule; an integer 0/1 mask was silently added as a bias (a no-op mask)
        raise TypeError(f"attn_mask must be bool (True = attend) or floating (added to the scores), "
                        f"got {attn_mask.dtype}")
    if attn_mask.dtype == torch.bool:
        return torch.zeros_like(attn_mask, dtype=like.dtype).masked_fill_(~attn_mask, float("-inf"))
    return attn_mask


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection, as timm's
    ``timm.models.vision_transformer.Attention`` (timm 1.0): the same
    constructor arguments, submodules and parameter names (``qkv``, ``q_norm``,
    ``k_norm``, ``norm``, ``gate``, ``proj``), so a timm checkpoint loads with
    ``load_state_dict(strict=True)``; the same ``forward(x, attn_mask=None,
    is_causal=False)``.

    The attention itself runs on :func:`sslops.attention` (``backend`` picks the
    kernel), reading q, k, v in place from the qkv projection and writing the
    (B, N, H * D) input of ``proj`` directly.  Where the kernels lack a
    feature, the module computes the attention explicitly, as timm's unfused
    path does: an ``attn_mask``, attention dropout > 0 in training,
    ``need_weights=True`` (returns ``(x, attn)`` with attn (B, H, N, N), what
    DINO's ``get_last_selfattention`` needs), or ``fused_attn = False``.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        attn_head_dim: Optional[int] = None,
        dim_out: Optional[int] = None,
        qkv_bias: bool = False,
        qk_norm: bool = False,
        scale_norm: bool = False,
        proj_bias: bool = True,
        gated: bool = False,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        norm_layer: Optional[Type[nn.Module]] = None,
        device=None,
        dtype=None,
        *,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        _checks.integer(dim, "dim", 1)
        _checks.integer(num_heads, "num_heads", 1)
        if attn_head_dim is not None:
            _checks.integer(attn_head_dim, "attn_head_dim", 1)
        dim_out = dim_out or dim
        head_dim = attn_head_dim
        if head_dim is None:
            if dim % num_heads != 0:
                raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
            head_dim = dim // num_heads
        if (qk_norm or scale_norm) and norm_layer is None:
            raise ValueError("norm_layer must be provided if qk_norm or scale_norm is True")
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.attn_dim = num_heads * head_dim
        self.scale = head_dim ** -0.5
        self.fused_attn = True
        self.backend = _checks.choice(backend, "backend", _backend.BACKENDS)

        self.qkv = nn.Linear(dim, self.attn_dim * 3, bias=qkv_bias, **dd)
        self.q_norm = norm_layer(head_dim, **dd) if qk_norm else nn.Identity()
        self.k_norm = norm_layer(head_dim, **dd) if qk_norm else nn.Identity()
        self.attn_drop = nn.Dropout(attn_drop)
        self.norm = norm_layer(self.attn_dim, **dd) if scale_norm else nn.Identity()
        self.gate = nn.Linear(dim, self.attn_dim, bias=qkv_bias, **dd) if gated else None
        self.proj = nn.Linear(self.attn_dim, dim_out, bias=proj_bias, **dd)
        self.proj_drop = nn.Dropout(proj_drop)

    @classmethod
    def from_timm(cls, module: nn.Module, backend: str = "auto") -> "Attention":
        """An sslops Attention that adopts the submodules (and so the very
        parameter tensors, hooks and devices) of a timm Attention."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.num_heads = module.num_heads
        new.head_dim = getattr(module, "head_dim", module.qkv.out_features // (3 * module.num_heads))
        new.attn_dim = getattr(module, "attn_dim", new.num_heads * new.head_dim)
        new.scale = module.scale
        new.fused_attn = True
        new.backend = _checks.choice(backend, "backend", _backend.BACKENDS)
        new.qkv = module.qkv
        new.q_norm = module.q_norm
        new.k_norm = module.k_norm
        new.attn_drop = module.attn_drop
        new.norm = getattr(module, "norm", nn.Identity())
        new.gate = getattr(module, "gate", None)
        new.proj = module.proj
        new.proj_drop = module.proj_drop
        new.train(module.training)
        return new

    def _fused(self, attn_mask: Optional[Tensor], need_weights: bool, x: Tensor) -> bool:
        dropout = self.training and self.attn_drop.p > 0
        empty = x.shape[0] == 0 or x.shape[1] == 0  # the kernels refuse empty inputs; timm returns empty
        return self.fused_attn and attn_mask is None and not need_weights and not dropout and not empty

    def forward(self, x: Tensor, attn_mask: Optional[Tensor] = None, is_causal: bool = False, *,
                need_weights: bool = False):
        _checks.tensor(x, "x", ndim=3)
        _checks.boolean(is_causal, "is_causal")
        B, N, _ = x.shape
        H, D = self.num_heads, self.head_dim
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        q, k, v = self.qkv(x).reshape(B, N, 3, H, D).unbind(2)  # (B, N, H, D) views
        q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, N, D), no copies
        weights = None
        if self._fused(attn_mask, need_weights, x):
            x = attention(q, k, v, scale=self.scale, causal=is_causal, backend=self.backend)
        else:  # timm's explicit path
            attn = (q * self.scale) @ k.transpose(-2, -1)
            bias = _additive_mask(attn_mask, is_causal, N, attn)
            if bias is not None:
                attn = attn + bias
            attn = attn.softmax(dim=-1)
            weights = attn
            attn = self.attn_drop(attn)
            x = attn @ v
        x = x.transpose(1, 2).reshape(B, N, self.attn_dim)  # a view for the fused backends
        x = self.norm(x)
        if gate is not None:
            x = x * gate
        x = self.proj(x)
        x = self.proj_drop(x)
        return (x, weights) if need_weights else x

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, head_dim={self.head_dim}, backend={self.backend!r}"


def patch_timm(model: nn.Module, backend: str = "auto", strict: bool = True) -> nn.Module:
    """Swap every ``timm.models.vision_transformer.Attention`` of ``model`` (exact
    class; subclasses with their own forward are left alone) for an
    :class:`Attention` that adopts its parameters, in place; returns ``model``.

    >>> model = sslops.nn.patch_timm(timm.create_model("vit_base_patch16_224"))

    The state dict keeps its keys and tensors (checkpoints load both ways, an
    optimizer built before the call still holds the live parameters).  With
    ``strict`` (default) a model without any such block raises ValueError.
    """
    try:
        from timm.models.vision_transformer import Attention as TimmAttention
    except ImportError as exc:
        raise ImportError("patch_timm needs timm (pip install timm)") from exc
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    _checks.choice(backend, "backend", _backend.BACKENDS)
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is TimmAttention:
                setattr(parent, name, Attention.from_timm(child, backend))
                swapped += 1
    if strict and swapped == 0:
        raise ValueError(
            f"patch_timm found no timm.models.vision_transformer.Attention in {type(model).__name__}; "
            "pass strict=False to allow that"
        )
    return model

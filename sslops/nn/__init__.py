"""nn.Modules built on sslops' fused ops.

* :class:`Attention`: a drop-in for timm's ViT ``Attention`` running
  :func:`sslops.attention` (same constructor, parameter names and forward).
* :func:`patch_timm`: swaps every such block of an existing timm model in place.
"""
from .attention import Attention, patch_timm

__all__ = ["Attention", "patch_timm"]

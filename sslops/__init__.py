"""sslops: fused kernels for self-supervised learning.

Every op takes ``backend="auto" | "cuda" | "triton" | "cpu" | "reference"``;
see :func:`sslops.backends` for what this install can run.
"""
from ._backend import BACKENDS, backends, cuda_archs, cuda_built
from .nt_xent import InfoNCELoss, NTXentLoss, info_nce, nt_xent
from .sup_con import SupConLoss, sup_con
from .masking import block_masking, gather_tokens, random_masking, restore_tokens
from . import augment
from .attention import attention, attention_qkvpacked, attention_varlen
from . import nn
from .augment import AugmentParams, SSLViews, sample_params

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "backends",
    "cuda_built",
    "cuda_archs",
    "nt_xent",
    "info_nce",
    "NTXentLoss",
    "InfoNCELoss",
    "sup_con",
    "SupConLoss",
    "random_masking",
    "gather_tokens",
    "restore_tokens",
    "block_masking",
    "augment",
    "AugmentParams",
    "SSLViews",
    "sample_params",
    "attention",
    "attention_qkvpacked",
    "attention_varlen",
    "nn",
]

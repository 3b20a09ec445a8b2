"""Triton kernels for sslops (installed as ``sslops.triton_kernels``).

Submodules import triton themselves; this package file deliberately imports
nothing so that ``import sslops.triton_kernels`` works without triton.

* ``nt_xent``: flash-style contrastive log-sum-exp (NT-Xent / InfoNCE) forward
  and backward kernels that never materialise the (M, Kc) logits matrix.
"""

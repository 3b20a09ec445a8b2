"""Triton kernels for sslops (installed as ``sslops.triton_kernels``).

Submodules import triton themselves; this package file deliberately imports
nothing so that ``import sslops.triton_kernels`` works without triton.

* ``nt_xent``: flash-style contrastive log-sum-exp (NT-Xent / InfoNCE) forward
  and backward kernels that never materialise the (M, Kc) logits matrix.
* ``masking``: gather / restore of ViT tokens (MAE, data2vec 2.0, I-JEPA) and
  their backward passes.
* ``augment``: fused per-sample SSL augmentation views (crop-resize, flip,
  colour jitter, grayscale, blur, solarize, normalise).
* ``attention``: flash-style exact attention, dense and varlen, forward and
  backward (delta pre-pass, separate dk/dv and dq passes, no atomics).
"""

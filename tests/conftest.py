"""Test-session settings; they must be in place before torch/triton import."""
import os

# Every kernel output starts as NaN/-1 (see sslops._checks.new_output and
# csrc/common/output.h), so unwritten elements fail the comparisons.
os.environ.setdefault("SSLOPS_POISON", "1")

# Without a GPU the Triton kernels run in the interpreter (fp32 only).
if os.environ.get("TRITON_INTERPRET") is None:
    try:
        import torch

        if not torch.cuda.is_available():
            os.environ["TRITON_INTERPRET"] = "1"
    except ImportError:  # pragma: no cover
        pass

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


import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _emu_backend(request):
    """Tests marked ``emu`` run csrc/cuda's kernels on the CPU under the CUDA
    emulator (backend="emu"): load it, building it on first use (minutes;
    cached in build/emu).  A build failure fails these tests."""
    if request.node.get_closest_marker("emu") is not None:
        from sslops import _emu

        _emu.load()

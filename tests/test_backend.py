"""Backend choice (sslops/_backend.py): host logic that needs no GPU."""
import importlib.util
import os

import pytest
import torch

import sslops
from sslops import _backend

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUILD = ("sm_80", "sm_90", "compute_90")  # the default TORCH_CUDA_ARCH_LIST="8.0;9.0+PTX"


@pytest.mark.parametrize("cap,covered", [
    ((7, 5), False),   # Turing: no sm_7x image, and PTX compute_90 cannot run on an older GPU
    ((8, 0), True), ((8, 6), True), ((8, 9), True),  # sm_80 images run on every 8.x
    ((9, 0), True),
    ((10, 0), True), ((12, 0), True),  # newer GPUs JIT-compile the compute_90 PTX
])
def test_arch_covered(cap, covered):
    assert _backend.arch_covered(cap, BUILD) is covered


def test_arch_covered_without_ptx_and_odd_names():
    assert not _backend.arch_covered((10, 0), ("sm_80", "sm_90"))  # no PTX: nothing for Blackwell
    assert not _backend.arch_covered((8, 6), ("sm_89",))  # an image for a higher minor does not run
    assert not _backend.arch_covered((9, 0), ("sm_90a",))  # arch-specific images are ignored
    assert not _backend.arch_covered((9, 0), ())


def _fake_gpu(monkeypatch, cap, archs=BUILD):
    """A CUDA build on a GPU of compute capability ``cap``, without a GPU."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: cap)
    monkeypatch.setattr(_backend, "cuda_built", lambda: True)
    monkeypatch.setattr(_backend, "cuda_archs", lambda: archs)
    monkeypatch.setattr(_backend, "_has_kernels", lambda names, key: True)


@pytest.mark.parametrize("op", ["gather_tokens", "augment", "nt_xent"])
def test_auto_skips_cuda_on_a_gpu_the_build_does_not_cover(monkeypatch, op):
    _fake_gpu(monkeypatch, (7, 5))
    assert "cuda" not in sslops.backends(op, "cuda")
    assert _backend.resolve(op, "auto", torch.device("cuda")) != "cuda"
    with pytest.raises(ValueError, match=r"sm_75 GPU; rebuild with TORCH_CUDA_ARCH_LIST=\"7.5\""):
        _backend.resolve(op, "cuda", torch.device("cuda"))


def test_auto_picks_cuda_on_covered_gpus(monkeypatch):
    for cap in ((8, 6), (9, 0), (10, 0)):
        _fake_gpu(monkeypatch, cap)
        assert sslops.backends("gather_tokens", "cuda:0")[0] == "cuda"
        assert _backend.resolve("gather_tokens", "auto", torch.device("cuda", 0)) == "cuda"


def test_the_build_records_its_archs():
    spec = importlib.util.spec_from_file_location("sslops_setup", os.path.join(ROOT, "setup.py"))
    setup = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(setup)  # defines the helpers; setup() runs only as __main__
    assert setup._arch_tokens("8.0;9.0+PTX") == "sm_80,sm_90,compute_90"
    assert setup._arch_tokens("7.5 8.6") == "sm_75,sm_86"
    if _backend.cuda_built():
        assert sslops.cuda_archs() and all(a.startswith(("sm_", "compute_")) for a in sslops.cuda_archs())
    elif _backend.compiled_available():
        assert sslops.cuda_archs() == () and torch.ops.sslops._cuda_archs() == ""

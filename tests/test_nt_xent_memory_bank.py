"""sslops.NTXentLoss with a memory bank against lightly 1.6's NTXentLoss
(MoCo-style negatives from a FIFO bank of normalised out1), step by step."""
import contextlib

import pytest
import torch

import sslops

lightly_loss = pytest.importorskip("lightly.loss")

K, D, T = 16, 8, 0.3
# Batch sizes walk the FIFO through lightly's cases: a partial fill, an exact
# wrap, rows past the end dropped, an evaluation step (no update), a batch as
# large as the bank.  (n, train)
STEPS = [(5, True), (7, True), (6, True), (3, True), (4, False), (16, True), (1, True)]


def _pair(seed=0, dtype=torch.float64, backend="auto"):
    torch.manual_seed(seed)
    ref = lightly_loss.NTXentLoss(T, memory_bank_size=(K, D)).to(dtype)
    torch.manual_seed(seed)
    ours = sslops.NTXentLoss(T, memory_bank_size=(K, D), backend=backend).to(dtype)
    return ref, ours


def _step(module, a, b, train):
    a, b = a.clone().requires_grad_(train), b.clone().requires_grad_(train)
    with contextlib.nullcontext() if train else torch.no_grad():
        loss = module(a, b)
    if not train:
        return loss, None, None
    loss.backward()
    return loss.detach(), a.grad, b.grad


def _batches(dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    for n, train in STEPS:
        a = torch.randn(n, D, generator=g, dtype=torch.float64) * 3
        b = a + torch.randn(n, D, generator=g, dtype=torch.float64)
        yield a.to(dtype), b.to(dtype), train


@pytest.mark.parametrize("dtype,backend", [
    *[(torch.float64, b) for b in sslops.backends("info_nce", "cpu", torch.float64)],
    *[(torch.float32, b) for b in sslops.backends("info_nce", "cpu", torch.float32)],
])
def test_matches_lightly_over_steps(dtype, backend):
    ref, ours = _pair(dtype=dtype, backend=backend)
    assert torch.equal(ours.memory_bank.bank, ref.memory_bank.bank)  # same initialisation, same RNG draws
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-6)
    for a, b, train in _batches(dtype):
        want, got = _step(ref, a, b, train), _step(ours, a, b, train)
        for w, g in zip(want, got):
            if w is not None:
                torch.testing.assert_close(g, w, **tol)
        # the bank after the step: lightly's FIFO order, pointer included
        torch.testing.assert_close(ours.memory_bank.bank, ref.memory_bank.bank, **tol)
        assert int(ours.memory_bank.bank_ptr) == int(ref.memory_bank.bank_ptr)
        assert not ours.memory_bank.bank.requires_grad


def test_bank_holds_normalised_out1_in_fifo_order():
    torch.manual_seed(0)
    m = sslops.NTXentLoss(T, memory_bank_size=(6, 3))
    b1, b2 = torch.randn(4, 3), torch.randn(4, 3)
    unit = lambda x: torch.nn.functional.normalize(x, dim=1)
    m(torch.randn(4, 3, requires_grad=True), b1)
    torch.testing.assert_close(m.memory_bank.bank[:4], unit(b1))
    m(torch.randn(4, 3, requires_grad=True), b2)  # 4 + 4 >= 6: two rows fit, two dropped, pointer to 0
    torch.testing.assert_close(m.memory_bank.bank[4:], unit(b2)[:2])
    assert int(m.memory_bank.bank_ptr) == 0


def test_state_dict_round_trip_resumes_identically():
    _, ours = _pair(seed=3)
    steps = list(_batches(torch.float64, seed=5))
    for a, b, train in steps[:3]:
        _step(ours, a, b, train)
    state = ours.state_dict()
    assert set(state) == {"memory_bank.bank", "memory_bank.bank_ptr"}
    torch.manual_seed(99)  # a different random bank, overwritten by the load
    resumed = sslops.NTXentLoss(T, memory_bank_size=(K, D)).to(torch.float64)
    resumed.load_state_dict(state)
    for a, b, train in steps[3:]:
        want, got = _step(ours, a, b, train), _step(resumed, a, b, train)
        for w, g in zip(want, got):
            if w is not None:
                assert torch.equal(g, w)


def test_to_moves_the_bank():
    m = sslops.NTXentLoss(memory_bank_size=(K, D))
    assert m.memory_bank.bank.dtype == torch.float32
    m = m.to(torch.float64)
    assert m.memory_bank.bank.dtype == torch.float64 and m.memory_bank.bank_ptr.dtype == torch.long
    # a float32 bank used with float64 embeddings is cast to them (lightly raises there)
    m32 = sslops.NTXentLoss(memory_bank_size=(K, D))
    m32.memory_bank.bank.copy_(m.memory_bank.bank)
    a, b = torch.randn(4, D, dtype=torch.float64), torch.randn(4, D, dtype=torch.float64)
    torch.testing.assert_close(m32(a, b), m(a, b), rtol=1e-6, atol=1e-6)


def test_no_bank_is_nt_xent():
    a, b = torch.randn(6, D), torch.randn(6, D)
    for size in (0, (0, D), None):
        m = sslops.NTXentLoss(T, memory_bank_size=size)
        assert m.memory_bank is None and m.state_dict() == {}
        torch.testing.assert_close(m(a, b), sslops.nt_xent(a, b, T))


@pytest.mark.parametrize("size,match", [
    (16, r"memory_bank_size=16 does not specify the feature dimension"),
    (-1, "memory_bank_size"), ((16, -2), "memory_bank_size"), ((16, 8, 2), "memory_bank_size"),
    ((16.0, 8), "memory_bank_size"), ("16", "memory_bank_size"),
])
def test_bad_memory_bank_size(size, match):
    with pytest.raises(ValueError, match=match):
        sslops.NTXentLoss(memory_bank_size=size)


def test_bare_int_refused_like_lightly():
    with pytest.raises(ValueError, match="feature dimension"):
        lightly_loss.NTXentLoss(memory_bank_size=16)


def test_bank_width_differs_from_embeddings():
    m = sslops.NTXentLoss(memory_bank_size=(K, D))
    with pytest.raises(ValueError, match=r"memory_bank_size=\(16, 8\).*D = 5"):
        m(torch.randn(4, 5), torch.randn(4, 5))


def test_bank_refuses_non_tensors():
    m = sslops.NTXentLoss(memory_bank_size=(K, D))
    bank = m.memory_bank.bank.clone()
    with pytest.raises(TypeError, match="out0 must be a torch.Tensor, got list"):  # was an AttributeError
        m([[0.0] * D] * 4, torch.randn(4, D))
    with pytest.raises(TypeError, match="out1 must be a torch.Tensor, got ndarray"):
        m(torch.randn(4, D, requires_grad=True), torch.randn(4, D).numpy())
    assert torch.equal(m.memory_bank.bank, bank) and int(m.memory_bank.bank_ptr) == 0  # nothing pushed

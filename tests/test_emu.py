"""The CUDA emulator's own tests (csrc/emu, backend "emu").

* Purpose-written kernels (csrc/emu/selftest.cu) that must trip each detector,
  and correct ones that must pass and compute the documented results
  (mma.sync / ldmatrix lane layouts, WMMA, shuffles, votes, cp.async, RNE
  conversions, the fp32 accumulation inside the tensor-core ops).
* The emu backend's place among the backends.
* A mutation test: seeded bugs in copies of the real kernels (a removed
  __syncthreads, a tail mask off by one, a WMMA fragment with the wrong
  layout, a dropped cp.async wait) make the emulated tests fail.  The emulator
  knows nothing about the mutations: each mutant is built like the real
  kernels and the unmodified tests run against it in a subprocess.

Run only the emulated tests with ``pytest -q -m emu tests/``.
"""
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import sslops
from sslops import _backend

pytestmark = pytest.mark.emu

ROOT = Path(__file__).resolve().parent.parent


def st(name, x):
    return torch.ops.sslops_emu._selftest(name, x)


def ar(n):
    return torch.arange(1, n + 1, dtype=torch.float32)


# ----------------------------------------------------------------------------
# Detectors: each seeded kernel bug raises a RuntimeError naming kernel,
# block, thread and the problem.
# ----------------------------------------------------------------------------
DETECTORS = [
    # (self-test, input size, message)
    ("rotate1", 64, r"reads `s`\[byte 4\], which no thread has written since the kernel started"),
    ("rotate2", 64, r"data race on `s`\[byte 0\]: thread 0 writes it after thread 63 read it"),
    ("rotate3", 64, r"data race on `s`\[byte 252\]: thread 0 reads it and thread 63 wrote it"),
    ("warp_sync1", 32, r"data race on `s`\[byte 124\]"),
    ("divergent_barrier", 64, r"divergent __syncthreads: reaches the barrier at selftest.cu:\d+ while 32 threads wait"),
    ("exit_before_barrier", 64, r"thread \(48, 0, 0\).*exits while 48 threads wait at __syncthreads"),
    ("shfl1", 64, r"calls __shfl_down_sync .* with mask 0xffff0000, which does not include its own lane 0"),
    ("shfl2", 64, r"mask 0xffffffff, which names lane 16, but the block has 48 threads \(warp 1 has only 16 lanes\)"),
    ("shfl3", 64, r"thread \(31, 0, 0\).*exits while lane 0 waits for it in a warp shuffle"),
    ("shfl4", 64, r"__shfl_down_sync: lane 15 reads lane 16, which is not in the mask 0x0000ffff"),
    ("shfl5", 64, r"lanes disagree: lane 16 calls __shfl_down_sync with mask 0xffff0000 .* lane 0 waits in "
                  r"__shfl_down_sync with mask 0xffffffff"),
    ("deadlock", 32, r"reaches __syncthreads at selftest.cu:\d+ while lane 0 waits for it in a warp shuffle"),
    ("static_oob", 64, r"thread \(63, 0, 0\).*writes 4 bytes of shared memory out of bounds: .*past the end of `s` "
                       r"\(256 bytes\)"),
    ("dynamic_oob1", 64, r"reads 4 bytes of shared memory out of bounds: .*past the end of `dyn` \(128 bytes of "
                         r"dynamic shared memory\)"),
    ("uninit", 64, r"reads `s`\[byte 252\], which no thread has written"),
    ("global_oob0", 64, r"thread \(63, 0, 0\).*writes 4 bytes of global memory at 0x[0-9a-f]+, outside every tensor"),
    ("other_stack", 64, r"writes the local memory \(stack\) of thread 1"),
    ("cp_async1", 256, r"reads `s`\[byte 0\] while a cp.async into it, issued by thread 0, has not been waited for"),
    ("cp_async3", 256, r"reads `s`\[byte 512\] while a cp.async into it, issued by thread 0, has not been waited for"),
    ("cp_async4", 256, r"exits with 2 cp.async copies it never waited for"),
    ("wmma2", 768, r"wmma::load_matrix_sync: the pointer 0x[0-9a-f]+ is not 256-bit \(32-byte\) aligned"),
    ("big_smem65536", 64, r"CUDA error \(emulated GPU\): invalid argument"),  # > 48 KB without opting in
]


@pytest.mark.parametrize("name,n,match", DETECTORS, ids=[d[0] for d in DETECTORS])
def test_detector(name, n, match):
    with pytest.raises(RuntimeError, match=match) as info:
        st(name, ar(n))
    if "CUDA error" not in match:  # errors found while running name kernel, block and thread
        assert re.search(r"kernel \w+ \(launched from .*\), block \(0, 0, 0\), thread \(\d+, 0, 0\)", str(info.value))


def test_device_side_assert():
    with pytest.raises(RuntimeError, match=r"device-side assert triggered at selftest.cu:\d+ in assert_kernel: .*"
                                           r"selftest: negative input"):
        st("assert", ar(32) - 3)
    assert torch.equal(st("assert", ar(32))[:32], ar(32))  # no false alarm


def test_errors_do_not_stick():
    """A failed launch raises once; the next launch is unaffected (the error is not sticky)."""
    with pytest.raises(RuntimeError):
        st("rotate1", ar(64))
    torch.testing.assert_close(st("rotate0", ar(64))[:64], torch.roll(ar(64), -1))


# ----------------------------------------------------------------------------
# Correct kernels pass and compute the documented results
# ----------------------------------------------------------------------------
def test_barriers_and_block_reductions():
    torch.testing.assert_close(st("rotate0", ar(64))[:64], torch.roll(ar(64), -1))
    assert st("count", ar(64))[:3].tolist() == [22.0, 1.0, 1.0]  # __syncthreads_count / _and / _or


@pytest.mark.parametrize("mode", [0, 2], ids=["syncwarp", "shuffle"])
def test_warp_synchronous_shared_memory_is_ordered(mode):
    x = ar(32)
    torch.testing.assert_close(st(f"warp_sync{mode}", x)[:32], torch.roll(x, 1))


def _shfl_down_reduce(v):
    s = list(v)
    off = 16
    while off:
        s = [s[i] + (s[i + off] if i + off < 32 else s[i]) for i in range(32)]
        off //= 2
    return s


def test_shuffles_and_votes():
    x = torch.randn(64, generator=torch.Generator().manual_seed(0))
    out = st("shfl0", x).view(64, 6).double()
    for w in range(2):
        v = x[32 * w : 32 * w + 32].double().tolist()
        o = out[32 * w : 32 * w + 32]
        torch.testing.assert_close(o[:, 0], torch.tensor(_shfl_down_reduce(v), dtype=torch.float64), rtol=1e-6, atol=1e-5)
        assert torch.all(o[:, 1] == max(v))  # xor butterfly: every lane has the max
        assert o[:, 2].tolist() == [v[i - 3] if i >= 3 else v[i] for i in range(32)]  # shfl_up 3
        assert o[:, 3].tolist() == [v[(i // 16) * 16 + 7] for i in range(32)]  # shfl idx 7, width 16
        ballot = sum(1 << i for i in range(32) if v[i] > 0)
        lo, hi = torch.tensor(float(ballot & 0xFFFF)), torch.tensor(65536.0 * (ballot >> 16))  # float32, as the kernel
        assert torch.all(o[:, 4] == (lo + hi).double())
        assert torch.all(o[:, 5] == 3.0)  # any(lane == 9) + 2 * all(lane < 40)


def test_atomics():
    # 64 threads: global atomicAdd(0.5f), shared atomicAdd(1) and atomicMax(tid)
    assert st("atomics", ar(1)).tolist() == [32.0, 64.0, 63.0]


def test_in_bounds_neighbours_pass():
    assert st("dynamic_oob0", ar(64))[:32].tolist() == [float(i) for i in range(32)]
    out = st("global_oob1", ar(64))  # 63 threads write out[1..63]: in bounds
    assert torch.equal(out[1:], ar(63))


def test_cp_async_lands_at_its_wait():
    x = ar(256)
    shifted = torch.cat([x[4 * ((t + 1) % 32): 4 * ((t + 1) % 32) + 4] for t in range(32)])
    assert torch.equal(st("cp_async0", x), shifted)  # wait_all
    assert torch.equal(st("cp_async2", x), shifted)  # wait_group<1> completes the first group
    out = st("cp_async_zfill", x)
    want = []
    for t in range(32):
        u = (t + 1) % 32
        want += [x[4 * u + i].item() if (u % 2 == 0 or i < 2) else 0.0 for i in range(4)]
    assert out[:128].tolist() == want  # odd threads copied 8 of 16 bytes: the rest is zero-filled
    assert torch.equal(out[128:], x[200 + (torch.arange(32) + 1) % 32])  # cp.async.ca, 4 bytes


def _mma_inputs(seed, n=8, k=16):
    g = torch.Generator().manual_seed(seed)
    a = torch.randint(-4, 5, (16, k), generator=g).float()
    b = torch.randint(-4, 5, (k, n), generator=g).float()
    c = torch.randint(-20, 21, (16, n), generator=g).float()
    return a, b, c


@pytest.mark.parametrize("dtype", ["f16", "bf16"])
@pytest.mark.parametrize("mode", [0, 2], ids=["registers", "ldmatrix"])
def test_mma_sync_m16n8k16_layout(dtype, mode):
    """Fragments built from the PTX ISA's lane layout (mode 0) or loaded with
    ldmatrix.x4 / .x2.trans (mode 2) give D = A B + C (exact small integers)."""
    a, b, c = _mma_inputs(1)
    d = st(f"mma_{dtype}_{mode}", torch.cat([a.flatten(), b.flatten(), c.flatten()])).view(16, 8)
    assert torch.equal(d, a @ b + c)


def test_mma_sync_wrong_lane_mapping_fails():
    a, b, c = _mma_inputs(2)
    d = st("mma_f16_1", torch.cat([a.flatten(), b.flatten(), c.flatten()])).view(16, 8)
    assert not torch.equal(d, a @ b + c)


def _fp32_sequential(a16, b16, c):
    """The emulated tensor-core arithmetic: inputs as stored (half/bf16), exact
    products, a float32 sum in k order."""
    a, b, c = (np.asarray(t, dtype=np.float32) for t in (a16, b16, c))
    d = np.empty((a.shape[0], b.shape[1]), dtype=np.float32)
    for m in range(a.shape[0]):
        for n in range(b.shape[1]):
            acc = np.float32(c[m, n])
            for k in range(a.shape[1]):
                acc = np.float32(acc + np.float32(a[m, k] * b[k, n]))
            d[m, n] = acc
    return torch.from_numpy(d)


@pytest.mark.parametrize("dtype", ["f16", "bf16"])
def test_mma_sync_rounds_inputs_and_accumulates_in_fp32(dtype):
    tdt = torch.float16 if dtype == "f16" else torch.bfloat16
    g = torch.Generator().manual_seed(3)
    a = torch.randn(16, 16, generator=g)
    b = torch.randn(16, 8, generator=g)
    c = torch.randn(16, 8, generator=g)
    a[0, :3] = torch.tensor([4096.0, 1.0, -4096.0])  # 2^24 + 1 - 2^24: float32 loses the 1
    b[:3, 0] = torch.tensor([4096.0, 1.0, 4096.0])
    a[0, 3:], c[0, 0] = 0.0, 0.0
    d = st(f"mma_{dtype}_0", torch.cat([a.flatten(), b.flatten(), c.flatten()])).view(16, 8)
    want = _fp32_sequential(a.to(tdt).float(), b.to(tdt).float(), c)
    assert torch.equal(d, want)
    assert d[0, 0] == 0.0  # float64 would give 1


def test_ldmatrix_lane_layout():
    x = ar(256)  # 4 stacked 8x8 matrices, row-major
    m = x.view(4, 8, 8)
    for trans in (0, 1):
        out = st(f"ldmatrix{trans}", x).view(32, 4, 2)
        for lane in range(32):
            g, t = lane // 4, lane % 4
            for j in range(4):
                want = [m[j, 2 * t, g], m[j, 2 * t + 1, g]] if trans else [m[j, g, 2 * t], m[j, g, 2 * t + 1]]
                assert out[lane, j].tolist() == [w.item() for w in want], (trans, lane, j)


@pytest.mark.parametrize("mode", [0, 1], ids=["b_row_major", "b_col_major"])
def test_wmma_16x16x16(mode):
    g = torch.Generator().manual_seed(4)
    a = torch.randint(-4, 5, (16, 16), generator=g).float()
    b = torch.randint(-4, 5, (16, 16), generator=g).float()
    c = torch.randint(-9, 10, (16, 16), generator=g).float()
    d = st(f"wmma{mode}", torch.cat([a.flatten(), b.flatten(), c.flatten()])).view(16, 16)
    assert torch.equal(d, a @ b + c)


def test_half_and_bfloat16_conversions_round_to_nearest_even():
    vals = [0.0, -0.0, 1.0, 1.0 + 2 ** -11, 1.0 + 3 * 2 ** -11, 1.0 + 2 ** -8, 1.0 + 3 * 2 ** -8, 65504.0, 65520.0,
            1e6, 2 ** -24, 2 ** -25, 3 * 2 ** -26, 6e-8, 1e-40, -3.3, float("inf"), -float("inf"), 0.1, 3.14159]
    x = torch.tensor(vals + torch.randn(100, generator=torch.Generator().manual_seed(5)).tolist())
    out = st("convert", x).view(-1, 2)
    assert torch.equal(out[:, 0], x.to(torch.float16).float())
    assert torch.equal(out[:, 1], x.to(torch.bfloat16).float())
    assert torch.isnan(st("convert", torch.tensor([float("nan")]))).all()


# ----------------------------------------------------------------------------
# The emulated device and its host API
# ----------------------------------------------------------------------------
def test_device_properties_and_opt_in_shared_memory():
    from sslops import _emu

    for dev, optin in (("h100", 227 * 1024), ("a100", 163 * 1024)):
        with _emu.emulated_device(dev):
            assert _emu.device() == dev
            ok = f"big_smem{optin}_attr"
            assert torch.all(st(ok, ar(64))[:64] == 1.0)  # the opt-in maximum works
            with pytest.raises(RuntimeError, match="invalid argument"):  # one float more does not
                st(f"big_smem{optin + 4}_attr", ar(64))
    with pytest.raises(ValueError, match="h100"):
        _emu.set_device("v100")


def test_launch_runs_every_thread_as_a_fiber():
    from sslops import _emu

    before = _emu.stats()
    st("rotate0", ar(64))
    after = _emu.stats()
    assert after["launches"] == before["launches"] + 1
    assert after["threads"] == before["threads"] + 64


# ----------------------------------------------------------------------------
# The emu backend among the others
# ----------------------------------------------------------------------------
def test_emu_backend_listed_never_auto(monkeypatch):
    for op in ("nt_xent", "info_nce", "gather_tokens", "random_masking", "restore_tokens", "augment"):
        names = sslops.backends(op, "cpu")
        assert "emu" in names and names[-1] == "reference", (op, names)
        assert _backend.resolve(op, "auto", torch.device("cpu")) != "emu"
    assert "emu" not in sslops.backends("nt_xent", "cuda")
    with pytest.raises(ValueError, match="the emulated CUDA kernels take CPU tensors"):
        _backend.resolve("nt_xent", "emu", torch.device("cuda"))
    monkeypatch.setenv("SSLOPS_BACKEND", "emu")
    assert _backend.resolve("nt_xent", "auto", torch.device("cpu")) == "emu"  # asked for by name
    monkeypatch.setattr(_backend, "_EMU_LOADED", False)
    with pytest.raises(ValueError, match=r"not loaded: call sslops._emu.load\(\)"):
        _backend.resolve("nt_xent", "emu", torch.device("cpu"))


def test_every_cuda_op_has_an_emulated_kernel():
    """Each op a csrc/cuda/*.cu file registers (SSLOPS_CUDA_LIBRARY_IMPL) runs
    under the emulator, with the schema csrc/sslops.cpp defines."""
    names = set()
    for cu in (ROOT / "csrc" / "cuda").glob("*.cu"):
        names |= set(re.findall(r'm\.impl\("(\w+)"', cu.read_text()))
    assert {"nt_xent_lse", "gather_tokens", "augment"} <= names
    for name in sorted(names):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"sslops_emu::{name}", "CPU"), name
        emu = getattr(torch.ops.sslops_emu, name).default._schema
        real = getattr(torch.ops.sslops, name).default._schema
        assert str(emu).replace("sslops_emu::", "sslops::") == str(real), name


# ----------------------------------------------------------------------------
# Mutation test
# ----------------------------------------------------------------------------
# (id, kernel file, text, replacement, test file, -k selection).  Each
# mutation must change exactly one place.  SSLOPS_EMU_MUTATIONS=all adds the
# extra ones (more builds).
MUTATIONS = [
    ("remove-syncthreads", "augment.cu",
     "    pre[2 * ext * ext + i] = b;\n  }\n  __syncthreads();\n",
     "    pre[2 * ext * ext + i] = b;\n  }\n",
     "tests/test_augment.py", "test_blur_kernel_sizes"),
    ("tail-mask-off-by-one", "masking.cu",
     "    for (int64_t v = threadIdx.x; v < packs; v += blockDim.x) {\n      auto a = load_pack<VEC>(xr + v * VEC);",
     "    for (int64_t v = threadIdx.x; v <= packs; v += blockDim.x) {\n      auto a = load_pack<VEC>(xr + v * VEC);",
     "tests/test_masking.py", "test_gather_cpu_exact_odd_shapes"),
    ("wmma-fragment-layout", "nt_xent.cu",
     "using FragBcol = wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major>;",
     "using FragBcol = wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major>;",
     "tests/test_nt_xent.py", "test_gpu_backends_match_float64 and emu-h100-3x64"),
    ("drop-cp-async-wait", "nt_xent.cu",
     "      copy_async_wait_all();\n      __syncthreads();  // (A)",
     "      __syncthreads();  // (A)",
     "tests/test_nt_xent.py", "test_gpu_backends_match_float64 and emu-h100-3x64"),
    ("attention-remove-tile-barrier", "attention.cu",
     "    __syncthreads();  // tile it has landed; everybody is done with tile it - 1 (the other buffer)\n"
     "    if (it + 1 < n_tiles) {  // prefetch",
     "    if (it + 1 < n_tiles) {  // prefetch",
     "tests/test_attention.py", "test_emu_against_float64 and 65x65-32-full-fp16"),
    ("attention-p-fragment-lanes", "attention.cu",
     "  a[1] = pack<T>(c[2 * kk][2], c[2 * kk][3]);\n  a[2] = pack<T>(c[2 * kk + 1][0], c[2 * kk + 1][1]);",
     "  a[1] = pack<T>(c[2 * kk + 1][0], c[2 * kk + 1][1]);\n  a[2] = pack<T>(c[2 * kk][2], c[2 * kk][3]);",
     "tests/test_attention.py", "test_emu_against_float64 and 65x65-32-full-fp16"),
    ("sup_con-remove-label-barrier", "sup_con.cu",
     "    __syncthreads();  // col_lab complete\n", "",
     "tests/test_sup_con.py", "test_stats_and_backward_vs_float64 and emu-float32"),
]
EXTRA_MUTATIONS = [
    ("sup_con-backward-positive-mask", "sup_con.cu",
     "          if (col_lab[jj] == lab[a]) {", "          if (col_lab[jj] != lab[a]) {",
     "tests/test_sup_con.py", "test_stats_and_backward_vs_float64 and emu-float32"),
    ("attention-drop-cp-async-wait", "attention.cu",
     "  ptx::cp_async_commit();\n  ptx::cp_async_wait_all();\n  __syncthreads();\n  uint32_t qa[G::kSteps][4], da",
     "  ptx::cp_async_commit();\n  __syncthreads();\n  uint32_t qa[G::kSteps][4], da",
     "tests/test_attention.py", "test_emu_against_float64 and 65x65-32-full-fp16"),
    ("attention-causal-dkdv-start", "attention.cu",
     "am::q_begin(j0, a.causal) / kStream * kStream", "(am::q_begin(j0, a.causal) + kStream) / kStream * kStream",
     "tests/test_attention.py", "test_emu_against_float64 and 65x65-32-causal-fp16"),
    ("nt_xent-remove-barrier-B", "nt_xent.cu",
     "    __syncthreads();  // (B) logit tile complete\n", "",
     "tests/test_nt_xent.py", "test_gpu_backends_match_float64 and emu-h100-3x64"),
    ("nt_xent-tail-row-off-by-one", "nt_xent.cu",
     "      if (gr < n_rows && k0 + col < D) {", "      if (gr <= n_rows && k0 + col < D) {",
     "tests/test_nt_xent.py", "test_gpu_backends_match_float64 and emu-h100-3x64"),
    ("augment-tile-tail-off-by-one", "augment.cu",
     "      if (y >= S || x >= S) continue;\n      float r, g, b;\n      preblur_pixel",
     "      if (y > S || x > S) continue;\n      float r, g, b;\n      preblur_pixel",
     "tests/test_augment.py", "test_geometry"),
    ("masking-restore-backward-scan-off-by-one", "masking.cu",
     "        for (int64_t n = n0; n < n1; ++n) {", "        for (int64_t n = n0; n <= n1; ++n) {",
     "tests/test_masking.py", "test_restore_equals_mae_decoder"),
]
SELECTED = MUTATIONS + (EXTRA_MUTATIONS if os.environ.get("SSLOPS_EMU_MUTATIONS") == "all" else [])


def _pytest_env(extra):
    env = dict(os.environ)
    env.update(extra)
    env.pop("PYTEST_ADDOPTS", None)
    env.setdefault("MAX_JOBS", "2")
    return env


def _run_selection(test_file, selection, env):
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-m", "emu", "-p", "no:cacheprovider", "-k", selection, test_file]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)


@pytest.mark.slow
@pytest.mark.parametrize("mutation", SELECTED, ids=[m[0] for m in SELECTED])
def test_mutant_fails_the_emulated_tests(mutation):
    from sslops import _emu

    ident, kernel, old, new, test_file, selection = mutation
    source = (ROOT / "csrc" / "cuda" / kernel).read_text()
    assert source.count(old) == 1, f"{ident}: the mutated text must occur exactly once in {kernel}"
    work = _emu.build_dir() / "mutants" / ident  # kept: a rerun with the same mutant rebuilds nothing
    work.mkdir(parents=True, exist_ok=True)
    mutant = work / kernel
    text = source.replace(old, new)
    if not mutant.exists() or mutant.read_text() != text:
        mutant.write_text(text)
    # Build the mutant first: a mutant that does not compile must not count as caught.
    env = _pytest_env({"SSLOPS_EMU_KERNEL_SOURCES": str(mutant), "SSLOPS_EMU_KERNELS_DIR": str(work / "build")})
    build = subprocess.run([sys.executable, "-c", "import sslops._emu as e; print(e.load())"], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=1800)
    assert build.returncode == 0, f"{ident}: the mutant does not build:\n{build.stdout}\n{build.stderr[-4000:]}"
    lib = build.stdout.strip().splitlines()[-1]
    # The unmodified tests against the mutant: they must fail (exit status 1: test failures).
    run = _run_selection(test_file, selection, _pytest_env({"SSLOPS_EMU_KERNELS": lib}))
    out = run.stdout + run.stderr
    assert run.returncode == 1 and re.search(r"\d+ failed", out), (
        f"{ident}: the emulated tests did not catch the mutant (exit status {run.returncode}):\n{out[-4000:]}"
    )
    caught = re.findall(r"^E\s+(?:RuntimeError|AssertionError): (.*)$", out, re.M)
    reason = caught[0] if caught else out[-300:]
    kernel = re.search(r"kernel (.+?) \(launched", reason)
    where = f"kernel {kernel.group(1)}: " if kernel else ""
    print(f"\n{ident}: caught by {test_file} -k '{selection}': {where}{reason.split(']: ', 1)[-1][:240]}")


@pytest.mark.slow
def test_mutation_harness_passes_the_real_kernels():
    """Control: the same subprocess runs pass against the unmodified kernels."""
    from sslops import _emu

    lib = _emu.load()
    for test_file, selection in sorted({(m[4], m[5]) for m in SELECTED}):
        run = _run_selection(test_file, selection, _pytest_env({"SSLOPS_EMU_KERNELS": lib}))
        assert run.returncode == 0, f"{test_file} -k '{selection}':\n{(run.stdout + run.stderr)[-4000:]}"

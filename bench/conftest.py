"""Shared benchmark helpers: peak-memory probes and a side-by-side summary.

Every benchmark calls ``record(group, impl, benchmark, peak_mb=..., baseline=...)``
after ``benchmark(...)``; at the end of the run a table per group prints each
implementation's mean time, its speed-up over the group's baseline measured in
the same run, its extra peak memory, TFLOP/s when ``flops=`` is given, and a
rate column with ``throughput=(items, unit)`` (e.g. ``(batch, "img/s")``: items
per call over the time); ``stat="min"`` uses the best round instead of the mean,
``stat="median"`` the middle one (for noisy machines).  ``rounds_for`` sizes the
rounds of a short call so that its statistic is not five samples of noise.
"""
from __future__ import annotations

import collections
import contextlib
import ctypes
import gc
import os

import pytest
import torch

_ROWS = collections.defaultdict(list)  # group -> [(impl, seconds, peak_mb, baseline, throughput, stat)]
_FLOPS = {}  # (group, impl) -> floating-point operations of one call


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1])
    return 0


@contextlib.contextmanager
def peak_memory(device):
    """Yields a dict whose "mb" is the extra peak memory of the block: CUDA
    max_memory_allocated on a GPU, peak RSS (VmHWM, reset through
    /proc/self/clear_refs) on the CPU."""
    out = {"mb": None}
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        yield out
        torch.cuda.synchronize()
        out["mb"] = (torch.cuda.max_memory_allocated() - before) / 2**20
        return
    # Give freed heap pages back to the OS first, so that memory the block
    # allocates shows up as new resident pages instead of reusing warm ones.
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = _status_kb("VmRSS")
    except OSError:
        before = None
    yield out
    if before is not None:
        out["mb"] = max(0, _status_kb("VmHWM") - before) / 1024


def rounds_for(seconds_per_call, floor, budget=0.5, cap=200):
    """Rounds of one iteration for a call that took seconds_per_call once warm:
    enough to fill about budget seconds, at least floor, at most cap."""
    if not seconds_per_call or seconds_per_call <= 0:
        return floor
    return int(min(cap, max(floor, budget / seconds_per_call)))


@pytest.fixture
def record():
    def _record(group, impl, benchmark, peak_mb=None, baseline=False, flops=None, throughput=None, stat="mean"):
        assert stat in ("mean", "min", "median"), stat
        stats = getattr(benchmark, "stats", None)
        value = getattr(stats.stats, stat) if stats is not None and getattr(stats, "stats", None) else None
        if value is not None:
            _ROWS[group].append((impl, value, peak_mb, baseline, throughput, stat))
            if flops is not None:
                _FLOPS[(group, impl)] = flops
                benchmark.extra_info["TFLOP/s"] = round(flops / value / 1e12, 4)
        benchmark.extra_info["peak_mb"] = peak_mb
        if throughput is not None and value:
            benchmark.extra_info[throughput[1]] = throughput[0] / value

    return _record


def pytest_terminal_summary(terminalreporter):
    if not _ROWS:
        return
    tr = terminalreporter
    tr.section("sslops side-by-side (same run)")
    if torch.cuda.is_available():
        tr.write_line(f"device: {torch.cuda.get_device_name()}")
    else:
        tr.write_line(f"device: CPU, {os.cpu_count()} cores, torch {torch.__version__}")
    for group, rows in _ROWS.items():
        base = next((r for r in rows if r[3]), None)
        tr.write_line(f"[{group}]")
        for impl, secs, peak, _, throughput, stat in rows:
            ratio = f"{base[1] / secs:6.2f}x" if base else "   -   "
            mem = f"{peak:9.1f} MB" if peak is not None else "        -   "
            flops = _FLOPS.get((group, impl))
            rate = f"  {flops / secs / 1e12:8.4f} TFLOP/s" if flops is not None else ""
            if throughput:
                rate += f"  {throughput[0] / secs:12,.1f} {throughput[1]}"
            tr.write_line(f"  {impl:28s} {secs * 1e3:10.3f} ms ({stat}){rate}  {ratio} vs "
                          f"{base[0] if base else '-':16s} peak {mem}")

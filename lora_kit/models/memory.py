"""Memory and speed tuning around model loading: whether this CPU runs bf16 faster than fp32 (measured), and glibc
allocator settings that give a converting (4/8-bit) load's freed buffers back to the system.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import time

import torch


@functools.lru_cache(maxsize=1)
def cpu_bf16_is_faster() -> bool:
    """Time one matmul in fp32 and bf16 (~50 ms). CPUs with AMX run bf16 ~2x faster; CPUs with only avx512_bf16
    were measured here running it ~25% slower (62 vs 84 GFLOP/s), so the flag alone does not decide."""
    def rate(dtype):
        a, w = torch.randn(512, 576, dtype=dtype), torch.randn(1536, 576, dtype=dtype)
        a @ w.T
        start = time.perf_counter()
        for _ in range(5):
            a @ w.T
        return time.perf_counter() - start

    try:
        return min(rate(torch.bfloat16) for _ in range(2)) < 0.9 * min(rate(torch.float32) for _ in range(2))
    except RuntimeError:
        return False


@contextlib.contextmanager
def freed_memory_returned():
    """glibc keeps freed blocks under its mmap threshold (dynamic, up to 32 MB) in its heaps, and a converting load
    frees one full-precision tensor per weight: a 1.1B 4-bit load ended with 0.6 GB of free heap counted in the RSS.
    Meanwhile every block of 1 MB or more gets its own mapping, given back when freed; afterwards the threshold is
    glibc's own dynamic maximum and the heaps are trimmed. (A small threshold kept for training halves a LoRA run's
    RSS but costs it 20-27% of its speed here: BENCHMARKS.md "QLoRA memory".) Elsewhere than glibc, or when the user
    set MALLOC_MMAP_THRESHOLD_ themselves: nothing."""
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        yield
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt, libc.malloc_trim
    except (OSError, AttributeError):
        yield
        return
    m_mmap_threshold = -3
    libc.mallopt(m_mmap_threshold, 1 << 20)
    try:
        yield
    finally:
        libc.mallopt(m_mmap_threshold, 32 << 20)
        libc.malloc_trim(0)

"""Keep a long CPU stage's resident memory near what it uses: large blocks mapped on their own (returned on
free), freed heap pages back to the operating system between phases, and oneDNN's kernel cache bounded.

Why: on a CPU, PyTorch's tensors come from the C library's malloc. A PPO step frees tensors whose sizes change
every step (rollout lengths differ), glibc keeps the freed blocks in its heap for reuse, and the process's
resident size grows in jumps while the number of live tensors stays the same (measured on the demo's PPO
stage: README "PPO memory"). `malloc_trim(0)` returns the free pages of every arena to the kernel; it moves no
live data, so nothing computed changes. It costs milliseconds, so it is called between steps and phases, not
inside them. Without glibc (musl, macOS) it does nothing; GPU memory is the CUDA caching allocator's, which
this does not touch.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os

# oneDNN (PyTorch's CPU kernels for bf16 matmuls) JIT-compiles a kernel per new matrix shape and caches up to 1,024
# of them. PPO's shapes change every step (prompt widths, answer lengths), so the cache kept growing: measured on
# the demo's PPO loop, resident size after each step (heap trimmed) +72 MB a step with the default, +36 MB a step
# and flat from step 9 (~1.66 GB) with 64, at the same seconds per step; 0 (no cache) made steps ~3x slower.
ONEDNN_CACHE_CAPACITY = 64
# glibc maps a block of at least this size on its own, so free() returns it at once. Its default starts at 128 KB
# and rises to the size of any mapped block freed (up to 32 MB), after which a generation's activations and KV
# cache come from the heap and stay there. Fixed at 1 MB on the demo's PPO stage: peak 3.11 -> 2.85 GB, steps
# as fast (8 steps: 6.0 s against 6.2 s a step); at 256 KB the steps were ~1.7x slower (a page fault per block).
MMAP_THRESHOLD = 1 << 20
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
# ...but not for the evaluation after training, which generates for 16-32 rows at once: its per-layer KV-cache
# blocks, the [rows, vocab] logits of each decoding step and the reward model's activations are 1-10 MB, so under
# MMAP_THRESHOLD each was mapped, page-faulted and unmapped again at every decoding step. That was the demo PPO
# evaluation's unexplained slowdown (README "PPO memory"). Measured on it (models loaded, no training: 50 prompts,
# greedy and 4 sampled answers per prompt and policy, all scored; same machine, one after the other): 237 and
# 252 s with 1 MB, 263 s with 8 MB (its sampling as slow; a test run overlapped its first phase), 162 s with 32 MB,
# 133 s with glibc's dynamic threshold (no settle_process); the process's peak during it 1.81 GB (1 MB), 1.88 GB
# (8 MB), 2.04 GB (32 MB). 32 MB is glibc's own ceiling for its dynamic threshold; the evaluation trims after every chunk
# (policy_eval EVAL_TRIM), so the heap gives back what the larger threshold keeps.
EVAL_MMAP_THRESHOLD = 32 << 20


@functools.lru_cache(maxsize=2)
def _libc_function(name: str):
    libc = ctypes.util.find_library("c")
    if libc is None:
        return None
    try:
        return getattr(ctypes.CDLL(libc), name)
    except (OSError, AttributeError):  # no such libc, or a libc without this function (musl, macOS)
        return None


def release_freed_memory() -> bool:
    """Return the heap's free pages to the kernel; True where the C library could (glibc)."""
    trim = _libc_function("malloc_trim")
    return bool(trim is not None and trim(0) >= 0)


def map_large_blocks(threshold: int = MMAP_THRESHOLD) -> bool:
    """Fix glibc's mmap threshold (what MALLOC_MMAP_THRESHOLD_ would set at start-up); True where it took."""
    mallopt = _libc_function("mallopt")
    return bool(mallopt is not None and mallopt(M_MMAP_THRESHOLD, threshold) == 1)


def bound_kernel_cache(capacity: int = ONEDNN_CACHE_CAPACITY) -> None:
    """Cap oneDNN's primitive cache for this process and its children. oneDNN reads the variable when it
    creates its first kernel, so call this before the first matmul; a value the user set is kept."""
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", str(capacity))


def settle_for_evaluation() -> bool:
    """The evaluation's threshold (EVAL_MMAP_THRESHOLD), set after training; True where it took."""
    return map_large_blocks(EVAL_MMAP_THRESHOLD)


def settle_process() -> None:
    """What the PPO stage sets at its start (before the first matmul): oneDNN's cache capped, large blocks mapped."""
    bound_kernel_cache()
    map_large_blocks()

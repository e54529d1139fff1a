"""release_freed_memory gives freed tensor memory that glibc kept in its heap back to the kernel, and leaves
live tensors as they were."""
import platform

import pytest
import torch

from refinery.ops.host_memory import release_freed_memory


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@pytest.mark.skipif(platform.system() != "Linux" or not platform.libc_ver()[0] == "glibc", reason="glibc only")
def test_freed_heap_blocks_go_back_and_live_tensors_stay():
    # glibc serves blocks under its mmap threshold from the heap; freeing a 24 MB mapped block raises that
    # threshold (its dynamic rule), so the 1 MB tensors below come from the heap, as a PPO step's do
    big = torch.ones(24 * 2**18)
    del big
    blocks = [torch.full((2**18,), float(i)) for i in range(300)]  # 300 x 1 MB, written so the pages are resident
    keep = blocks[1::2]
    del blocks  # every other block freed: holes in the middle of the heap, which plain free() keeps
    before = rss_mb()
    assert release_freed_memory()
    after = rss_mb()
    assert after < before - 60, (before, after)  # ~150 MB were freed
    assert all(float(t[0]) == 2 * i + 1 for i, t in enumerate(keep))

"""ops/host_memory.py against glibc: freed tensor memory that the heap kept goes back to the kernel on
release_freed_memory, blocks above the fixed mmap threshold go back on free, and live tensors keep their values.
(The PPO stage fixes the threshold for its process, and so for the rest of a test session that ran it: each test
sets up the allocator state it needs first.)"""
import platform

import pytest
import torch

from refinery.ops.host_memory import (
    EVAL_MMAP_THRESHOLD,
    MMAP_THRESHOLD,
    map_large_blocks,
    release_freed_memory,
    settle_for_evaluation,
)

pytestmark = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="glibc's allocator")


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def fragmented(block_floats: int, count: int) -> list[torch.Tensor]:
    """`count` blocks written (so their pages are resident), every other one freed: holes in the middle of
    the heap, which plain free() keeps; returns the live half."""
    blocks = [torch.full((block_floats,), float(i)) for i in range(count)]
    return blocks[1::2]


def test_freed_heap_blocks_go_back_and_live_tensors_stay():
    big = torch.ones(24 * 2**18)  # freeing a 24 MB mapped block raises glibc's dynamic threshold above 256 KB
    del big
    keep = fragmented(2**16, 1200)  # 1,200 x 256 KB: from the heap whatever the threshold is now
    before = rss_mb()
    assert release_freed_memory()
    after = rss_mb()
    assert after < before - 60, (before, after)  # ~150 MB were freed
    assert all(float(t[0]) == 2 * i + 1 for i, t in enumerate(keep))


def test_blocks_above_the_fixed_threshold_go_back_on_free():
    big = torch.ones(24 * 2**18)  # as above: without a fixed threshold, 2 MB blocks would come from the heap
    del big
    assert map_large_blocks()
    block = 2 * MMAP_THRESHOLD // 4  # floats: a 2 MB block
    start = rss_mb()
    keep = fragmented(block, 160)  # 160 x 2 MB, the 80 freed ones returned at once
    assert rss_mb() < start + 80 * 2 + 60, (start, rss_mb())
    assert all(float(t[0]) == 2 * i + 1 for i, t in enumerate(keep))


def test_the_evaluation_keeps_its_blocks_in_the_heap_and_the_trim_returns_them():
    """Under the evaluation's threshold the same 2 MB blocks come from the heap (no map, fault and unmap per
    decoding step), so their freed half stays resident until the evaluation's trim returns it."""
    assert settle_for_evaluation() and EVAL_MMAP_THRESHOLD > 2 * MMAP_THRESHOLD
    release_freed_memory()  # what earlier tests left free in the heap would otherwise be reused, already resident
    start = rss_mb()
    keep = fragmented(2 * MMAP_THRESHOLD // 4, 160)
    held = rss_mb()
    assert held > start + 160 * 2 - 60, (start, held)  # the freed 80 x 2 MB are still the process's
    assert release_freed_memory()
    assert rss_mb() < held - 80 * 2 + 60, (held, rss_mb())
    assert all(float(t[0]) == 2 * i + 1 for i, t in enumerate(keep))
    map_large_blocks()  # back to the stage's training setting for whatever test runs next


def test_evaluation_returns_each_chunks_memory_and_answers_stay_the_same(tiny_base, monkeypatch):
    """The PPO evaluation trims after every generation chunk (policy_eval EVAL_TRIM: its growth was the demo
    stage's peak), and trimming changes no answer: the same sampled and greedy answers with and without it."""
    from types import SimpleNamespace

    from transformers import AutoModelForCausalLM

    import refinery.rlhf.policy_eval as pe
    from refinery.data.chat import prompt_ids
    from refinery.modeling.loading import load_tokenizer

    tok = load_tokenizer(tiny_base)
    model = AutoModelForCausalLM.from_pretrained(tiny_base).eval()
    prompts = [prompt_ids(tok, f"Tell me about topic {i}" + " and more" * i) for i in range(10)]
    cfg = SimpleNamespace(eval_max_new_tokens=6, temperature=0.7, top_k=0, top_p=1.0)

    def answers():
        sampled = pe.sampled_answers(model, tok, prompts, cfg, k=2, seed=3, batch_size=4)
        greedy = [pe.decode_responses(tok, r) for _, r in pe.greedy_rollouts(model, tok, prompts, 6, batch_size=4)]
        return sampled, greedy

    calls = []
    monkeypatch.setattr(pe, "release_freed_memory", lambda: calls.append(1) or True)
    trimmed = answers()
    assert len(calls) == 3 + 3  # 10 prompts in chunks of <= 4, in each of the two generations
    monkeypatch.setattr(pe, "release_freed_memory", lambda: True)
    assert answers() == trimmed

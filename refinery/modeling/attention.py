"""Attention kernels for left-padded batches: everything PPO runs, GRPO's training (TRL samples from left-padded
prompts), and batched generation.

On an H200 (torch 2.11, bf16 autocast) PyTorch picks cuDNN's fused attention for SDPA. A 1B PPO run with
left-padded rollouts then drew NaN sampling probabilities at step 4 (a CUDA device-side assert that ends the
process; the same at lr 3e-4 and 1e-5, so data- and not weight-driven), and ran all its steps with cuDNN's
backend switched off, or with eager attention (bench/RESULTS-gpu.md). A left-padded batch has query rows that
see no key at all (the padding before a short prompt); that is where fused kernels differ in what they return.
The other SDPA backends (flash, memory-efficient, math) stay allowed, so this costs nothing on a CPU and, on a
GPU, only cuDNN's kernel for these passes; training on packed or right-padded rows keeps every backend."""
from __future__ import annotations

from torch.nn.attention import SDPBackend, sdpa_kernel

LEFT_PADDED_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def left_padded_attention():
    """A context in which SDPA never uses cuDNN's attention (nestable; restores the backends on exit)."""
    return sdpa_kernel(LEFT_PADDED_BACKENDS)


SEGMENT_SDPA = "segment_sdpa"  # params/base.yaml `attn_implementation: segment_sdpa`


def segment_sdpa_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                           is_causal=None, **kwargs):
    """SDPA over each sequence of a padding-free row on its own: a sequence starts where `position_ids` restart at
    0 and gets causal attention over its own tokens only. A *branch* starts where they jump back to k > 0: it
    continues the first k tokens of the sequence before it (the reward stage's rejected answer after its pair's
    shared prompt, refinery/train/reward_model.py `FlatPairCollator(shared_prefix=True)`), attending to those k
    tokens and causally to its own.

    Why: a padding-free row (the reward stage's joined pairs, PPO's joined rollouts) under plain sdpa gets one
    block-diagonal mask over the whole row, and SDPA computes attention over all of it: 8 sequences joined into
    1,445 tokens pay for 1,445^2 scores where ~8 x 180^2 are needed (measured: 48% of a demo reward step on the
    CPU). flash-attn's varlen kernel does this on CUDA (`flash_attention_2`) but has no branches; on a CPU there
    is none, and this is the same computation with one SDPA call per sequence. Anything else (a batch of several
    rows, a KV cache, no restarts) goes to transformers' own sdpa with its mask, unchanged."""
    import torch
    import torch.nn.functional as F
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    position_ids = kwargs.get("position_ids")
    plan = None
    if (position_ids is not None and query.shape[0] == 1 and key.shape[2] == query.shape[2] == position_ids.shape[-1]
            and not (module.training and dropout > 0)):
        plan = segment_plan(position_ids)
    if plan is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    gqa = query.shape[1] != key.shape[1]
    parts = []
    for start, end, root, shared in plan:
        q, k, v = query[:, :, start:end], key[:, :, start:end], value[:, :, start:end]
        if not shared:
            parts.append(F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling, enable_gqa=gqa))
            continue
        k = torch.cat([key[:, :, root:root + shared], k], dim=2)
        v = torch.cat([value[:, :, root:root + shared], v], dim=2)
        # True = attends: all `shared` prefix tokens, then causal within the branch
        mask = torch.ones(end - start, shared + end - start, dtype=torch.bool, device=q.device).tril(shared)
        parts.append(F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling, enable_gqa=gqa))
    out = torch.cat(parts, dim=2) if len(parts) > 1 else parts[0]
    return out.transpose(1, 2).contiguous(), None


# The plan of the last row seen: every layer of a forward (and a checkpointed recomputation) is handed the same
# position_ids tensor, so it is parsed once per forward, not once per layer. Holding the tensor keeps its id unique.
_last_plan: list = [None, None]


def segment_plan(position_ids) -> list[tuple[int, int, int, int]] | None:
    """(start, end, root start, shared prefix length) per sequence of a joined row, from its positions; None for
    anything else (a left-padded row's positions: it keeps its mask). Cached for the tensor last asked about."""
    if _last_plan[0] is position_ids:
        return _last_plan[1]
    plan = parse_segments(position_ids.reshape(-1).tolist())
    _last_plan[:] = [position_ids, plan]
    return plan


def parse_segments(positions: list[int]) -> list[tuple[int, int, int, int]] | None:
    """A row's positions run 0, 1, 2, ... within each sequence. A run starting at 0 is a sequence of its own
    (root = its start, shared = 0); one starting at k > 0 is a branch of the last sequence that started at 0,
    sharing its first k tokens (which must exist). None when the row is not made of such runs."""
    if not positions or positions[0] != 0:
        return None
    starts = [i for i in range(len(positions)) if i == 0 or positions[i] != positions[i - 1] + 1]
    plan, root, root_length = [], 0, 0
    for start, end in zip(starts, [*starts[1:], len(positions)]):
        k = positions[start]
        if k == 0:
            root, root_length = start, end - start
        elif k > root_length:  # a branch sharing more tokens than the sequence it continues has: not ours to read
            return None
        plan.append((start, end, root, k))
    return plan


def register_segment_sdpa() -> str:
    """Make SEGMENT_SDPA a transformers attention implementation (its masks: sdpa's, for the fallback); what
    `attn_implementation: segment_sdpa` loads every model with (refinery/modeling/loading.py)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, sdpa_mask

    if SEGMENT_SDPA not in ALL_MASK_ATTENTION_FUNCTIONS:
        AttentionInterface.register(SEGMENT_SDPA, segment_sdpa_attention)
        AttentionMaskInterface.register(SEGMENT_SDPA, sdpa_mask)
    return SEGMENT_SDPA

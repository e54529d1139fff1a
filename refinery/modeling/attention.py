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
    """SDPA over each sequence of a padding-free row on its own: the row's sequences are where `position_ids`
    restart at 0, and each gets causal attention over its own tokens only.

    Why: a padding-free row (the reward stage's joined pairs, PPO's joined rollouts) under plain sdpa gets one
    block-diagonal mask over the whole row, and SDPA computes attention over all of it: 8 sequences joined into
    1,445 tokens pay for 1,445^2 scores where ~8 x 180^2 are needed (measured: 48% of a demo reward step on the
    CPU). flash-attn's varlen kernel does this on CUDA (`flash_attention_2`); on a CPU there is none, and this is
    the same computation with one SDPA call per sequence. Anything else (a batch of several rows, a KV cache, no
    restarts) goes to transformers' own sdpa with its mask, unchanged."""
    import torch
    import torch.nn.functional as F
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    position_ids = kwargs.get("position_ids")
    bounds = None
    if (position_ids is not None and query.shape[0] == 1 and key.shape[2] == query.shape[2] == position_ids.shape[-1]
            and not (module.training and dropout > 0)):
        bounds = sequence_bounds(position_ids.reshape(-1))
    if bounds is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    gqa = query.shape[1] != key.shape[1]
    parts = [F.scaled_dot_product_attention(query[:, :, s:e], key[:, :, s:e], value[:, :, s:e], is_causal=True,
                                            scale=scaling, enable_gqa=gqa) for s, e in zip(bounds, bounds[1:])]
    out = torch.cat(parts, dim=2) if len(parts) > 1 else parts[0]
    return out.transpose(1, 2).contiguous(), None


def sequence_bounds(positions) -> list[int] | None:
    """[start of each sequence..., end] of a joined row whose positions restart at 0 and run 0, 1, 2, ... within
    each sequence; None for anything else (a left-padded row's positions do not: it keeps its mask)."""
    import torch

    starts = (positions == 0).nonzero().flatten()
    if len(starts) == 0 or int(starts[0]) != 0:
        return None
    which = torch.zeros_like(positions).index_fill_(0, starts, 1).cumsum(0) - 1  # the sequence each token is in
    if not torch.equal(positions, torch.arange(len(positions), device=positions.device) - starts[which]):
        return None
    return [*starts.tolist(), len(positions)]


def register_segment_sdpa() -> str:
    """Make SEGMENT_SDPA a transformers attention implementation (its masks: sdpa's, for the fallback); what
    `attn_implementation: segment_sdpa` loads every model with (refinery/modeling/loading.py)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, sdpa_mask

    if SEGMENT_SDPA not in ALL_MASK_ATTENTION_FUNCTIONS:
        AttentionInterface.register(SEGMENT_SDPA, segment_sdpa_attention)
        AttentionMaskInterface.register(SEGMENT_SDPA, sdpa_mask)
    return SEGMENT_SDPA

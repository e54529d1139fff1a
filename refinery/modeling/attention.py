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

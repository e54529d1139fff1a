"""Liger's kernels for models transformers' Trainer would patch wrongly.

`TrainingArguments(use_liger_kernel=True)` hands the model to liger-kernel's `_apply_liger_kernel_to_instance`,
which (liger-kernel 0.8.5) also swaps the model's `forward` for its causal-LM fused-linear-cross-entropy forward.
On a scalar-head model (`*ForSequenceClassification`: the reward stage) that forward reads `self.lm_head`, which
such a model has not: the first step fails with "AttributeError: ... has no attribute 'lm_head'" (measured on an
H200, bench/RESULTS-gpu.md). For those models the stage applies Liger's per-layer kernels itself (RMSNorm, RoPE,
SwiGLU: the same call, with the fused cross-entropy off, since there is no LM head to fuse) and keeps
Trainer's own switch off."""
from __future__ import annotations

from refinery.modeling.loading import unwrapped


def liger_for_trainer(model, use_liger_kernel: bool) -> bool:
    """What to pass as TrainingArguments.use_liger_kernel: True for a causal LM (Trainer patches it), False
    for any other model after patching its layers here."""
    base = unwrapped(model)
    if not use_liger_kernel or base.get_output_embeddings() is not None:  # off, or a causal LM: Trainer's patch
        return use_liger_kernel
    from liger_kernel.transformers import _apply_liger_kernel_to_instance

    _apply_liger_kernel_to_instance(model=base, fused_linear_cross_entropy=False, cross_entropy=False)
    return False

"""One precision knob for every stage: `precision` in params/base.yaml (auto | fp32 | bf16 | fp16).

Mixed precision here means fp32 master weights (what the optimiser updates and what is saved) with matmuls
in 16 bits under `torch.autocast`; HF Trainer does exactly that for dapt, sft and reward (`bf16=True` /
`fp16=True`), and `compute_precision` wraps the rest of a stage (evaluation, generation, PPO's rollouts,
scoring and updates) in the same autocast.

`auto` resolves, once per process, to:
- CUDA: bf16 where the GPU supports it, else fp32 (fp16 needs a loss scaler that PPO's own loop lacks; ask
  for `fp16` explicitly and dapt/sft/reward use HF's scaler);
- CPU: bf16 where the CPU has AVX512-BF16 or AMX (measured on a 2-core AVX512-BF16 VM: README "Precision"),
  else fp32: without those instructions bf16 is emulated and slower than fp32.
"""
from __future__ import annotations

import contextlib
import functools
from pathlib import Path

import torch

from refinery.errors import UserError

CHOICES = ("auto", "fp32", "bf16", "fp16")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@functools.cache
def cpu_has_bf16() -> bool:
    """AVX512-BF16 or AMX-BF16 in /proc/cpuinfo (Linux; elsewhere: no)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def resolve(precision: str) -> str:
    """`auto` -> what this machine runs best; an explicit choice it cannot run -> UserError."""
    cuda = torch.cuda.is_available()
    if precision == "auto":
        if cuda:
            return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
        return "bf16" if cpu_has_bf16() else "fp32"
    if precision == "fp16" and not cuda:
        raise UserError("params/base.yaml: precision: fp16 needs a CUDA GPU (use bf16 or auto on a CPU)")
    if precision == "bf16" and cuda and not torch.cuda.is_bf16_supported():
        raise UserError("params/base.yaml: precision: bf16 is not supported by this GPU (use fp16 or auto)")
    return precision


def compute_precision(precision: str, device_type: str | None = None):
    """A context in which forward passes run at `precision` (a resolved value): autocast for bf16/fp16,
    nothing for fp32.

    `cache_enabled=False`: autocast caches the 16-bit copy of every trainable weight until the outermost
    autocast context exits. A stage wraps its whole body (training included) in this context, so with the
    cache every forward after the first optimizer step would use the stale copy: the weights train, the
    model's outputs never change (measured: a LoRA dapt whose validation loss stayed at 3.0880 for 12 steps).
    Without the cache each forward casts what it uses, which is what a forward needs anyway."""
    if precision == "fp32":
        return contextlib.nullcontext()
    device_type = device_type or ("cuda" if torch.cuda.is_available() else "cpu")
    return torch.autocast(device_type, dtype=DTYPES[precision], cache_enabled=False)


def store_frozen_linears(model, precision: str) -> int:
    """Keep the frozen linear layers' weights in the compute dtype (bf16/fp16); returns the bytes this frees.

    For a model that only ever runs under `compute_precision(precision)` (PPO's reward model and the frozen
    base of its value model), this changes no output: autocast casts every fp32 linear weight to the same
    dtype, with the same rounding, on every forward. Stored that way the fp32 copy is gone, and a forward no
    longer makes (and keeps for the backward) a 16-bit copy of each weight: at 135M parameters ~210 MB less
    per model at rest and as much again per forward in flight. Trainable parameters, embeddings and norms stay
    fp32 (the optimiser's master weights; a 16-bit residual stream would change the outputs). Not for a
    model whose frozen weights are saved as they are: a policy so stored has its adapter merged into the fp32
    input weights reloaded from disk (refinery/modeling/loading.save_output), as QLoRA's is."""
    if precision not in DTYPES:
        return 0
    dtype, freed = DTYPES[precision], 0
    # a weight shared with a non-linear module stays: a tied LM head is the input embedding, whose table
    # feeds the fp32 residual stream
    shared = {id(p) for m in model.modules() if type(m) is not torch.nn.Linear for p in m.parameters(recurse=False)}
    for module in model.modules():
        if type(module) is not torch.nn.Linear:
            continue
        for name in ("weight", "bias"):
            p = getattr(module, name)
            if p is not None and not p.requires_grad and p.dtype == torch.float32 and id(p) not in shared:
                freed += p.numel() * (p.element_size() - 2)
                p.data = p.data.to(dtype)
    if freed:
        setattr(model, FROZEN_16BIT, True)
        # transformers maps a safetensors file into memory and its tensors point into that mapping: while one
        # fp32 tensor (an embedding, a norm) still does, the whole file stays resident. Copy them out so the
        # mapping, and the fp32 weights it holds, can go (measured: 540 MB of a 135M model stayed resident)
        with torch.no_grad():
            for t in [*model.parameters(), *model.buffers()]:
                if t.dtype == torch.float32:
                    t.data = t.data.clone()
    return freed


FROZEN_16BIT = "refinery_frozen_16bit"  # set on a model whose frozen linears store_frozen_linears cast


def frozen_in_16bit(model) -> bool:
    """Whether merging this model's adapter must start from the fp32 input weights reloaded from disk."""
    return bool(getattr(model, FROZEN_16BIT, False))

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

"""The one list of adaptation methods: each method's name, the stages it may train and its properties.

Plain data (no torch, no peft), so params validation (refinery/config.py) and the code that applies a
method (refinery/modeling/methods.py) read the same names from here.
"""
from __future__ import annotations

from dataclasses import dataclass

ALL_STAGES = ("dapt", "sft", "compare", "reward", "ppo", "dpo", "grpo")
# Scalar-head (reward, value) and RL stages take merged-weight methods only: virtual-token methods shift
# token positions (values and KL must line up with response tokens) and bottleneck adapters would leave the
# head unsaved in a non-mergeable folder.
CAUSAL_LM_STAGES = ("dapt", "sft", "compare")


@dataclass(frozen=True)
class Method:
    name: str
    mergeable: bool
    packing: bool
    stages: tuple[str, ...] = ALL_STAGES
    needs_cuda: bool = False
    virtual_tokens: bool = False
    # peft 0.21 cannot load a Trainer checkpoint of prefix tuning *with* its projection MLP on a GQA model
    # (size mismatch on the prompt encoder): such a run restarts instead of resuming, and says so
    resumable: bool = True


REGISTRY: dict[str, Method] = {m.name: m for m in [
    Method("full", mergeable=True, packing=True),
    Method("lora", mergeable=True, packing=True),
    Method("qlora", mergeable=True, packing=True, needs_cuda=True),
    Method("adapter", mergeable=False, packing=True, stages=CAUSAL_LM_STAGES),
    Method("ia3", mergeable=True, packing=True),
    Method("prefix", mergeable=False, packing=False, stages=CAUSAL_LM_STAGES, virtual_tokens=True,
           resumable=False),
    Method("ptuning_v2", mergeable=False, packing=False, stages=CAUSAL_LM_STAGES, virtual_tokens=True),
    Method("prompt", mergeable=False, packing=False, stages=CAUSAL_LM_STAGES, virtual_tokens=True),
    Method("ptuning", mergeable=False, packing=False, stages=CAUSAL_LM_STAGES, virtual_tokens=True),
]}

METHOD_NAMES = tuple(REGISTRY)


def methods_for(stage: str) -> tuple[str, ...]:
    return tuple(name for name, m in REGISTRY.items() if stage in m.stages)

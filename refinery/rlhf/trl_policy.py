"""The policy handed to a TRL trainer (DPOTrainer, GRPOTrainer) so that TRL's reference is the SFT policy."""
from __future__ import annotations

import contextlib

import torch

from refinery.modeling.methods import apply_method, peft_config


def model_for_trl(model, cfg, seed: int):
    """(model, peft config) for a TRL trainer. A peft method is handed to TRL as a config for TRL to apply: given
    a model already wrapped in an adapter, TRL would copy that adapter as a second, frozen "ref" adapter (its way
    of re-training an existing adapter) instead of using the adapter-off model, which is the SFT policy. `full`
    is applied here; TRL then loads a frozen copy of the start as the reference."""
    torch.manual_seed(seed)  # the new adapter weights start from the seed, not from what the RNG saw before
    if cfg.method == "full":
        return apply_method(model, cfg, "CAUSAL_LM", seed=seed), None
    if cfg.method == "qlora":
        import peft

        model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return model, peft_config(cfg, "CAUSAL_LM")


def sft_policy(trainer, method: str, input_dir: str, trust_remote_code: bool, attn_implementation: str | None):
    """(model, context) in which the model is the SFT policy the trained one is judged against: for a peft
    method the trained weights with the adapter off; for `full` TRL's frozen reference, or, when TRL loaded none
    (GRPO with beta 0), the SFT weights read back from `input_dir`."""
    if trainer.ref_model is None and method != "full":
        return trainer.model, trainer.model.disable_adapter
    if trainer.ref_model is not None:
        return trainer.ref_model, contextlib.nullcontext
    from refinery.modeling.loading import load_causal_lm, to_compute_device

    model = load_causal_lm(input_dir, trust_remote_code, attn_implementation=attn_implementation)
    return to_compute_device(model).eval(), contextlib.nullcontext

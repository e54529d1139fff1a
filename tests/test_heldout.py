"""Held-out loss per row (refinery/evaluation/heldout.py) for every kind of model the stages evaluate."""
import math

from peft import PromptTuningConfig, get_peft_model
from transformers import AutoModelForCausalLM

from refinery.data.packing import PadCollator
from refinery.evaluation.heldout import row_losses


def test_row_losses_with_virtual_tokens(tiny_base):
    """Prompt tuning prepends virtual tokens to the logits: the per-row losses must still line up with the
    labels (a regression: the method comparison's prompt/ptuning points failed on a size mismatch)."""
    base = AutoModelForCausalLM.from_pretrained(tiny_base)
    rows = [{"input_ids": list(range(100, 100 + n)), "labels": list(range(100, 100 + n))} for n in (12, 20, 7)]
    collate = PadCollator(0)
    plain, per_row = row_losses(base, rows, 2, 2, collate)
    assert len(per_row) == 3 and all(math.isfinite(x) for x in per_row)
    model = get_peft_model(base, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5))
    summary, per_row_prompt = row_losses(model, rows, 2, 2, collate)
    assert len(per_row_prompt) == 3 and all(math.isfinite(x) for x in per_row_prompt)
    assert summary["eval_tokens"] == plain["eval_tokens"]  # the same predicted tokens, virtual ones excluded

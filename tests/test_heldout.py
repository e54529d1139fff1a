"""Held-out loss per row (refinery/evaluation/heldout.py) for every kind of model the stages evaluate."""
import math

import pytest
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


def test_length_sorted_batches_give_each_row_its_own_result(tiny_base):
    """row_losses and generate_batch batch rows by length (less padding): every row's loss and every prompt's
    answer must come back in the caller's order and equal what the row gets evaluated alone (fp32)."""
    import torch
    from transformers import AutoTokenizer

    from refinery.evaluation.heldout import generate_batch

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_base)
    tok = AutoTokenizer.from_pretrained(tiny_base)
    lengths = (19, 5, 33, 8, 26, 12, 3)  # unsorted on purpose: batches of 3 regroup them
    rows = [{"input_ids": [int(t) for t in torch.randint(5, 200, (n,))]} for n in lengths]
    for r in rows:
        r["labels"] = list(r["input_ids"])
    rows[3]["labels"] = [-100] * len(rows[3]["labels"])  # no predicted token: left out of the per-row list
    collate = PadCollator(tok.pad_token_id)
    summary, batched = row_losses(model, rows, 3, 3, collate)
    alone = [row_losses(model, [r], 1, 1, collate)[1] for r in rows]
    assert batched == pytest.approx([x[0] for x in alone if x], rel=1e-5)
    assert summary["eval_tokens"] == sum(n - 1 for i, n in enumerate(lengths) if i != 3)
    # only the first batch_size * max_batches rows are read
    assert row_losses(model, rows, 2, 1, collate)[1] == pytest.approx(batched[:2], rel=1e-5)

    prompts = [r["input_ids"] for r in rows]
    answers = generate_batch(model, tok, prompts, 6, batch_size=3)
    assert answers == [generate_batch(model, tok, [p], 6, batch_size=1)[0] for p in prompts]


def test_answer_only_rows_score_from_the_full_logits_values(tiny_base):
    """row_losses runs the LM head only where some row predicts a labelled token (an SFT answer): each row's
    loss equals the mean NLL read from the whole sequence's logits (fp32)."""
    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_base).eval()
    rows = []
    for n, answer in ((30, 4), (18, 9), (25, 2)):
        ids = [int(t) for t in torch.randint(5, 200, (n,))]
        rows.append({"input_ids": ids, "labels": [-100] * (n - answer) + ids[n - answer:]})
    _, per_row = row_losses(model, rows, 3, 1, PadCollator(0))
    want = []
    with torch.no_grad():
        for r in rows:
            logits = model(input_ids=torch.tensor([r["input_ids"]])).logits[0, :-1]
            labels = torch.tensor(r["labels"][1:])
            want.append(float(F.cross_entropy(logits, labels, ignore_index=-100)))
    assert per_row == pytest.approx(want, rel=1e-5)

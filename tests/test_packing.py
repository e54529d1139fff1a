"""Packing respects document boundaries: a packed row gives the same per-document loss as the documents alone."""
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from refinery.data.packing import IGNORE, PadCollator, pack_documents, rows_to_list


def test_pack_layout():
    rows = pack_documents([[1, 2, 3], [4, 5], [6, 7, 8, 9]], block_size=6, eos_id=0, pad_id=0)
    assert rows["input_ids"] == [[1, 2, 3, 0, 4, 5], [0, 6, 7, 8, 9, 0]]
    assert rows["position_ids"] == [[0, 1, 2, 3, 0, 1], [0, 0, 1, 2, 3, 4]]  # a continuation restarts at 0
    # first token of each document (and of each continuation) never gets a label
    assert rows["labels"] == [[IGNORE, 2, 3, 0, IGNORE, 5], [IGNORE, IGNORE, 7, 8, 9, 0]]


def test_packed_forward_matches_separate_documents(tiny_base):
    model = AutoModelForCausalLM.from_pretrained(tiny_base).eval()
    a, b = [11, 12, 13, 14, 15], [21, 22, 23, 24]
    rows = pack_documents([a, b], block_size=len(a) + len(b) + 2, eos_id=2, pad_id=2)
    batch = PadCollator(2)(rows_to_list(rows))
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0]
        alone_b = model(input_ids=torch.tensor([b + [2]]), use_cache=False).logits[0]
        # without position_ids restarts, document b would see document a: the logits differ
        leaky = model(input_ids=batch["input_ids"], use_cache=False).logits[0]
    start = len(a) + 1
    assert torch.allclose(packed[start:start + len(b) + 1], alone_b, atol=1e-5)
    assert not torch.allclose(leaky[start:start + len(b) + 1], alone_b, atol=1e-3)
    # and the loss never targets b's first token from a's context
    labels = batch["labels"][0]
    assert labels[start] == IGNORE
    F.cross_entropy(packed[:-1], labels[1:], ignore_index=IGNORE)  # well-defined


def test_padding_free_batches_give_the_padded_loss_and_gradients(tiny_base):
    """FlatCollator (`padding_free: true`) joins a batch's packed rows into one row: the same loss and gradients
    as PadCollator's padded batch (fp32, float noise), with none of its padding positions."""
    from refinery.data.packing import FlatCollator, pack_examples

    g = torch.Generator().manual_seed(0)
    examples = []
    for n in (9, 14, 5, 21, 7, 12, 17, 6):  # prompts carry no loss, answers do
        ids = torch.randint(5, 400, (n,), generator=g).tolist()
        examples.append((ids, [IGNORE] * (n // 2) + ids[n // 2:]))
    rows = pack_examples(examples, block_size=32)
    assert len({len(r["input_ids"]) for r in rows}) > 1  # rows of different lengths: the padded batch pads
    grads, losses, widths = {}, {}, {}
    for name, collate in (("padded", PadCollator(0)), ("flat", FlatCollator())):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(tiny_base)
        batch = collate(rows)
        widths[name] = batch["input_ids"].numel()
        loss = model(**batch, use_cache=False).loss
        loss.backward()
        losses[name] = float(loss)
        grads[name] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert widths["flat"] == sum(len(r["input_ids"]) for r in rows) < widths["padded"]
    assert abs(losses["flat"] - losses["padded"]) < 1e-5, losses
    for n, gp in grads["padded"].items():
        assert torch.allclose(grads["flat"][n], gp, atol=1e-6, rtol=1e-4), n
    # without the position restarts the joined rows would attend across rows: a different loss
    model = AutoModelForCausalLM.from_pretrained(tiny_base)
    flat = FlatCollator()(rows)
    leaky = float(model(input_ids=flat["input_ids"], labels=flat["labels"], use_cache=False).loss)
    assert abs(leaky - losses["padded"]) > 1e-3


def test_head_on_labelled_positions_gives_the_full_loss_and_gradients(tiny_base):
    """LabelledLogitsOnly (sft): the LM head and loss only where the next token has a label. The same loss and
    gradients as the whole batch's (fp32), for padded and padding-free batches whose rows label different
    positions, with fewer logits; Trainer's token count (read from shift_labels) is unchanged."""
    from refinery.data.packing import FlatCollator, LabelledLogitsOnly, pack_examples

    g = torch.Generator().manual_seed(1)
    examples = []
    for n in (9, 14, 5, 21, 7, 12, 17, 6):  # prompts carry no loss, answers do
        ids = torch.randint(5, 400, (n,), generator=g).tolist()
        examples.append((ids, [IGNORE] * (n - 3) + ids[n - 3:]))
    rows = pack_examples(examples, block_size=32)
    for inner in (PadCollator(0), FlatCollator()):
        results = {}
        for name, collate in (("all", inner), ("labelled", LabelledLogitsOnly(inner))):
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_pretrained(tiny_base)
            batch = collate(rows)
            out = model(**batch, use_cache=False)
            out.loss.backward()
            grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
            results[name] = (float(out.loss), grads, out.logits.shape[1], batch)
        (loss, grads, width, batch), (loss_k, grads_k, width_k, batch_k) = results["all"], results["labelled"]
        assert width_k < width, (width_k, width)  # positions predicting no labelled token in any row are skipped
        assert abs(loss_k - loss) < 1e-5, (loss_k, loss)
        for n, gp in grads.items():
            assert torch.allclose(grads_k[n], gp, atol=1e-6, rtol=1e-4), n
        assert int(batch_k["shift_labels"].ne(IGNORE).sum()) == int(batch["labels"][:, 1:].ne(IGNORE).sum())


def test_padding_free_needs_packed_rows(tiny_base):
    """Virtual-token methods train on padded examples, not packed rows: refused in one line before loading."""
    from pathlib import Path

    import pytest

    from refinery.errors import UserError
    from refinery.train.stage_io import load_start

    params = Path(__file__).resolve().parents[1] / "params"
    with pytest.raises(UserError, match=r"dapt.yaml: padding_free: method prompt trains on padded examples"):
        load_start("dapt", str(params), str(tiny_base), {"method": "prompt", "padding_free": True})

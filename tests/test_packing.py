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

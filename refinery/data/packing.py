"""Sequence packing that respects document boundaries.

Documents are concatenated into rows of exactly `block_size` tokens. `position_ids` restart at 0 at
every document start; with no 2-D attention mask, transformers (masking_utils.find_packed_sequence_indices)
turns those restarts into a block-diagonal causal mask, so a token never attends across a boundary.
The label of each document's first token is -100, so the loss never asks the model to predict the
next document from the previous one.
"""
from __future__ import annotations

from typing import Iterable

IGNORE = -100


def pack_documents(docs: Iterable[list[int]], block_size: int, eos_id: int, pad_id: int) -> dict[str, list[list[int]]]:
    rows: dict[str, list[list[int]]] = {"input_ids": [], "position_ids": [], "labels": []}
    ids: list[int] = []
    pos: list[int] = []
    labels: list[int] = []

    def flush():
        rows["input_ids"].append(ids.copy())
        rows["position_ids"].append(pos.copy())
        rows["labels"].append(labels.copy())
        ids.clear(), pos.clear(), labels.clear()

    for doc in docs:
        doc = list(doc) + [eos_id]
        start = 0
        while start < len(doc):
            take = min(block_size - len(ids), len(doc) - start)
            piece = doc[start:start + take]
            ids.extend(piece)
            pos.extend(range(take))  # a piece that continues on the next row restarts its positions
            labels.extend([IGNORE] + piece[1:])
            start += take
            if len(ids) == block_size:
                flush()
    if ids:  # last partial row: pad; padding carries no loss and, being last, nothing attends to it
        fill = block_size - len(ids)
        last = pos[-1]
        ids.extend([pad_id] * fill)
        pos.extend(range(last + 1, last + 1 + fill))
        labels.extend([IGNORE] * fill)
        flush()
    return rows


def chunk_documents(docs: Iterable[list[int]], block_size: int, eos_id: int) -> dict[str, list[list[int]]]:
    """One row per document piece (no packing), for methods that prepend virtual tokens."""
    rows: dict[str, list[list[int]]] = {"input_ids": [], "labels": []}
    for doc in docs:
        doc = list(doc) + [eos_id]
        for i in range(0, len(doc), block_size):
            piece = doc[i:i + block_size]
            if len(piece) > 1:
                rows["input_ids"].append(piece)
                rows["labels"].append(piece.copy())
    return rows


def pad_with_mask(seqs: list[list[int]], pad_id: int, side: str = "right"):
    """The one padding routine: (ids, attention_mask) as tensors of shape (len(seqs), longest).
    Right padding for training batches; left padding for generation (new tokens follow the prompt)."""
    import torch

    width = max(len(s) for s in seqs)
    fill = [width - len(s) for s in seqs]
    if side == "left":
        ids = [[pad_id] * f + list(s) for s, f in zip(seqs, fill)]
        mask = [[0] * f + [1] * len(s) for s, f in zip(seqs, fill)]
    else:
        ids = [list(s) + [pad_id] * f for s, f in zip(seqs, fill)]
        mask = [[1] * len(s) + [0] * f for s, f in zip(seqs, fill)]
    return torch.tensor(ids), torch.tensor(mask)


class PadCollator:
    """Right-pads `input_ids` (pad id), `labels` (-100) and builds `attention_mask`; packed rows
    (which carry `position_ids` and are all the same length) get no attention mask (it would hide the
    document boundaries that position_ids restarts mark), only positions continued over the fill."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, features: list[dict]) -> dict:
        ids, mask = pad_with_mask([f["input_ids"] for f in features], self.pad_id)
        labels, _ = pad_with_mask([f["labels"] for f in features], IGNORE)
        if "position_ids" in features[0]:
            width = ids.shape[1]
            positions = [list(f["position_ids"]) + list(range(f["position_ids"][-1] + 1,
                                                              f["position_ids"][-1] + 1 + width - len(f["position_ids"])))
                         for f in features]
            import torch

            return {"input_ids": ids, "labels": labels, "position_ids": torch.tensor(positions)}
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}


class FlatCollator:
    """Padding-free batches (`padding_free: true` in params/dapt.yaml and params/sft.yaml): a batch's packed rows
    joined into one row, as transformers' DataCollatorWithFlattening does. Each row's positions already restart
    at 0 wherever a document or example starts, and each row's first label is set to -100 here (in a padded batch
    nothing predicts a row's first token either), so the joined row gives the padded batch's loss and gradients
    (tests/test_packing.py) without its padding positions.

    It pays with a varlen attention kernel (`attn_implementation: flash_attention_2` reads the restarts). Under
    sdpa or eager, transformers builds one block-diagonal mask over the whole joined row and computes attention
    over all of it: on an H200, TRL's flattened SFT rows spent 3.7x our attention time (bench/RESULTS-gpu.md). So
    it is off by default."""

    def __call__(self, features: list[dict]) -> dict:
        import torch

        ids, labels, positions = [], [], []
        for f in features:
            ids += list(f["input_ids"])
            labels += [IGNORE] + list(f["labels"][1:])
            positions += list(f["position_ids"])
        return {"input_ids": torch.tensor([ids]), "labels": torch.tensor([labels]),
                "position_ids": torch.tensor([positions])}


def labels_predicted(labels):
    """([B, L] the label each position predicts, -100 after the last; the positions where some row predicts a
    labelled token): what LabelledLogitsOnly and heldout.row_losses hand transformers as `logits_to_keep`."""
    import torch

    following = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE)
    return following, (following != IGNORE).any(0).nonzero().squeeze(1)


class LabelledLogitsOnly:
    """A causal-LM collator's batches with the LM head and the loss restricted to the positions whose next token
    carries a label: `logits_to_keep` (an index tensor: transformers computes `lm_head` on those hidden states
    only) and the matching `shift_labels` (which transformers' loss and Trainer's token count read instead of
    shifting `labels`). The loss is the full batch's to rounding: the dropped positions are exactly the ones
    whose label is -100.

    Why: SFT learns only the answers, ~20% of the demo's tokens, yet the 49k-vocabulary head and its fp32
    log-softmax ran on every position; on the demo's SmolLM2 a 2x512-token LoRA step spent ~0.5 s of ~3 s there
    (bf16, 2 CPU cores). Liger's fused linear cross-entropy solves the same problem on CUDA; this is its CPU
    counterpart. The positions are the union over the batch's rows (one index for all rows, as transformers
    takes it). Not for methods that prepend virtual tokens (the hidden states are longer than the labels)."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, features: list[dict]) -> dict:
        batch = self.inner(features)
        following, keep = labels_predicted(batch["labels"])
        return {**batch, "logits_to_keep": keep, "shift_labels": following[:, keep].contiguous()}


def batch_collator(padding_free: bool, pad_id: int, labelled_logits_only: bool = False):
    """The training collator of a packed causal-LM stage (dapt, sft); `labelled_logits_only`: see
    LabelledLogitsOnly (sft, whose labels cover the answers only)."""
    inner = FlatCollator() if padding_free else PadCollator(pad_id)
    return LabelledLogitsOnly(inner) if labelled_logits_only else inner


def rows_to_list(rows: dict[str, list[list[int]]]) -> list[dict]:
    keys = list(rows)
    return [dict(zip(keys, vals)) for vals in zip(*(rows[k] for k in keys))]


def pack_examples(examples: Iterable[tuple[list[int], list[int]]], block_size: int) -> list[dict]:
    """Whole (input_ids, labels) examples placed in rows of at most `block_size` tokens, never split;
    positions restart per example, so attention stays within each example (padding-free batching)."""
    rows: list[dict] = []
    cur: dict = {"input_ids": [], "labels": [], "position_ids": []}
    for ids, labels in examples:
        ids, labels = ids[:block_size], labels[:block_size]
        if cur["input_ids"] and len(cur["input_ids"]) + len(ids) > block_size:
            rows.append(cur)
            cur = {"input_ids": [], "labels": [], "position_ids": []}
        cur["input_ids"] += ids
        cur["labels"] += labels
        cur["position_ids"] += list(range(len(ids)))
    if cur["input_ids"]:
        rows.append(cur)
    return rows

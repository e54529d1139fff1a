"""Evaluation shared by the stages: token-weighted held-out loss, perplexity, sample generations."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from refinery.data.chat import prompt_ids
from refinery.data.packing import IGNORE, labels_predicted, pad_with_mask
from refinery.modeling.attention import left_padded_attention


def length_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Indices in batches of similar length (shortest first): padding to the longest row of a batch is what
    dominates the cost of held-out rows and prompts from ~40 to ~400 tokens, and a batch's KV cache and
    logits are what sets an evaluation's peak memory. `in_prompt_order` puts per-batch results back in order."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[start:start + batch_size] for start in range(0, len(order), batch_size)]


def in_prompt_order(batches: list[tuple[list[int], list]], n: int) -> list:
    """Per-batch results (`length_batches` chunks, each with its values) back in the prompts' order."""
    out: list = [None] * n
    for chunk, values in batches:
        for i, v in zip(chunk, values):
            out[i] = v
    return out


@torch.no_grad()
def row_losses(model, rows: list[dict], batch_size: int, max_batches: int, collate) -> tuple[dict[str, float], list[float]]:
    """({"eval_loss", "perplexity", "eval_tokens"}, mean NLL per predicted token of each row) over the first
    `batch_size * max_batches` rows, batched by length. The summary is weighted by tokens, not batches; the
    per-row losses (in the rows' order; rows without a predicted token left out) are what a paired bootstrap
    resamples (refinery/evaluation/stats.py).

    The model gets no labels and the NLL is computed here, one row at a time in fp32: handing it labels
    would make transformers upcast the whole [batch, length, vocab] logits for its own loss beside ours
    (measured: 8 rows of 512 tokens with a 49k vocabulary put ~3 GB on the process's peak)."""
    model.eval()
    rows = rows[:batch_size * max_batches]
    found: dict[int, tuple[float, int]] = {}  # row index -> (summed NLL, predicted tokens)
    for chunk in length_batches([len(r["input_ids"]) for r in rows], batch_size):
        batch = collate([rows[i] for i in chunk])
        batch = {k: v.to(model.device) for k, v in batch.items()}
        labels = batch.pop("labels")
        following, keep = labels_predicted(labels)
        mask = following != IGNORE
        if not mask.any():
            continue
        if getattr(getattr(model, "active_peft_config", None), "is_prompt_learning", False):
            logits = model(**batch, use_cache=False).logits
            logits = logits[:, logits.shape[1] - labels.shape[1]:]  # prompt tuning prepends virtual tokens
        else:  # the LM head only where some row predicts a labelled token (an SFT row's answer: ~1/5 of it)
            logits = model(**batch, use_cache=False, logits_to_keep=keep).logits
            following, mask = following[:, keep], mask[:, keep]
        for i, row_logits, row_labels, row_mask in zip(chunk, logits, following, mask):
            tokens = int(row_mask.sum())
            if tokens == 0:
                continue
            nll = F.cross_entropy(row_logits.float(), row_labels.clamp(min=0), reduction="none")
            found[i] = (float((nll * row_mask).sum()), tokens)
    total, count = sum(t for t, _ in found.values()), sum(n for _, n in found.values())
    per_row = [found[i][0] / found[i][1] for i in sorted(found)]
    loss = total / max(count, 1)
    return {"eval_loss": loss, "perplexity": math.exp(min(loss, 50.0)), "eval_tokens": count}, per_row


def eval_loss(model, rows: list[dict], batch_size: int, max_batches: int, collate) -> dict[str, float]:
    """Mean NLL per predicted token over up to `max_batches` batches (weighted by tokens, not batches)."""
    return row_losses(model, rows, batch_size, max_batches, collate)[0]


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], max_new_tokens: int, chat: bool = True) -> list[str]:
    """Greedy continuations (deterministic, so before/after comparisons are fair)."""
    model.eval()
    outs = []
    for prompt in prompts:
        tokens = prompt_ids(tokenizer, prompt) if chat else tokenizer(prompt)["input_ids"]
        ids = {"input_ids": torch.tensor([tokens], device=model.device)}
        ids["attention_mask"] = torch.ones_like(ids["input_ids"])
        gen = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
        outs.append(tokenizer.decode(gen[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip())
    return outs


@torch.no_grad()
def generate_batch(model, tokenizer, prompt_ids: list[list[int]], max_new_tokens: int, batch_size: int = 8) -> list[str]:
    """Greedy generation for already-rendered prompts, left-padded in batches of similar length; the answers
    come back in the prompts' order."""
    model.eval()
    batches = []
    pad = tokenizer.pad_token_id
    for chunk in length_batches([len(p) for p in prompt_ids], batch_size):
        ids, mask = pad_with_mask([prompt_ids[i] for i in chunk], pad, side="left")
        ids, mask, width = ids.to(model.device), mask.to(model.device), ids.shape[1]
        with left_padded_attention():
            gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=pad, eos_token_id=tokenizer.eos_token_id)
        batches.append((chunk, [tokenizer.decode(g[width:], skip_special_tokens=True).strip() for g in gen]))
    return in_prompt_order(batches, len(prompt_ids))

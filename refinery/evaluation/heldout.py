"""Evaluation shared by the stages: token-weighted held-out loss, perplexity, sample generations."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from refinery.data.chat import prompt_ids
from refinery.data.packing import IGNORE, pad_with_mask


@torch.no_grad()
def row_losses(model, rows: list[dict], batch_size: int, max_batches: int, collate) -> tuple[dict[str, float], list[float]]:
    """({"eval_loss", "perplexity", "eval_tokens"}, mean NLL per predicted token of each row) over up to
    `max_batches` batches. The summary is weighted by tokens, not batches; the per-row losses are what a
    paired bootstrap resamples (refinery/evaluation/stats.py)."""
    model.eval()
    total, count, per_row = 0.0, 0, []
    for i in range(0, min(len(rows), batch_size * max_batches), batch_size):
        batch = collate(rows[i:i + batch_size])
        batch = {k: v.to(model.device) for k, v in batch.items()}
        labels = batch["labels"][:, 1:]
        mask = labels != IGNORE
        n = int(mask.sum())
        if n == 0:
            continue
        out = model(**batch, use_cache=False)
        total += float(out.loss) * n
        count += n
        logits = out.logits[:, out.logits.shape[1] - batch["labels"].shape[1]:]  # prompt tuning prepends virtual tokens
        nll = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), labels.clamp(min=0), reduction="none")
        tokens = mask.sum(-1)
        per_row += [float(x) for x in ((nll * mask).sum(-1) / tokens.clamp(min=1))[tokens > 0]]
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
    """Greedy generation for already-rendered prompts, left-padded in batches."""
    model.eval()
    outs: list[str] = []
    pad = tokenizer.pad_token_id
    for i in range(0, len(prompt_ids), batch_size):
        chunk = prompt_ids[i:i + batch_size]
        ids, mask = pad_with_mask(chunk, pad, side="left")
        ids, mask, width = ids.to(model.device), mask.to(model.device), ids.shape[1]
        gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=pad, eos_token_id=tokenizer.eos_token_id)
        outs.extend(tokenizer.decode(g[width:], skip_special_tokens=True).strip() for g in gen)
    return outs

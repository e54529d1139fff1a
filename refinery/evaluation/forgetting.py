"""General-domain retention: does a stage make the model worse at text outside its domain?

The seeds name catastrophic forgetting as the risk of fine-tuning. dapt, sft and ppo each measure the
perplexity of a general-domain held-out set (params/prepare.yaml `datasets.general`, prepared whole into
data/prepared/general/validation.jsonl, never trained on) with the model they start from and the model they
end with, and report the relative change of perplexity with a paired bootstrap CI over the paragraphs:

    perplexity_change = exp(mean_i(loss_after_i - loss_before_i)) - 1

(a per-paragraph geometric mean; 0 = retained, +0.05 = 5% higher perplexity). `retained` says whether the
point estimate is within `TOLERANCE` (+5%, the goal the evidence issue set) and `verdict` whether the change
is significant at all.
"""
from __future__ import annotations

import math
from pathlib import Path

from refinery.data.packing import PadCollator
from refinery.data.records import read_jsonl
from refinery.evaluation.heldout import row_losses
from refinery.evaluation.stats import paired_difference

TOLERANCE = 0.05
MAX_TOKENS = 256  # per paragraph; the demo's are ~120-180 tokens
BATCH = 8


def general_set(data_dir: str | Path) -> Path | None:
    """data/prepared/general/validation.jsonl, or None when prepare was not given a general set."""
    path = Path(data_dir) / "general" / "validation.jsonl"
    return path if path.is_file() else None


def general_rows(path: Path, tokenizer) -> list[dict]:
    """One row per paragraph: plain text (no chat template), every token predicted."""
    texts = [rec["text"] for _, rec in read_jsonl(path)]
    ids = tokenizer(texts, add_special_tokens=False, truncation=True, max_length=MAX_TOKENS)["input_ids"]
    return [{"input_ids": x, "labels": list(x)} for x in ids if len(x) > 1]


def load_general(data_dir: str | Path, tokenizer) -> list[dict]:
    """The prepared general-domain rows, or [] when prepare had no general set (retention then not measured)."""
    path = general_set(data_dir)
    return general_rows(path, tokenizer) if path is not None else []


def general_losses(model, rows: list[dict], pad_id: int) -> list[float] | None:
    """Mean NLL per predicted token of each paragraph (None without a general set)."""
    return row_losses(model, rows, BATCH, len(rows), PadCollator(pad_id))[1] if rows else None


def retention(before: list[float], after: list[float], seed: int) -> dict:
    """The `general_retention` block of a stage's evaluation (refinery/ops/metrics_contract.py)."""
    diff = paired_difference(before, after, higher_is_better=False, seed=seed)
    mean_b, mean_a = sum(before) / len(before), sum(after) / len(after)
    return {"n": diff.n, "perplexity_before": round(math.exp(mean_b), 4), "perplexity_after": round(math.exp(mean_a), 4),
            "perplexity_change": round(math.exp(diff.estimate) - 1, 6),
            "ci_low": round(math.exp(diff.ci_low) - 1, 6), "ci_high": round(math.exp(diff.ci_high) - 1, 6),
            "verdict": diff.verdict, "tolerance": TOLERANCE, "retained": math.exp(diff.estimate) - 1 <= TOLERANCE}


def retention_text(block: dict) -> str:
    return (f"{block['perplexity_before']:.2f} -> {block['perplexity_after']:.2f} "
            f"({block['perplexity_change']:+.1%} [{block['ci_low']:+.1%}, {block['ci_high']:+.1%}], n={block['n']}, "
            f"{block['verdict']}; {'within' if block['retained'] else 'beyond'} +{block['tolerance']:.0%})")


def retention_summary(metrics: dict) -> dict[str, str]:
    """The Prefect summary's line for a stage's metrics: {} when retention was not measured."""
    block = metrics.get("general_retention")
    return {"general-domain perplexity": retention_text(block)} if block else {}

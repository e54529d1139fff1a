"""Alignment stages (ppo, dpo, grpo) against each other, on the evidence each one's evaluation already holds.

Every alignment stage is judged by refinery/rlhf/policy_eval.py on the same held-out prompts against the same
SFT policy, and keeps the reward-model scores of its sampled answers per prompt (`eval.sampled_scores`). Two
stages are then compared head to head without generating again: on each prompt, the share of the k x k pairs
(an answer of A, an answer of B) the judge prefers A's answer in; the bootstrap resamples prompts, the
independent unit (stats.win_rate). Both sides were sampled with the evaluation's seed, so A and B also share
the SFT answers they were each compared with. Pairs are compared only when both evaluations scored the same
prompts in the same order (`prompts_sha256`) with the same k: otherwise the row says why not.
"""
from __future__ import annotations

from itertools import combinations

from refinery.evaluation.stats import win_rate


def _scores(evaluation: dict) -> dict | None:
    block = evaluation.get("sampled_scores")
    return block if isinstance(block, dict) and block.get("policy") else None


def head_to_head(evals: dict[str, dict], seed: int = 0) -> list[dict]:
    """One row per pair of stages (in the order given): {"a", "b", and either the win rate of A's answers over
    B's (Estimate.as_dict(): estimate, ci_low, ci_high, n, verdict) or "skipped": why}."""
    rows = []
    for a, b in combinations(evals, 2):
        sa, sb = _scores(evals[a]), _scores(evals[b])
        if sa is None or sb is None:
            rows.append({"a": a, "b": b, "skipped": "no per-prompt sampled scores recorded (eval_samples: 0, or a "
                                                    "record from before they were kept)"})
        elif sa.get("prompts_sha256") != sb.get("prompts_sha256"):
            rows.append({"a": a, "b": b, "skipped": "evaluated on different held-out prompts (eval_prompts differ)"})
        elif len(sa["policy"][0]) != len(sb["policy"][0]):
            rows.append({"a": a, "b": b, "skipped": "different eval_samples"})
        else:
            rows.append({"a": a, "b": b, **win_rate(sa["policy"], sb["policy"], seed=seed).as_dict()})
    return rows


def significance_sentence(rows: list[dict]) -> str:
    """Which differences between stages are significant, in one sentence for the report."""
    judged = [r for r in rows if "verdict" in r]
    if not judged:
        return "No pair of alignment stages could be compared head to head." if rows else ""
    better = [f"{r['a'] if r['verdict'] == 'improved' else r['b']} over {r['b'] if r['verdict'] == 'improved' else r['a']}"
              for r in judged if r["verdict"] != "no significant change"]
    level = [f"{r['a']} and {r['b']}" for r in judged if r["verdict"] == "no significant change"]
    parts = []
    if better:
        parts.append("significantly preferred by the judge: " + "; ".join(better))
    if level:
        parts.append("no significant difference between " + "; ".join(level))
    return "Head to head (95% CI over prompts): " + ", and ".join(parts) + "."

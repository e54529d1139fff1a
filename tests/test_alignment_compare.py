"""Alignment stages against each other: the head-to-head win rate from the sampled scores each evaluation keeps
(hand-computed), the registry's choice across stages by the gate, and the report's "Alignment methods" table."""
from __future__ import annotations

import pytest

from flows.report import build_report
from refinery.config import RegistryArgs
from refinery.evaluation.alignment import head_to_head, significance_sentence
from refinery.ops import metrics_contract as mc
from refinery.ops.registry import choose_across


def _eval(policy: list[list[float]], win: float, ci: tuple[float, float], sha: str = "same") -> dict:
    verdict = "improved" if ci[0] > 0.5 else "worse" if ci[1] < 0.5 else "no significant change"
    return {"win_rate_vs_sft": win, "reference_score_policy": 0.4, "reference_score_sft": 0.4, "kl": 1.0,
            "n": len(policy), "reward_policy": 1.0, "reward_sft": 0.5,
            "win_rate": {"estimate": win, "ci_low": ci[0], "ci_high": ci[1], "n": len(policy), "null": 0.5,
                         "verdict": verdict},
            "reference_score_change": {"estimate": 0.0, "ci_low": -0.1, "ci_high": 0.1, "n": len(policy), "null": 0.0,
                                       "verdict": "no significant change"},
            "sampled_scores": {"policy": policy, "sft": [[0.0] * len(policy[0])] * len(policy), "prompts_sha256": sha}}


def test_head_to_head_is_the_share_of_answer_pairs_won_per_prompt():
    a = [[2.0, 0.0], [1.0, 1.0], [0.0, 0.0]]
    b = [[1.0, 1.0], [1.0, 0.0], [5.0, 5.0]]
    # prompt 1: (2>1, 2>1, 0<1, 0<1) = 2/4; prompt 2: (tie, 1>0, tie, 1>0) = 3/4; prompt 3: 0
    (row,) = head_to_head({"ppo": _eval(a, 0.6, (0.55, 0.65)), "dpo": _eval(b, 0.6, (0.55, 0.65))})
    assert (row["a"], row["b"], row["n"]) == ("ppo", "dpo", 3)
    assert row["estimate"] == pytest.approx((0.5 + 0.75 + 0.0) / 3)
    assert row["ci_low"] <= row["estimate"] <= row["ci_high"]


def test_a_clear_winner_is_significant_and_the_sentence_names_it():
    strong = [[3.0, 3.0]] * 50
    weak = [[1.0, 0.0]] * 50
    evals = {"ppo": _eval(weak, 0.55, (0.5, 0.6)), "grpo": _eval(strong, 0.9, (0.85, 0.95)),
             "dpo": _eval(weak, 0.55, (0.5, 0.6))}
    rows = {(r["a"], r["b"]): r for r in head_to_head(evals)}
    assert rows[("ppo", "grpo")]["verdict"] == "worse" and rows[("ppo", "grpo")]["estimate"] == 0.0
    assert rows[("ppo", "dpo")]["verdict"] == "no significant change"
    sentence = significance_sentence(list(rows.values()))
    assert "grpo over ppo" in sentence and "grpo over dpo" in sentence and "between ppo and dpo" in sentence


def test_stages_on_different_prompts_are_not_compared():
    rows = head_to_head({"ppo": _eval([[1.0]], 0.6, (0.5, 0.7), sha="x"), "dpo": _eval([[0.0]], 0.6, (0.5, 0.7))})
    assert "different held-out prompts" in rows[0]["skipped"] and "estimate" not in rows[0]


def test_the_registry_picks_the_best_stage_that_passes_the_gate():
    args = RegistryArgs()
    evals = {"ppo": _eval([[1.0]], 0.58, (0.52, 0.65)), "dpo": _eval([[1.0]], 0.64, (0.58, 0.70)),
             "grpo": _eval([[1.0]], 0.70, (0.45, 0.90))}  # highest estimate, but its CI reaches 0.5
    stage, why = choose_across(evals, args)
    assert stage == "dpo" and why["dpo"].startswith("chosen")
    assert "below dpo's 0.640" in why["ppo"] and "CI lower bound not above" in why["grpo"]
    # none passes: the highest win rate is registered (and stays challenger)
    stage, _ = choose_across({"ppo": _eval([[1.0]], 0.55, (0.45, 0.65)), "dpo": _eval([[1.0]], 0.52, (0.4, 0.6))}, args)
    assert stage == "ppo"


def test_the_report_has_one_alignment_row_per_stage_and_the_head_to_head():
    ppo, dpo = mc.example("ppo"), mc.example("dpo")
    ppo["eval"] = _eval([[1.0, 2.0]] * 50, 0.58, (0.52, 0.65))
    dpo["eval"] = _eval([[3.0, 3.0]] * 50, 0.64, (0.58, 0.70))
    dpo["general_retention"] = {"perplexity_change": -0.008, "ci_low": -0.01, "ci_high": -0.006, "n": 64,
                                "perplexity_before": 17.0, "perplexity_after": 16.9, "verdict": "improved",
                                "retained": True}
    text, plots = build_report({"ppo": ppo, "dpo": dpo}, alignment=["ppo", "dpo"])
    section = text.split("## Alignment methods", 1)[1].split("\n## ", 1)[0]
    rows = [ln for ln in section.splitlines() if ln.startswith(("| ppo |", "| dpo |"))]
    assert len(rows) == 2 and "0.640 [0.580, 0.700]" in rows[1] and "-0.8% [-1.0, -0.6]" in rows[1]
    assert "| ppo vs dpo | 50 | 0.000 [0.000, 0.000] | worse |" in section
    assert "dpo over ppo" in section
    assert "dpo/train.png" in plots and "DPO: win rate *improved*" in text
    assert "Head-to-head: ppo vs dpo *worse*" in text
    # a selected stage that has not run is named, not silently left out
    not_run = next(ln for ln in build_report({"ppo": ppo}, alignment=["ppo", "grpo"])[0].splitlines()
                   if ln.startswith("Not run"))
    assert not_run.endswith("grpo.")

"""PPO evaluation on held-out prompts: the PPO policy against the SFT policy, judged by the reward model,
by KL to the reference, and by agreement with the held-out reference answers, so that reward
over-optimisation (RM score up, reference agreement down) is visible."""
from __future__ import annotations

import torch

from refinery.rlhf.ppo_math import logprobs_from_logits
from refinery.rlhf.rollout import response_logits, sample
from refinery.train.reward_model import render, score
from refinery.evaluation.text_metrics import METRICS


def decode_responses(tokenizer, r) -> list[str]:
    return [tokenizer.decode(row[m.bool()], skip_special_tokens=True).strip()
            for row, m in zip(r.responses, r.response_mask)]


def rm_scores(reward_model, tokenizer, prompts: list[str], answers: list[str], max_length: int = 512) -> torch.Tensor:
    seqs = [render(tokenizer, p, a, max_length) for p, a in zip(prompts, answers)]
    return torch.tensor(score(reward_model, seqs, tokenizer.pad_token_id))


@torch.no_grad()
def evaluate_policy(policy, sft_model, sft_context, reward_model, tokenizer, records: list[dict],
                    prompt_ids: list[list[int]], cfg) -> tuple[dict, list[dict]]:
    """`sft_model` inside `sft_context()` is the SFT policy: the LoRA policy with its adapter disabled
    (weights held once), or a separate frozen copy with a null context."""
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id

    def greedy(model):
        return sample(model, prompt_ids, pad, eos, cfg.eval_max_new_tokens, 1.0, 0, 1.0, greedy=True)

    r_pol = greedy(policy)
    with sft_context():
        r_sft = greedy(sft_model)
    prompts = [r["prompt"] for r in records]
    a_pol, a_sft = decode_responses(tokenizer, r_pol), decode_responses(tokenizer, r_sft)
    s_pol, s_sft = rm_scores(reward_model, tokenizer, prompts, a_pol), rm_scores(reward_model, tokenizer, prompts, a_sft)
    wins = ((s_pol > s_sft).float() + 0.5 * (s_pol == s_sft).float()).mean()
    lp = logprobs_from_logits(response_logits(policy, r_pol), r_pol.responses)
    with sft_context():
        lp_ref = logprobs_from_logits(response_logits(sft_model, r_pol), r_pol.responses)
    kl = float(((lp - lp_ref) * r_pol.response_mask).sum(-1).mean())

    def ref_score(answers):
        vals = [METRICS[cfg.reference_metrics.get(r.get("task", ""), "rouge_l")](a, r["reference"])
                for a, r in zip(answers, records)]
        return sum(vals) / len(vals)

    result = {"reward_policy": float(s_pol.mean()), "reward_sft": float(s_sft.mean()), "win_rate_vs_sft": float(wins),
              "reference_score_policy": ref_score(a_pol), "reference_score_sft": ref_score(a_sft), "kl": kl,
              "n": len(records)}
    table = [{"prompt": p[:300], "reference": r["reference"], "ppo": a, "sft": b, "rm_ppo": round(float(x), 3),
              "rm_sft": round(float(y), 3)} for p, r, a, b, x, y in zip(prompts, records, a_pol, a_sft, s_pol, s_sft)]
    return result, table

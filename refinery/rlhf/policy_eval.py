"""PPO evaluation on held-out prompts: the PPO policy against the SFT policy, judged by the reward model,
by KL to the reference, and by agreement with the held-out reference answers, so that reward
over-optimisation (RM score up, reference agreement down) is visible.

Two win rates, both RM-judged with a bootstrap CI over prompts:
- sampled (the headline, and the registry gate, when `eval_samples` > 0): each policy answers every prompt
  `eval_samples` times at the rollout temperature, and a prompt's win is the share of its k x k answer pairs
  the PPO answer wins. This is the policy PPO trains and would serve: a stochastic one. Measured on the demo
  (n=50): greedy 0.550 [0.430, 0.670] with 15 of 50 prompts tied because both greedy answers were the same
  string, against sampled (k=4) 0.628 [0.558, 0.699] for the same two policies; a tie between identical
  greedy strings says that decoding collapsed both to one answer, not that the judge has no preference.
- greedy: one greedy answer each (also what the RM-score, reference-agreement and KL rows use)."""
from __future__ import annotations

import time

import torch

from refinery.data.formats import prompt_text
from refinery.evaluation.forgetting import general_losses, retention
from refinery.evaluation.heldout import in_prompt_order, length_batches
from refinery.evaluation.stats import paired_difference, win_rate
from refinery.evaluation.text_metrics import METRICS
from refinery.ops.host_memory import release_freed_memory
from refinery.rlhf.rollout import response_logits, sample
from refinery.train.reward_model import render, score

# EVAL_TRIM: the evaluation returns freed heap to the OS after each generation / scoring chunk. Its chunks
# differ in size (prompt lengths, 32 sampled rows at once), glibc keeps what they free, and without a trim the
# demo's PPO evaluation grew the stage from 1.84 to 2.52 GB resident with no more live tensors (the stage's peak,
# 2.80 GB, was here). A trim moves no live data: the answers and scores are the same to the last digit.


def decode_responses(tokenizer, r) -> list[str]:
    return [tokenizer.decode(row[m.bool()], skip_special_tokens=True).strip()
            for row, m in zip(r.responses, r.response_mask)]


def greedy_rollouts(model, tokenizer, prompt_ids: list[list[int]], max_new_tokens: int,
                    batch_size: int = 16) -> list[tuple[list[int], object]]:
    """One greedy answer per prompt, as (prompt indices, Rollout) per length batch."""
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    out = []
    for chunk in length_batches([len(p) for p in prompt_ids], batch_size):
        out.append((chunk, sample(model, [prompt_ids[i] for i in chunk], pad, eos, max_new_tokens, 1.0, 0, 1.0,
                                  greedy=True)))
        release_freed_memory()  # the chunk's KV cache and logits: see EVAL_TRIM
    return out


def sampled_answers(model, tokenizer, prompt_ids: list[list[int]], cfg, k: int, seed: int,
                    batch_size: int = 8) -> list[list[str]]:
    """k answers per prompt, sampled as the rollouts are (temperature, top-k, top-p), [n][k], prompts in length
    batches (`length_batches`); seeded, so the same model gives the same answers."""
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    out: list[list[str]] = [[] for _ in prompt_ids]
    torch.manual_seed(seed)
    for chunk in length_batches([len(p) for p in prompt_ids], batch_size):
        ids = [prompt_ids[i] for i in chunk for _ in range(k)]
        answers = decode_responses(tokenizer, sample(model, ids, pad, eos, cfg.eval_max_new_tokens, cfg.temperature,
                                                     cfg.top_k, cfg.top_p))
        for j, i in enumerate(chunk):
            out[i] = answers[j * k:(j + 1) * k]
        release_freed_memory()  # see EVAL_TRIM
    return out


def load_judge(reward_dir: str, trust_remote_code: bool, attn_implementation: str | None):
    """The reward model, frozen in eval mode on the compute device: the judge of rollouts and evaluations."""
    from refinery.modeling.loading import load_scalar_model, to_compute_device

    model = to_compute_device(load_scalar_model(reward_dir, trust_remote_code, attn_implementation=attn_implementation))
    return model.eval().requires_grad_(False)


class AdapterOffJudge(torch.nn.Module):
    """The reward model as PPO's value model with its adapter off: the value model is the reward model plus a
    LoRA/IA3 adapter and a trained copy of the score head (peft's modules_to_save), so with the adapter
    disabled it is the reward model, weight for weight, and PPO holds one model for both roles."""

    def __init__(self, value_model):
        super().__init__()
        self.value_model = value_model

    @property
    def device(self):
        return self.value_model.device

    def forward(self, **batch):
        with self.value_model.disable_adapter():
            return self.value_model(**batch)


def ppo_judge(value_model, method: str, reward_dir: str, trust_remote_code: bool, attn_implementation: str | None):
    """PPO's reward model: the value model with its adapter off where that is the reward model exactly (lora,
    ia3: adapters on the full-precision reward weights), else (full: every weight trains; qlora: a 4-bit base
    would judge with quantised weights) the reward model loaded on its own."""
    if method in ("lora", "ia3"):
        return AdapterOffJudge(value_model)
    return load_judge(reward_dir, trust_remote_code, attn_implementation)


def retention_against_sft(policy, sft_model, sft_context, general: list[dict], pad_id: int, seed: int) -> dict | None:
    """General-domain retention of the policy against its SFT policy (`sft_model` inside `sft_context()`) on the
    same paragraphs; None without a general set. Call it before the save, which merges an adapter away."""
    if not general:
        return None
    with sft_context():
        before = general_losses(sft_model, general, pad_id)
    release_freed_memory()  # see EVAL_TRIM
    return retention(before, general_losses(policy, general, pad_id), seed)


def win_rate_lines(evaluation: dict) -> dict[str, str]:
    """The win-rate lines of an alignment stage's Prefect summary and console line."""
    win = evaluation["win_rate"]
    return {"win rate vs SFT [95% CI]": (f"{win['estimate']:.3f} [{win['ci_low']:.3f}, {win['ci_high']:.3f}] "
                                         f"n={evaluation['n']}, {win['verdict']}"),
            "win rate basis": evaluation["win_rate_basis"]}


def score_lines(evaluation: dict) -> dict[str, str]:
    """The RM-score and reference-agreement lines (greedy answers, policy / SFT) of the same summary."""
    return {"RM score policy / sft": f"{evaluation['reward_policy']:.3f} / {evaluation['reward_sft']:.3f}",
            "reference score policy / sft": f"{evaluation['reference_score_policy']:.3f} / "
                                            f"{evaluation['reference_score_sft']:.3f}"}


def prompts_digest(prompts: list) -> str:
    """Which held-out prompts an evaluation used, in order: two policies' per-prompt scores pair only when equal."""
    import hashlib
    import json

    return hashlib.sha256(json.dumps(prompts, sort_keys=True, default=str).encode()).hexdigest()


def rm_scores(reward_model, tokenizer, prompts: list[str], answers: list[str], max_length: int = 512) -> torch.Tensor:
    """The reward model's score of each (prompt, answer). No trim here: PPO's and GRPO's reward functions call it
    every training step (PPO's trainer trims once per step, after the whole step); the evaluation trims after its own calls
    (`scored`)."""
    seqs = [render(tokenizer, p, a, max_length) for p, a in zip(prompts, answers)]
    return torch.tensor(score(reward_model, seqs, tokenizer.pad_token_id))


def scored(reward_model, tokenizer, prompts: list[str], answers: list[str]) -> torch.Tensor:
    """`rm_scores` for the evaluation, which then returns the scoring's freed heap (see EVAL_TRIM)."""
    scores = rm_scores(reward_model, tokenizer, prompts, answers)
    release_freed_memory()
    return scores


@torch.no_grad()
def exact_kl(policy_logits: torch.Tensor, ref_logits: torch.Tensor) -> torch.Tensor:
    """KL(policy || reference) at each response position [B, R], summed over the whole vocabulary (not the
    log-ratio of the sampled or greedy token, which is a one-sample estimate)."""
    logp = torch.log_softmax(policy_logits.float(), -1)
    logq = torch.log_softmax(ref_logits.float(), -1)
    return (logp.exp() * (logp - logq)).sum(-1)


@torch.no_grad()
def exact_kl_per_sequence(policy, sft_model, sft_context, r, batch_size: int = 8) -> torch.Tensor:
    """Exact KL(policy || SFT) summed over each response [B], `batch_size` sequences at a time (the logits of
    two policies over a 49k vocabulary for all 50 held-out answers at once were ~4 GB, the largest allocation
    of the whole ppo stage)."""
    out = []
    for start in range(0, r.sequences.shape[0], batch_size):
        sub = r.select(torch.arange(start, min(start + batch_size, r.sequences.shape[0])))
        policy_logits = response_logits(policy, sub)
        with sft_context():
            ref_logits = response_logits(sft_model, sub)
        out.append((exact_kl(policy_logits, ref_logits) * sub.response_mask).sum(-1))
        del policy_logits, ref_logits
        release_freed_memory()  # see EVAL_TRIM
    return torch.cat(out)


@torch.no_grad()
def evaluate_policy(policy, sft_model, sft_context, reward_model, tokenizer, records: list[dict],
                    prompt_ids: list[list[int]], cfg, seed: int = 0) -> tuple[dict, list[dict]]:
    """`sft_model` inside `sft_context()` is the SFT policy: the LoRA policy with its adapter disabled
    (weights held once), or a separate frozen copy with a null context. Win rate, RM-score change and
    reference-agreement change come with n, a 95% bootstrap CI over prompts and a verdict."""
    t0 = time.perf_counter()
    n = len(prompt_ids)
    r_pol = greedy_rollouts(policy, tokenizer, prompt_ids, cfg.eval_max_new_tokens)
    with sft_context():
        r_sft = greedy_rollouts(sft_model, tokenizer, prompt_ids, cfg.eval_max_new_tokens)
    prompts = [r["prompt"] for r in records]
    a_pol, a_sft = (in_prompt_order([(c, decode_responses(tokenizer, r)) for c, r in batches], n)
                    for batches in (r_pol, r_sft))
    s_pol, s_sft = scored(reward_model, tokenizer, prompts, a_pol), scored(reward_model, tokenizer, prompts, a_sft)
    greedy_wins = win_rate(s_pol.tolist(), s_sft.tolist(), seed=seed)
    wins, basis = greedy_wins, "greedy: one greedy answer per prompt from each policy"
    k = cfg.eval_samples
    if k > 0:
        sampled_pol = sampled_answers(policy, tokenizer, prompt_ids, cfg, k, seed)
        with sft_context():
            sampled_sft = sampled_answers(sft_model, tokenizer, prompt_ids, cfg, k, seed)

        def sampled_scores(answers):
            flat = scored(reward_model, tokenizer, [p for p in prompts for _ in range(k)],
                          [a for row in answers for a in row])
            return flat.view(len(prompts), k)

        by_prompt = {"policy": sampled_scores(sampled_pol).tolist(), "sft": sampled_scores(sampled_sft).tolist()}
        wins = win_rate(by_prompt["policy"], by_prompt["sft"], seed=seed)
        basis = (f"sampled: {k} answers per prompt from each policy at temperature {cfg.temperature}, "
                 f"a prompt's win = share of its {k}x{k} answer pairs won")
    kl_per_prompt = torch.tensor(in_prompt_order(
        [(c, exact_kl_per_sequence(policy, sft_model, sft_context, r).tolist()) for c, r in r_pol], n))

    def ref_scores(answers):
        return [METRICS[cfg.reference_metrics.get(r.get("task", ""), "rouge_l")](a, r["reference"])
                for a, r in zip(answers, records)]

    ref_pol, ref_sft = ref_scores(a_pol), ref_scores(a_sft)
    result = {"reward_policy": float(s_pol.mean()), "reward_sft": float(s_sft.mean()), "win_rate_vs_sft": wins.estimate,
              "reference_score_policy": sum(ref_pol) / len(ref_pol), "reference_score_sft": sum(ref_sft) / len(ref_sft),
              "kl": float(kl_per_prompt.mean()), "n": len(records),
              "win_rate": wins.as_dict(), "win_rate_basis": basis, "win_rate_greedy": greedy_wins.as_dict(),
              "reward_change": paired_difference(s_sft.tolist(), s_pol.tolist(), seed=seed).as_dict(),
              "reference_score_change": paired_difference(ref_sft, ref_pol, seed=seed).as_dict(),
              "seconds": round(time.perf_counter() - t0, 2)}
    if k > 0:  # what the report needs to judge two alignment stages against each other on the same prompts
        result["sampled_scores"] = {**{key: [[round(x, 6) for x in row] for row in v] for key, v in by_prompt.items()},
                                    "prompts_sha256": prompts_digest(prompts)}
    tasks = sorted({r.get("task") for r in records if r.get("task")})
    if len(tasks) > 1:  # a gain on one task can hide a loss on another (reward hacking on the harder one)
        result["reference_score_change_by_task"] = {
            t: paired_difference([s for s, r in zip(ref_sft, records) if r.get("task") == t],
                                 [s for s, r in zip(ref_pol, records) if r.get("task") == t], seed=seed).as_dict()
            for t in tasks}
    table = [{"prompt": prompt_text(p)[:300], "reference": r["reference"], "ppo": a, "sft": b, "rm_ppo": round(float(x), 3),
              "rm_sft": round(float(y), 3)} for p, r, a, b, x, y in zip(prompts, records, a_pol, a_sft, s_pol, s_sft)]
    if k > 0:
        for row, sp, ss in zip(table, sampled_pol, sampled_sft):
            row.update(ppo_sampled=sp, sft_sampled=ss)
    return result, table

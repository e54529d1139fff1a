"""GRPO's reward: models/reward scores each sampled answer exactly as ppo scores its rollouts (the answer decoded
as refinery/rlhf/policy_eval.py `decode_responses` decodes it, `render` + `score` through `rm_scores`), minus
`missing_eos_penalty` for an answer that did not end.

TRL's GRPOTrainer calls a reward function as `f(prompts=..., completions=..., completion_ids=..., **columns,
trainer_state=..., log_metric=...)`. An answer "ended" when its last token is one of the ids generation stops on:
TRL cuts `completion_ids` after the first of them, so a completion that hit `max_new_tokens` is the only kind whose
last id is not a stop id (the same test as TRL's own `mask_truncated_completions`, which this stage leaves off:
the penalty, as in ppo, is what teaches the policy to finish)."""
from __future__ import annotations

import json

from refinery.rlhf.policy_eval import rm_scores


def stop_ids(model, tokenizer) -> set[int]:
    """The ids TRL's GRPOTrainer ends a completion on: the tokenizer's EOS and every EOS id the model's
    generation config declares (e.g. an end-of-turn token beside end-of-text)."""
    ids = model.generation_config.eos_token_id if getattr(model, "generation_config", None) else None
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    return {tokenizer.eos_token_id, *ids}


class RewardModelScore:
    """The reward function handed to GRPOTrainer (a callable with a `__name__`, which TRL logs it under as
    `rewards/reward_model/mean`). Frozen judge in, one float per (prompt, completion) out. It also logs the raw RM
    score (`rm_score`, ppo's `reward_mean`) and the share of answers that ended (`eos_fraction`) per step, and keeps
    (step, prompt, reward) per answer for the within-prompt reward slope (refinery/evaluation/stats.py)."""

    __name__ = "reward_model"

    def __init__(self, reward_model, tokenizer, eos_ids: set[int], missing_eos_penalty: float | None,
                 max_length: int = 512):
        self.reward_model, self.tokenizer, self.eos_ids = reward_model, tokenizer, set(eos_ids)
        self.penalty, self.max_length = missing_eos_penalty, max_length
        self.episodes: list[list] = []  # [step, prompt key, reward] for the answers scored in this process

    def __call__(self, prompts: list, completions: list, completion_ids: list[list[int]], trainer_state=None,
                 log_metric=None, **_) -> list[float]:
        answers = [self.tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in completion_ids]
        raw = rm_scores(self.reward_model, self.tokenizer, prompts, answers, self.max_length).tolist()
        ended = [bool(ids) and ids[-1] in self.eos_ids for ids in completion_ids]
        rewards = [s - (self.penalty if self.penalty is not None and not e else 0.0) for s, e in zip(raw, ended)]
        if log_metric is not None:
            log_metric("rm_score", sum(raw) / len(raw))
            log_metric("eos_fraction", sum(ended) / len(ended))
        if trainer_state is not None:  # the step these answers train (global_step counts the steps done)
            step = trainer_state.global_step + 1
            self.episodes += [[step, json.dumps(p, sort_keys=True), r] for p, r in zip(prompts, rewards)]
        return rewards

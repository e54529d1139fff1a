"""PPO's values from a head on the policy's own trunk (params/ppo.yaml `value_model: policy_trunk`).

The default (`separate`) is InstructGPT's: a value model of its own, initialised from the reward model, which
costs a second trunk's forward in scoring and a second forward and backward in every mini-batch. With
`policy_trunk` the values are a linear head on the policy's last hidden state (as TRL's PPO did with
`AutoModelForCausalLMWithValueHead` before its 0.12 rewrite): one trunk forward gives the
response log-probs and the values, and one backward carries `pg_loss + vf_coef * vf_loss`, so the value loss
also trains the policy's adapter (`vf_coef` weighs how much). The head starts as a copy of the reward model's
score head: the reward model is the SFT model plus a merged adapter, so its head reads nearly the features the
policy's trunk gives, and its outputs are on the scores' raw scale, which PPO's score normaliser maps as it maps
the scores (ppo_trainer.ScoreScale). Memory and speed, measured: README "PPO memory" and bench/RESULTS-ppo.md.
"""
from __future__ import annotations

import torch

from refinery.modeling.loading import unwrapped
from refinery.rlhf.ppo_math import entropy_from_logits, logprobs_from_logits
from refinery.rlhf.rollout import Rollout, response_hidden, unflatten


class TrunkValueHead(torch.nn.Module):
    """hidden state -> value; its only parameters are the head's (the trunk is the policy's, trained there)."""

    def __init__(self, hidden_size: int, init_weight: torch.Tensor | None = None):
        super().__init__()
        self.score = torch.nn.Linear(hidden_size, 1)
        with torch.no_grad():
            self.score.bias.zero_()
            if init_weight is not None:
                self.score.weight.copy_(init_weight.detach().reshape(1, hidden_size).float())

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.score(hidden).squeeze(-1).float()


def check_trunk_head(policy_dir: str, reward_dir: str) -> None:
    """Refuse, before anything loads, a pair a trunk head cannot serve: the head is initialised from the reward
    model's score head, so the hidden sizes must match, and the logits are read as lm_head(last hidden state)."""
    import json
    from pathlib import Path

    from refinery.errors import UserError

    policy_cfg = json.loads((Path(policy_dir) / "config.json").read_text())
    reward_cfg = json.loads((Path(reward_dir) / "config.json").read_text())
    if policy_cfg.get("final_logit_softcapping"):
        raise UserError(f"{policy_dir}/config.json: final_logit_softcapping is set, and value_model: policy_trunk "
                        "reads the logits before any cap (use value_model: separate)")
    if policy_cfg.get("hidden_size") != reward_cfg.get("hidden_size"):
        raise UserError(f"{reward_dir}/config.json: hidden_size {reward_cfg.get('hidden_size')} is not the policy's "
                        f"{policy_cfg.get('hidden_size')}: value_model: policy_trunk starts its head from the reward "
                        "model's score head (use value_model: separate)")


def head_from_reward_model(policy, reward_model) -> TrunkValueHead:
    """A head on `policy`'s device, initialised from the reward model's score head (call it before the reward
    model's frozen weights are cast to 16 bits)."""
    score = unwrapped(reward_model).score.weight
    return TrunkValueHead(unwrapped(policy).config.hidden_size, score).to(next(policy.parameters()).device)


def trunk_stats(policy, head: TrunkValueHead, r: Rollout, temperature: float = 1.0):
    """(log-probs of the sampled tokens, entropy, raw values), [B, R] each, from one forward of the policy's
    trunk: the LM head and the value head read the same hidden states, at the positions that predict the
    response tokens (rollout.policy_stats and rollout.values read the same positions, each with its own model)."""
    inner = unwrapped(policy)
    hidden, keep = response_hidden(inner, r)
    logits = inner.get_output_embeddings()(hidden) / temperature
    if keep is None:
        return logprobs_from_logits(logits, r.responses), entropy_from_logits(logits), head(hidden)
    return (unflatten(logprobs_from_logits(logits, r.responses[keep]), keep),
            unflatten(entropy_from_logits(logits), keep), unflatten(head(hidden), keep))

"""`value_model: policy_trunk`: one forward of the policy's trunk gives the log-probs the policy gives on its own and
the values a scalar model with the same trunk and head gives; the summed loss trains the policy's adapter and the
head; a PPO run with the head learns the rule reward and resumes exactly; a reward model the head cannot start
from is refused in one line before anything loads."""
import dataclasses
import json

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from refinery.config import PPOParams
from refinery.errors import UserError
from refinery.rlhf.ppo_trainer import PPOTrainer
from refinery.rlhf.rollout import policy_stats, values
from refinery.rlhf.value_head import TrunkValueHead, check_trunk_head, head_from_reward_model, trunk_stats
from tests.test_ppo import CFG, build
from tests.test_ppo_memory import lora_policy, rollout  # noqa: F401 (rollout: a fixture)
from tests.test_ppo_padding_free import early_eos


def scalar_twin(tiny_base, pad_id):
    """A scalar model on the tiny base's trunk with a non-trivial score head: the head's starting point."""
    torch.manual_seed(3)
    rm = AutoModelForSequenceClassification.from_pretrained(tiny_base, num_labels=1)
    rm.config.pad_token_id = pad_id
    with torch.no_grad():
        rm.score.weight.normal_(0, 0.5)
    return rm


@pytest.mark.parametrize("padding_free", [False, True])
def test_one_trunk_forward_gives_the_policy_logprobs_and_the_scalar_models_values(tiny_base, rollout,  # noqa: F811
                                                                                   padding_free):
    tok, r = rollout
    r = dataclasses.replace(early_eos(r, row=0, keep=2), padding_free=padding_free)
    policy = lora_policy(tiny_base)
    rm = scalar_twin(tiny_base, tok.pad_token_id)
    head = head_from_reward_model(policy, rm)
    assert torch.equal(head.score.weight, rm.score.weight) and float(head.score.bias.detach()) == 0.0
    with torch.no_grad():
        logprobs, entropy, v = trunk_stats(policy, head, r, temperature=0.7)
        want_lp, want_ent = policy_stats(policy, r, temperature=0.7)
        with policy.disable_adapter():  # the base trunk is the scalar model's trunk
            base_v = trunk_stats(policy, head, r)[2]
        want_v = values(rm, r)
    mask = r.response_mask.bool()
    assert torch.allclose(logprobs[mask], want_lp[mask], atol=1e-5)
    assert torch.allclose(entropy[mask], want_ent[mask], atol=1e-5)
    assert torch.allclose(base_v[mask], want_v[mask], atol=1e-5)
    assert not torch.allclose(v[mask], base_v[mask], atol=1e-3)  # the policy's adapter moves the values too


def test_the_summed_loss_trains_the_policy_adapter_and_the_head(tiny_base, rollout):  # noqa: F811
    tok, r = rollout
    policy = lora_policy(tiny_base)
    head = head_from_reward_model(policy, scalar_twin(tiny_base, tok.pad_token_id))
    mask = r.response_mask.float()
    _, _, v = trunk_stats(policy, head, r)
    ((v * mask).pow(2).sum()).backward()  # a value loss alone
    lora_grads = [p.grad for n, p in policy.named_parameters() if p.requires_grad]
    assert head.score.weight.grad.abs().sum() > 0
    assert any(g is not None and g.abs().sum() > 0 for g in lora_grads)


def trunk_trainer(tiny_base, tmp_path, cfg: dict, **hooks):
    policy, _, tok, prompts, reward_fn = build(tiny_base)
    head = TrunkValueHead(policy.config.hidden_size)
    return PPOTrainer(PPOParams(**cfg, value_model="policy_trunk"), policy, head, reward_fn, prompts, tok, tmp_path,
                      seed=0, **hooks)


def test_a_trunk_head_ppo_run_learns_the_rule_reward(tiny_base, tmp_path):
    trainer = trunk_trainer(tiny_base, tmp_path, {**CFG, "steps": 12})
    assert trainer.shared_trunk
    state = trainer.train()
    rewards = [h["reward_mean"] for h in state.history]
    assert sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3 + 0.3, rewards
    assert state.history[-1]["value_loss"] < state.history[0]["value_loss"], [h["value_loss"] for h in state.history]


def test_a_trunk_head_run_resumes_exactly(tiny_base, tmp_path):
    ref = trunk_trainer(tiny_base, tmp_path / "ref", CFG).train()

    class Crash(Exception):
        pass

    def crash_at_5(step, metrics, _rollout):
        if step == 5:
            raise Crash

    with pytest.raises(Crash):
        trunk_trainer(tiny_base, tmp_path / "run", CFG, on_step=crash_at_5).train()
    again = trunk_trainer(tiny_base, tmp_path / "run", CFG)
    state = again.train()
    assert again.resumed_from == 4
    for a, b in zip(state.history, ref.history):
        for key in ("reward_mean", "kl", "value_loss"):
            assert a[key] == pytest.approx(b[key], abs=1e-5), key


def test_a_reward_model_of_another_width_is_refused_by_file_and_field(tmp_path):
    for name, width in (("sft", 64), ("reward", 32)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps({"hidden_size": width}))
    with pytest.raises(UserError, match=r"reward/config.json: hidden_size 32 is not the policy's 64"):
        check_trunk_head(str(tmp_path / "sft"), str(tmp_path / "reward"))
    (tmp_path / "reward" / "config.json").write_text(json.dumps({"hidden_size": 64}))
    check_trunk_head(str(tmp_path / "sft"), str(tmp_path / "reward"))

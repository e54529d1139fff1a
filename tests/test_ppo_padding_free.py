"""PPO's padding-free forwards (rollout.flat_inputs): the rows' real tokens joined into one row give the padded
batch's log-probs, entropies, values and gradients on every response token, 0 elsewhere, and the same PPO run."""
import dataclasses

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForSequenceClassification

from refinery.config import PPOParams
from refinery.data.chat import prompt_ids
from refinery.modeling.loading import load_tokenizer
from refinery.rlhf.ppo_trainer import PPOTrainer
from refinery.rlhf.rollout import flat_inputs, policy_stats, values
from tests.test_ppo_memory import LORA, lora_policy, ppo_history, rollout  # noqa: F401 (rollout: a fixture)


def early_eos(r, row: int, keep: int):
    """`r` with row `row`'s answer ended after `keep` tokens (as a sampled EOS would): masked columns after it."""
    resp_mask = r.response_mask.clone()
    resp_mask[row, keep:] = 0
    seq = r.sequences.clone()
    seq[row, r.prompt_width + keep:] = 0
    attention = torch.cat([r.attention_mask[:, :r.prompt_width], resp_mask], 1)
    return dataclasses.replace(r, sequences=seq, attention_mask=attention, response_mask=resp_mask)


def value_model(tiny_base, pad_id):
    torch.manual_seed(2)
    v = AutoModelForSequenceClassification.from_pretrained(tiny_base, num_labels=1)
    v.config.pad_token_id = pad_id
    return get_peft_model(v, LoraConfig(task_type="SEQ_CLS", **LORA))


def forward_and_grads(policy, value, r):
    policy.zero_grad()
    value.zero_grad()
    logprobs, entropy = policy_stats(policy, r, temperature=0.7)
    v = values(value, r)
    mask = r.response_mask.float()
    ((logprobs * mask).sum() + (entropy * mask).sum() + (v * mask).pow(2).sum()).backward()
    grads = {n: p.grad.clone() for m in (policy, value) for n, p in m.named_parameters() if p.requires_grad}
    return logprobs.detach(), entropy.detach(), v.detach(), grads


def test_the_joined_row_gives_the_padded_batch_numbers_and_gradients(tiny_base, rollout):  # noqa: F811
    tok, r = rollout
    r = early_eos(r, row=0, keep=2)
    lengths = r.attention_mask.sum(-1)
    assert len(set(lengths.tolist())) > 1 and (r.response_mask == 0).any()  # real padding on both sides
    f = flat_inputs(r)
    assert f.input_ids.shape == (1, int(lengths.sum())) and f.input_ids.numel() < r.sequences.numel()
    assert f.position_ids[0, :int(lengths[0])].tolist() == list(range(int(lengths[0])))  # restarts per row
    policy, value = lora_policy(tiny_base), value_model(tiny_base, tok.pad_token_id)
    padded = forward_and_grads(policy, value, r)
    flat = forward_and_grads(policy, value, dataclasses.replace(r, padding_free=True))
    mask = r.response_mask.bool()
    for want, got in zip(padded[:3], flat[:3]):
        assert torch.allclose(got[mask], want[mask], atol=1e-5)
        assert (got[~mask] == 0).all()
    for name, g in padded[3].items():
        assert torch.allclose(flat[3][name], g, rtol=1e-4, atol=1e-6), name
    assert any(g.abs().sum() > 0 for g in flat[3].values())


def test_padding_free_gives_the_same_ppo_run(tiny_base, tmp_path):
    padded = ppo_history(tiny_base, tmp_path, False, padding_free=False)
    flat = ppo_history(tiny_base, tmp_path, False, padding_free=True)
    for a, b in zip(padded, flat):
        for key in ("reward_mean", "kl", "policy_loss", "value_loss", "approx_kl", "entropy", "explained_variance"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), key
    assert padded[-1]["policy_loss"] != padded[0]["policy_loss"]  # the run did update


def test_auto_is_on_for_a_cpu_and_the_rollouts_carry_it(tiny_base, tmp_path):
    tok = load_tokenizer(tiny_base)
    prompts = [prompt_ids(tok, f"Say {'more ' * i}") for i in range(4)]
    policy, value = lora_policy(tiny_base), value_model(tiny_base, tok.pad_token_id)
    seen = []
    for setting, want in (("auto", not torch.cuda.is_available()), (False, False)):
        cfg = PPOParams(steps=1, batch_size=4, mini_batch_size=2, max_new_tokens=4, padding_free=setting)
        trainer = PPOTrainer(cfg, policy, value, lambda idx, r: r.response_mask.sum(-1).float(), prompts, tok,
                             tmp_path / str(setting), seed=0, on_step=lambda step, m, r: seen.append(r.padding_free))
        assert trainer.padding_free is want
        trainer.train()
        assert seen[-1] is want

"""The PPO review findings, each with a test that failed before its fix: scores and values on one scale,
dropout off, an explicit sampling config, the exact eval KL, and the alignments a reviewer asked to see
(rollout/value positions, adapter-off = reference weights, reward pooling when pad == eos)."""
import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from refinery.config import PPOParams
from refinery.data.chat import conversation_ids, prompt_ids
from refinery.modeling.loading import load_tokenizer
from refinery.rlhf.policy_eval import exact_kl
from refinery.rlhf.ppo_math import gae_advantages, masked_whiten, per_token_rewards
from refinery.rlhf.ppo_trainer import PPOTrainer, ScoreScale
from refinery.rlhf.rollout import policy_stats, response_logits, sample, values
from refinery.train.reward_model import score


def advantage_signs(value_offset: float, scale: bool) -> tuple[float, float]:
    """A batch where the value model predicts the raw RM scores' mean (it starts as the reward model) while
    the scores are normalised. Returns (share of rows whose whitened advantage changes sign between the first
    and the last response token, share of rows whose last-token advantage has the sign of the score)."""
    g = torch.Generator().manual_seed(0)
    raw = 3.0 + 0.5 * torch.randn(512, generator=g)
    mask = torch.ones(512, 16)
    s = ScoreScale()
    s.fit(raw)
    v = torch.full((512, 16), value_offset)
    rewards, _ = per_token_rewards(s(raw), torch.zeros(512, 16), 0.0, mask)
    adv, _ = gae_advantages(rewards, s(v) if scale else v, mask, 1.0, 0.95)
    w = masked_whiten(adv, mask)
    flips = float(((w[:, 0] > 0) != (w[:, -1] > 0)).float().mean())
    agree = float(((w[:, -1] > 0) == (s(raw) > 0)).float().mean())
    return flips, agree


def test_values_and_scores_share_one_scale():
    """The review's synthetic check: a raw-scale value bias of 3.0 against normalised scores (gamma 1,
    lam 0.95) makes the advantage's sign depend on the position, not on the score; on one scale it follows
    the score."""
    flips, agree = advantage_signs(3.0, scale=False)
    assert flips > 0.5 and agree < 0.8  # the bug: measured 0.77 and 0.68
    flips, agree = advantage_signs(3.0, scale=True)
    assert flips < 0.05 and agree > 0.95  # measured 0.01 and 0.996


@pytest.fixture
def tiny(tiny_base):
    torch.manual_seed(0)
    tok = load_tokenizer(tiny_base)
    prompts = [prompt_ids(tok, f"Tell me about topic {i}.") for i in range(8)]
    return tok, prompts


def test_rollouts_ignore_the_models_generation_config(tiny_base, tiny):
    """generation_config.json settings (repetition penalty, top-k, n-gram blocking) must not change what is
    sampled: greedy rollout tokens are the argmax of the policy's own logits at every position."""
    tok, prompts = tiny
    model = AutoModelForCausalLM.from_pretrained(tiny_base)
    model.generation_config.repetition_penalty = 50.0
    model.generation_config.no_repeat_ngram_size = 1
    model.generation_config.top_k = 1
    r = sample(model, prompts, tok.pad_token_id, tok.eos_token_id, 12, 1.0, 0, 1.0, greedy=True)
    m = r.response_mask.bool()
    assert torch.equal(response_logits(model, r).argmax(-1)[m], r.responses[m])


def test_dropout_is_off_in_every_ppo_model(tiny_base, tiny):
    tok, prompts = tiny
    policy = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_base, attention_dropout=0.3),
                            LoraConfig(r=4, lora_alpha=8, lora_dropout=0.5, target_modules=["q_proj", "v_proj"]))
    value = AutoModelForSequenceClassification.from_pretrained(tiny_base, num_labels=1, attention_dropout=0.3)
    trainer = PPOTrainer(PPOParams(steps=1, batch_size=4, mini_batch_size=2), policy, value, lambda i, r: torch.zeros(4),
                         prompts, tok, "unused", seed=0)
    for model in (trainer.policy, trainer.value_model):
        assert all(m.p == 0.0 for m in model.modules() if isinstance(m, torch.nn.Dropout))
    r = sample(policy, prompts[:2], tok.pad_token_id, tok.eos_token_id, 6, 1.0, 0, 1.0)
    policy.train()  # the PPO epochs run in train mode: the log-probs must still be the sampling policy's
    assert torch.equal(policy_stats(policy, r)[0], policy_stats(policy, r)[0])


def test_exact_kl():
    p = torch.randn(2, 3, 11)
    assert torch.allclose(exact_kl(p, p), torch.zeros(2, 3), atol=1e-6)
    q = torch.randn(2, 3, 11)
    lp, lq = torch.log_softmax(p, -1), torch.log_softmax(q, -1)
    assert torch.allclose(exact_kl(p, q), (lp.exp() * (lp - lq)).sum(-1), atol=1e-6)
    assert (exact_kl(p, q) >= 0).all() and (exact_kl(p, q) > 0).any()


def test_values_line_up_with_response_tokens(tiny_base, tiny):
    """values()[:, t] is the value head on the hidden state that predicts response token t, i.e. after
    prompt + t response tokens: the same as running the model on that prefix alone."""
    tok, prompts = tiny
    policy = AutoModelForCausalLM.from_pretrained(tiny_base)
    value = AutoModelForSequenceClassification.from_pretrained(tiny_base, num_labels=1)
    r = sample(policy, prompts[:1], tok.pad_token_id, tok.eos_token_id, 5, 1.0, 0, 1.0)
    v = values(value, r)[0]
    seq = r.sequences[0]
    for t in range(int(r.response_mask[0].sum())):
        prefix = seq[: r.prompt_width + t].unsqueeze(0)
        hidden = value.model(input_ids=prefix).last_hidden_state[:, -1]
        assert float(value.score(hidden)) == pytest.approx(float(v[t]), abs=1e-4), t


def test_disabled_adapter_is_the_reference(tiny_base, tiny):
    """With the LoRA adapter disabled the policy is exactly the SFT weights, even after training moved it."""
    tok, prompts = tiny
    policy = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_base),
                            LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    reference = AutoModelForCausalLM.from_pretrained(tiny_base)
    r = sample(reference, prompts[:3], tok.pad_token_id, tok.eos_token_id, 6, 1.0, 0, 1.0)
    assert not torch.allclose(response_logits(policy, r), response_logits(reference, r), atol=1e-4)
    with policy.disable_adapter():
        assert torch.allclose(response_logits(policy, r), response_logits(reference, r), atol=1e-5)


def test_reward_pools_on_the_last_real_token_when_pad_is_eos(tiny_base, tiny):
    """SmolLM2's pad token is its end-of-turn token. A conversation scored alone and inside a right-padded
    batch with a longer one gets the same score (pooling on its last token, not on a pad)."""
    tok, _ = tiny
    assert tok.pad_token_id == tok.eos_token_id
    rm = AutoModelForSequenceClassification.from_pretrained(tiny_base, num_labels=1)
    rm.config.pad_token_id = tok.pad_token_id
    short = conversation_ids(tok, "hi", "yes")
    long = conversation_ids(tok, "hello there, a longer prompt", "a much longer answer than the other one")
    alone = score(rm, [short], tok.pad_token_id)[0]
    batched = score(rm, [short, long], tok.pad_token_id)[0]
    assert batched == pytest.approx(alone, abs=1e-5)
    hidden = rm.model(input_ids=torch.tensor([short])).last_hidden_state[:, -1]
    assert float(rm.score(hidden)) == pytest.approx(alone, abs=1e-5)  # the last token, the answer's end


def test_left_padded_passes_never_use_cudnn_attention(tiny_base, tiny, tmp_path):
    """cuDNN's SDPA kernel drew NaN sampling probabilities from left-padded rollouts on an H200 (1B, bf16,
    bench/RESULTS-gpu.md): rollout sampling, every forward of a PPO step and batched evaluation generation run
    with that backend off (the flag is global, so it reads the same on a CPU)."""
    from refinery.evaluation.heldout import generate_batch

    tok, prompts = tiny
    seen = []
    policy = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_base),
                            LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    value = get_peft_model(AutoModelForSequenceClassification.from_pretrained(tiny_base, num_labels=1),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="SEQ_CLS"))
    for model in (policy, value):  # the trunk: generation calls the inner model, not the peft wrapper
        model.get_base_model().model.register_forward_pre_hook(
            lambda *_: seen.append(torch.backends.cuda.cudnn_sdp_enabled()))
    cfg = PPOParams(steps=1, batch_size=4, mini_batch_size=2, max_new_tokens=4, save_steps=1)
    PPOTrainer(cfg, policy, value, lambda idx, r: torch.zeros(len(idx)), prompts, tok, tmp_path / "ppo", 0).train()
    generate_batch(policy, tok, prompts[:3], 3)
    assert len(seen) > 10 and not any(seen), seen
    assert torch.backends.cuda.cudnn_sdp_enabled()  # restored outside

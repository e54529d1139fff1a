"""PPO's memory savings change no number: frozen linears held in bf16 give the outputs autocast gave with fp32
weights, the merged policy equals the fp32 merge, the response-only logits equal the full logits' slice, the
chunked evaluation KL equals the one-batch KL, and gradient checkpointing (of every layer or every other one)
gives the same PPO run."""
import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from refinery.config import PPOParams
from refinery.data.chat import prompt_ids
from refinery.modeling.loading import load_tokenizer, save_output
from refinery.modeling.precision import compute_precision, frozen_in_16bit, store_frozen_linears
from refinery.rlhf.policy_eval import exact_kl, exact_kl_per_sequence
from refinery.rlhf.ppo_trainer import PPOTrainer
from refinery.rlhf.rollout import response_logits, sample

LORA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.0)


def lora_policy(tiny_base, seed=0):
    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_base), LoraConfig(task_type="CAUSAL_LM", **LORA))
    with torch.no_grad():  # a trained-looking adapter: B is zero at init, which would make the merge trivial
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    return model


@pytest.fixture
def rollout(tiny_base):
    tok = load_tokenizer(tiny_base)
    prompts = [prompt_ids(tok, f"Question {i}: {'why ' * i}?") for i in range(6)]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_base)
    return tok, sample(model, prompts, tok.pad_token_id, tok.eos_token_id, 8, 1.0, 0, 1.0)


def test_frozen_linears_in_bf16_change_no_output_under_autocast(tiny_base, rollout):
    _, r = rollout
    policy = lora_policy(tiny_base)
    judge = AutoModelForSequenceClassification.from_pretrained(tiny_base, num_labels=1).requires_grad_(False)
    judge.config.pad_token_id = 0
    with compute_precision("bf16", "cpu"):
        want_logits = response_logits(policy, r)
        want_scores = judge(input_ids=r.sequences, attention_mask=r.attention_mask).logits
    assert store_frozen_linears(policy, "bf16") > 0 and store_frozen_linears(judge, "bf16") > 0
    assert frozen_in_16bit(policy)
    inner = policy.get_base_model()
    assert inner.model.layers[0].self_attn.q_proj.base_layer.weight.dtype == torch.bfloat16
    assert inner.model.layers[0].self_attn.q_proj.lora_A["default"].weight.dtype == torch.float32  # trained
    assert inner.model.embed_tokens.weight.dtype == torch.float32  # the residual stream's input
    assert inner.lm_head.weight.dtype == torch.float32  # tied to the embedding in SmolLM2's config
    assert inner.model.norm.weight.dtype == torch.float32
    with compute_precision("bf16", "cpu"):
        assert torch.equal(response_logits(policy, r), want_logits)
        assert torch.equal(judge(input_ids=r.sequences, attention_mask=r.attention_mask).logits, want_scores)
    assert store_frozen_linears(lora_policy(tiny_base), "fp32") == 0  # fp32 stages keep everything


def test_a_policy_with_bf16_frozen_linears_saves_the_fp32_merge(tiny_base, tmp_path):
    want = lora_policy(tiny_base).merge_and_unload().state_dict()
    policy = lora_policy(tiny_base)
    store_frozen_linears(policy, "bf16")
    tok = load_tokenizer(tiny_base)
    save_output(policy, tok, "lora", tmp_path / "out", tiny_base)
    got = load_file(tmp_path / "out" / "model.safetensors")
    for name, t in got.items():
        assert t.dtype == torch.float32, name
        assert torch.allclose(t, want[name], atol=1e-6), name
    AutoModelForCausalLM.from_pretrained(tmp_path / "out")  # plain transformers loads it


def test_response_logits_equal_the_full_logits_slice(tiny_base, rollout):
    _, r = rollout
    model = lora_policy(tiny_base)
    full = model(input_ids=r.sequences, attention_mask=r.attention_mask, position_ids=r.position_ids()).logits
    assert torch.allclose(response_logits(model, r), full[:, r.prompt_width - 1:-1], atol=1e-5)


def test_chunked_evaluation_kl_equals_one_batch(tiny_base, rollout):
    _, r = rollout
    policy = lora_policy(tiny_base)
    whole = (exact_kl(response_logits(policy, r), _adapter_off(policy, r)) * r.response_mask).sum(-1)
    chunked = exact_kl_per_sequence(policy, policy, policy.disable_adapter, r, batch_size=4)
    assert chunked.shape == (6,) and (whole > 0).all()
    assert torch.allclose(chunked, whole, atol=1e-5)


def _adapter_off(policy, r):
    with policy.disable_adapter():
        return response_logits(policy, r)


def ppo_history(tiny_base, tmp_path, checkpointing: int, padding_free: bool | str = "auto") -> list[dict]:
    """`checkpointing`: 0 off, n: every n-th decoder layer recomputes (params/ppo.yaml checkpoint_every_n_layers)."""
    tok = load_tokenizer(tiny_base)
    prompts = [prompt_ids(tok, f"Tell me about topic {i}.") for i in range(8)]
    torch.manual_seed(0)
    policy = AutoModelForCausalLM.from_pretrained(tiny_base)
    value = AutoModelForSequenceClassification.from_pretrained(tiny_base, num_labels=1)
    value.config.pad_token_id = tok.pad_token_id
    if checkpointing:
        policy.activation_checkpointing_enable(every_n_layers=checkpointing)
        value.activation_checkpointing_enable(every_n_layers=checkpointing)
        flags = [layer.gradient_checkpointing for layer in policy.model.layers]
        assert flags == [i % checkpointing == 0 for i in range(len(flags))]
    policy = get_peft_model(policy, LoraConfig(task_type="CAUSAL_LM", **LORA))
    value = get_peft_model(value, LoraConfig(task_type="SEQ_CLS", **LORA))
    cfg = PPOParams(steps=3, batch_size=4, mini_batch_size=2, max_new_tokens=6, lr=1e-3, temperature=1.0,
                    padding_free=padding_free)

    def reward(idx, r):  # longer answers score higher: a signal the policy can move
        return r.response_mask.sum(-1).float() / 6

    trainer = PPOTrainer(cfg, policy, value, reward, prompts, tok, tmp_path / f"ckpt{checkpointing}{padding_free}",
                         seed=0)
    return trainer.train().history


@pytest.mark.parametrize("every_n_layers", [1, 2])
def test_gradient_checkpointing_gives_the_same_ppo_run(tiny_base, tmp_path, every_n_layers):
    plain, recomputed = ppo_history(tiny_base, tmp_path, 0), ppo_history(tiny_base, tmp_path, every_n_layers)
    for a, b in zip(plain, recomputed):
        for key in ("reward_mean", "kl", "policy_loss", "value_loss", "approx_kl"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key
    assert plain[-1]["policy_loss"] != plain[0]["policy_loss"]  # the run did update


@pytest.mark.parametrize("method", ["lora", "ia3"])
def test_the_value_model_with_its_adapter_off_is_the_reward_model(tiny_base, rollout, tmp_path, method):
    """PPO holds one model for value and reward: after the value adapter and its score head have trained, the
    adapter-off value model scores every rollout exactly as the reward model loaded on its own does."""
    from refinery.modeling.loading import load_scalar_model
    from refinery.modeling.methods import apply_method
    from refinery.rlhf.policy_eval import AdapterOffJudge, load_judge, ppo_judge
    from refinery.train.reward_model import score

    tok, r = rollout
    torch.manual_seed(1)
    rm = AutoModelForSequenceClassification.from_pretrained(tiny_base, num_labels=1)
    rm.config.pad_token_id = tok.pad_token_id
    with torch.no_grad():
        rm.score.weight.normal_(0, 0.5)
    rm.save_pretrained(tmp_path / "reward")
    cfg = PPOParams(method=method)
    value = apply_method(load_scalar_model(tmp_path / "reward", method=cfg), cfg, "SEQ_CLS", str(tmp_path / "reward"))
    with torch.no_grad():  # as after PPO updates: the adapter and the trainable head copy have moved
        for p in value.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn_like(p))
    judge = ppo_judge(value, method, str(tmp_path / "reward"), False, None)
    assert isinstance(judge, AdapterOffJudge)
    seqs = [row[m.bool()].tolist() for row, m in zip(r.sequences, r.attention_mask)]
    alone = score(load_judge(str(tmp_path / "reward"), False, None), seqs, tok.pad_token_id)
    shared = score(judge, seqs, tok.pad_token_id)
    assert shared == alone
    assert score(value, seqs, tok.pad_token_id) != alone  # the adapter is on outside the judge
    assert not isinstance(ppo_judge(value, "full", str(tmp_path / "reward"), False, None), AdapterOffJudge)

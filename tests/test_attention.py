"""`attn_implementation` (params/base.yaml): passed to every model a stage loads, validated by name, and a
kernel this machine cannot run is refused in one line before anything loads."""
import pytest

from refinery.config import load_params
from refinery.errors import UserError
from refinery.modeling.loading import attention_kwargs, load_causal_lm, load_scalar_model


def test_the_kernel_reaches_the_loaded_models(tiny_base):
    assert load_causal_lm(tiny_base).config._attn_implementation == "sdpa"  # null: transformers' default
    assert load_causal_lm(tiny_base, attn_implementation="eager").config._attn_implementation == "eager"
    scalar = load_scalar_model(tiny_base, attn_implementation="eager", num_labels=1)
    assert scalar.config._attn_implementation == "eager"


def test_unknown_or_unrunnable_kernels_are_refused(tmp_path, monkeypatch):
    import torch

    (tmp_path / "base.yaml").write_text("attn_implementation: flash\n")
    with pytest.raises(UserError, match="attn_implementation"):
        load_params("base", tmp_path)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match=r"^params/base.yaml: attn_implementation: flash_attention_2 needs a CUDA GPU"):
        attention_kwargs("flash_attention_2")
    assert attention_kwargs(None) == {} and attention_kwargs("sdpa") == {"attn_implementation": "sdpa"}


def test_segment_attention_gives_the_block_mask_numbers_and_gradients(tiny_base, tmp_path, monkeypatch):
    """`attn_implementation: segment_sdpa`: padding-free rows (reward pairs, PPO rollouts, `padding_free: true`
    in dapt/sft) run SDPA once per sequence (refinery/modeling/attention.py) instead of over the whole row under
    a block-diagonal mask: the same logits and gradients as sdpa (fp32); any other batch falls back to sdpa with
    its mask. The name is not written into a saved config (plain transformers could not load it)."""
    import json

    import torch
    from transformers import AutoModelForCausalLM

    from refinery.modeling.attention import SEGMENT_SDPA

    g = torch.Generator().manual_seed(0)
    lengths = (5, 9, 7)
    joined = {"input_ids": torch.randint(5, 400, (1, sum(lengths)), generator=g),
              "position_ids": torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)}
    padded = {"input_ids": torch.randint(5, 400, (2, 9), generator=g),
              "attention_mask": torch.tensor([[1] * 9, [0] * 4 + [1] * 5])}  # left-padded second row
    single = {"input_ids": padded["input_ids"][1:], "attention_mask": padded["attention_mask"][1:],
              "position_ids": torch.tensor([[1, 1, 1, 1, 0, 1, 2, 3, 4]])}  # how generate positions a left-padded row

    def run(model, batch):
        model.zero_grad()
        logits = model(**batch, use_cache=False).logits
        logits.float().pow(2).mean().backward()
        return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    model = AutoModelForCausalLM.from_pretrained(tiny_base)
    want = {name: run(model, b) for name, b in (("joined", joined), ("padded", padded), ("single", single))}
    model = load_causal_lm(tiny_base, attn_implementation="segment_sdpa")  # the same weights, the other kernel
    assert model.config._attn_implementation == SEGMENT_SDPA
    import transformers.integrations.sdpa_attention as sdpa_module

    fallbacks, plain = [], sdpa_module.sdpa_attention_forward
    monkeypatch.setattr(sdpa_module, "sdpa_attention_forward", lambda *a, **k: fallbacks.append(1) or plain(*a, **k))
    for name, b in (("joined", joined), ("padded", padded), ("single", single)):
        fallbacks.clear()
        logits, grads = run(model, b)
        assert (len(fallbacks) == 0) == (name == "joined"), name  # only the joined row runs per sequence
        mask = b.get("attention_mask", torch.ones_like(b["input_ids"])).bool()
        assert torch.allclose(logits[mask], want[name][0][mask], atol=1e-5), name
        for n, grad in want[name][1].items():
            assert torch.allclose(grads[n], grad, rtol=1e-4, atol=1e-6), (name, n)
    # without the restarts honoured (one causal pass over the whole row) the joined row's numbers differ
    whole = model(input_ids=joined["input_ids"], use_cache=False).logits.detach()
    assert not torch.allclose(whole, want["joined"][0], atol=1e-3)
    model.save_pretrained(tmp_path / "saved")
    assert SEGMENT_SDPA not in json.dumps(json.loads((tmp_path / "saved" / "config.json").read_text()))
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "saved").config._attn_implementation == "sdpa"


def test_segment_plans_read_sequences_and_branches_from_positions():
    """How segment_sdpa reads a joined row: a run of positions from 0 is a sequence; one from k > 0 is a branch
    sharing the first k tokens of the last sequence (the reward stage's shared prompts); anything else keeps
    sdpa's mask (None)."""
    from refinery.modeling.attention import parse_segments

    assert parse_segments([0, 1, 2, 0, 1]) == [(0, 3, 0, 0), (3, 5, 3, 0)]
    assert parse_segments([0, 1, 2, 3, 2, 3, 0, 1, 1]) == [(0, 4, 0, 0), (4, 6, 0, 2), (6, 8, 6, 0), (8, 9, 6, 1)]
    assert parse_segments([1, 1, 0, 1, 2]) is None  # a left-padded row as generate positions it
    assert parse_segments([0, 1, 4, 5]) is None  # a branch sharing more than its sequence has
    assert parse_segments([0, 1, 0, 1, 2, 3]) == [(0, 2, 0, 0), (2, 6, 2, 0)]

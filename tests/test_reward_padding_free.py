"""Padding-free reward batches (`padding_free: true` in params/reward.yaml): the joined row gives the padded batch's
scores, loss and gradients, and the stage trains with it."""
import csv
import json
import math
import shutil

import pytest
import torch

from refinery.train.reward_model import (
    FlatPairCollator,
    PairCollator,
    bradley_terry_loss,
    init_reward_model,
    padding_free_on,
    pair_attention,
    pair_collator,
    pair_layout,
    scalar_head,
    sequence_scores,
)


def test_auto_is_on_where_it_was_measured_to_pay(monkeypatch):
    """`padding_free: auto`: on a CPU (bench/RESULTS-padding-free.md) and with flash_attention_2; off on a GPU under
    sdpa/eager; true/false as written."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert padding_free_on("auto", None) and padding_free_on("auto", "sdpa")
    assert not padding_free_on(False, None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert not padding_free_on("auto", "sdpa") and not padding_free_on("auto", None)
    assert padding_free_on("auto", "flash_attention_2") and padding_free_on(True, "sdpa")


def lora_reward_model(tiny_base, attn=None):
    """The stage's set-up: a scalar head on the base, LoRA on every projection, the head trained in full (peft's
    modules_to_save wrapper: the hook must see its trained copy)."""
    from peft import LoraConfig, get_peft_model

    model = init_reward_model(str(tiny_base), pad_token_id=2, seed=0, attn_implementation=attn)
    peft = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, init_lora_weights="gaussian",
                                            target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    with torch.no_grad():  # a head unlike the base's copy, so reading the wrong one shows
        scalar_head(peft).modules_to_save["default"].weight.normal_(0, 0.5)
    return peft


def test_padding_free_pairs_give_the_padded_scores_loss_and_gradients(tiny_base):
    g = torch.Generator().manual_seed(0)
    lengths = [(9, 4), (23, 17), (6, 30), (15, 15)]  # chosen and rejected of different lengths: the padded batch pads
    features = [{"chosen": torch.randint(5, 400, (c,), generator=g).tolist(),
                 "rejected": torch.randint(5, 400, (r,), generator=g).tolist()} for c, r in lengths]
    padded, flat = PairCollator(2)(features), FlatPairCollator()(features)
    assert flat["input_ids"].numel() == sum(c + r for c, r in lengths) < padded["input_ids"].numel()
    assert flat["score_index"].tolist()[:2] == [8, 8 + 23]  # the last token of each sequence

    results = {}
    for name, batch in (("padded", padded), ("flat", flat)):
        torch.manual_seed(0)
        model = lora_reward_model(tiny_base)
        scores = sequence_scores(model, batch)
        loss = bradley_terry_loss(*scores.chunk(2))
        loss.backward()
        results[name] = (scores.detach(), float(loss.detach()),
                         {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    (s_pad, l_pad, g_pad), (s_flat, l_flat, g_flat) = results["padded"], results["flat"]
    assert s_flat.shape == (8,) and torch.allclose(s_flat, s_pad, atol=1e-5), (s_flat, s_pad)
    assert abs(l_flat - l_pad) < 1e-6
    assert g_pad and set(g_pad) == set(g_flat)
    assert any("modules_to_save" in n for n in g_pad)  # the trained head got its gradient in both
    for n, grad in g_pad.items():
        assert torch.allclose(g_flat[n], grad, atol=1e-6, rtol=1e-4), n

    # without the position restarts a sequence would attend to the ones before it: other scores
    model = lora_reward_model(tiny_base)
    leaky = {**flat, "position_ids": torch.arange(flat["input_ids"].shape[1])[None]}
    with torch.no_grad():
        assert not torch.allclose(sequence_scores(model, leaky)[1:], s_pad[1:], atol=1e-3)


def scores_loss_grads(model, batch):
    scores = sequence_scores(model, batch)
    loss = bradley_terry_loss(*scores.chunk(2))
    loss.backward()
    return scores.detach(), float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters()
                                                   if p.grad is not None}


def test_pairs_sharing_their_prompt_give_the_padded_scores_loss_and_gradients(tiny_base):
    """`share_prompts: true`: under segment_sdpa each pair's common prefix (its prompt) is computed once, the
    rejected answer a branch after it: the padded batch's scores, loss and gradients (fp32), from fewer positions;
    tokens/s still counts the pairs' tokens."""
    g = torch.Generator().manual_seed(1)
    shapes = [(7, 3, 5), (20, 9, 1), (0, 6, 8), (12, 1, 1), (5, 11, 11)]  # (shared prompt, chosen, rejected) tails
    features = []
    for prompt, c, r in shapes:
        head = torch.randint(5, 400, (prompt,), generator=g).tolist()
        chosen, rejected = torch.randint(5, 400, (c,), generator=g).tolist(), torch.randint(5, 400, (r,), generator=g).tolist()
        rejected[0] = chosen[0] + 1  # the answers differ from their first token
        features.append({"chosen": head + chosen, "rejected": head + rejected})
    features.append({"chosen": [9, 8, 7], "rejected": [9, 8, 7]})  # identical sequences: each keeps its scored token
    shared = pair_collator(True, 2, share_prompts=True)(features)
    computed = shared["input_ids"].shape[1]
    every = sum(len(f["chosen"]) + len(f["rejected"]) for f in features)
    assert computed == every - sum(p for p, _, _ in shapes) - 2 and int(shared["pair_tokens"]) == every

    torch.manual_seed(0)
    want = scores_loss_grads(lora_reward_model(tiny_base), PairCollator(2)(features))
    torch.manual_seed(0)
    got = scores_loss_grads(lora_reward_model(tiny_base, "segment_sdpa"), shared)
    assert got[0].shape == (12,) and torch.allclose(got[0], want[0], atol=1e-5), (got[0], want[0])
    assert abs(got[1] - want[1]) < 1e-6
    assert want[2] and set(want[2]) == set(got[2])
    for n, grad in want[2].items():
        assert torch.allclose(got[2][n], grad, atol=1e-6, rtol=1e-4), n

    # the same row under plain sdpa reads each branch as a sequence of its own (no prompt): other scores
    with torch.no_grad():
        plain = sequence_scores(lora_reward_model(tiny_base, "sdpa"), shared)
    for i in (6, 7, 9, 10):  # the rejected answers of the pairs with a prompt
        assert abs(float(plain[i]) - float(want[0][i])) > 1e-4, i


def test_shared_prompts_choose_their_kernel_and_refuse_another():
    """share_prompts: the model loads with segment_sdpa (null/sdpa in params/base.yaml), a kernel of another family
    is refused in one line; without it the stage keeps params/base.yaml's kernel and never shares."""
    from refinery.errors import UserError

    assert pair_attention(True, None) == pair_attention(True, "sdpa") == "segment_sdpa"
    assert pair_attention(False, None) is None and pair_attention(False, "eager") == "eager"
    with pytest.raises(UserError, match=r"^params/reward.yaml: share_prompts: true needs .* not eager$"):
        pair_attention(True, "eager")
    assert pair_layout(True, False, None) == (True, "segment_sdpa")  # shared prompts are always joined
    assert pair_layout(False, False, "eager") == (False, "eager")
    assert isinstance(pair_collator(False, 2), PairCollator)
    assert not pair_collator(True, 2).shared_prefix and pair_collator(False, 2, share_prompts=True).shared_prefix


@pytest.fixture
def reward_project(project, prepared):
    shutil.copytree(prepared, project / "data" / "prepared")
    shutil.copytree(project / "models" / "base", project / "models" / "sft")
    return project


def test_reward_stage_trains_padding_free(reward_project, prefect_server):
    """The stage with `padding_free: true` (and with `share_prompts: true`) against the same run padded (same pairs,
    order and seed): the loss falls (rule-based pairs, as tests/test_reward.py's stage test), it counts exactly the
    real tokens the padded run counts, and its losses follow the padded run's (bf16 autocast where the CPU has it:
    close, not equal)."""
    from flows.reward import reward_flow

    train = reward_project / "data" / "prepared" / "preferences" / "train.jsonl"
    rows = [json.loads(line) for line in train.read_text().splitlines()]
    train.write_text("".join(json.dumps({**r, "rejected": "I don't know."}) + "\n" for r in rows))
    overrides = {"training.max_steps": 24, "training.batch_size": 8, "training.lr": 0.003, "training.warmup_ratio": 0.0,
                 "max_length": 128, "eval.max_pairs": 16, "method": "lora", "task_weights": {}}
    runs = {}
    for name, setting in (("padded", {"padding_free": False}), ("flat", {"padding_free": True}),
                          ("shared", {"padding_free": True, "share_prompts": True})):
        metrics = reward_flow(overrides={**overrides, **setting})
        losses = [float(r["loss"]) for r in csv.DictReader(open(reward_project / "plots" / "reward" / "train.csv"))]
        runs[name] = metrics, losses
    (padded, pad_losses) = runs["padded"]
    for name in ("flat", "shared"):
        metrics, losses = runs[name]
        assert len(losses) == 24
        assert sum(losses[-6:]) / 6 < min(sum(losses[:6]) / 6, math.log(2)), " ".join(f"{v:.3f}" for v in losses)
        # "non_padding" padded = every token joined; shared prompts count for both answers (pair_tokens)
        assert metrics["train"]["tokens"] == padded["train"]["tokens"] > 0, name
        assert max(abs(a - b) for a, b in zip(losses, pad_losses)) < 0.05, (name, losses, pad_losses)
        assert metrics["eval"]["n"] == 16
    assert runs["shared"][0]["train"]["attention"] == "segment_sdpa" and runs["flat"][0]["train"]["attention"] == "sdpa"

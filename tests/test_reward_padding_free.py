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


def lora_reward_model(tiny_base):
    """The stage's set-up: a scalar head on the base, LoRA on every projection, the head trained in full (peft's
    modules_to_save wrapper: the hook must see its trained copy)."""
    from peft import LoraConfig, get_peft_model

    model = init_reward_model(str(tiny_base), pad_token_id=2, seed=0)
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


@pytest.fixture
def reward_project(project, prepared):
    shutil.copytree(prepared, project / "data" / "prepared")
    shutil.copytree(project / "models" / "base", project / "models" / "sft")
    return project


def test_reward_stage_trains_padding_free(reward_project, prefect_server):
    """The stage with `padding_free: true` against the same run padded (same pairs, order and seed): the loss falls
    (rule-based pairs, as tests/test_reward.py's stage test), it counts exactly the real tokens the padded run counts,
    and its losses follow the padded run's (bf16 autocast where the CPU has it: close, not equal)."""
    from flows.reward import reward_flow

    train = reward_project / "data" / "prepared" / "preferences" / "train.jsonl"
    rows = [json.loads(line) for line in train.read_text().splitlines()]
    train.write_text("".join(json.dumps({**r, "rejected": "I don't know."}) + "\n" for r in rows))
    overrides = {"training.max_steps": 24, "training.batch_size": 8, "training.lr": 0.003, "training.warmup_ratio": 0.0,
                 "max_length": 128, "eval.max_pairs": 16, "method": "lora", "task_weights": {}}
    runs = {}
    for padding_free in (False, True):
        metrics = reward_flow(overrides={**overrides, "padding_free": padding_free})
        losses = [float(r["loss"]) for r in csv.DictReader(open(reward_project / "plots" / "reward" / "train.csv"))]
        runs[padding_free] = metrics, losses
    (padded, pad_losses), (flat, losses) = runs[False], runs[True]
    assert len(losses) == 24
    assert sum(losses[-6:]) / 6 < min(sum(losses[:6]) / 6, math.log(2)), " ".join(f"{v:.3f}" for v in losses)
    assert flat["train"]["tokens"] == padded["train"]["tokens"] > 0  # "non_padding" padded = every token joined
    assert max(abs(a - b) for a, b in zip(losses, pad_losses)) < 0.05, (losses, pad_losses)
    assert flat["eval"]["n"] == 16

"""Reward model: the Bradley-Terry loss by hand, and the stage on the tiny model (loss down, output loads
and scores with plain transformers, metrics follow the contract)."""
import csv
import json
import math
import shutil

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from flows.reward import reward_flow
from refinery.train.reward_model import bradley_terry_loss


def test_bradley_terry_by_hand():
    # -log σ(1 - 0) = log(1 + e^-1) = 0.31326; with margin 0.5: log(1 + e^-0.5) = 0.47408
    rc, rr = torch.tensor([1.0, 2.0]), torch.tensor([0.0, 1.0])
    assert float(bradley_terry_loss(rc, rr)) == pytest.approx(math.log1p(math.exp(-1)), abs=1e-6)
    assert float(bradley_terry_loss(rc, rr, 0.5)) == pytest.approx(math.log1p(math.exp(-0.5)), abs=1e-6)


@pytest.fixture
def reward_project(project, prepared):
    shutil.copytree(prepared, project / "data" / "prepared")
    shutil.copytree(project / "models" / "base", project / "models" / "sft")
    return project


SMALL = {"training.max_steps": 8, "training.batch_size": 8, "training.lr": 0.003, "training.warmup_ratio": 0.0,
         "max_length": 128, "eval.max_pairs": 16}


@pytest.mark.parametrize("method", ["lora", "full"])
def test_reward_stage(reward_project, prefect_server, method):
    """The stage trains, records and saves a plain-transformers reward model. Its training pairs are made
    rule-based (the demo's prompts and chosen answers against one fixed wrong answer): the demo's own rejected
    answers are built so that nothing but content separates them (length included), which a random 2-layer model
    cannot learn in a test's budget; the real model's accuracy is in README "Measured"."""
    train = reward_project / "data" / "prepared" / "preferences" / "train.jsonl"
    rows = [json.loads(line) for line in train.read_text().splitlines()]
    train.write_text("".join(json.dumps({**r, "rejected": "I don't know."}) + "\n" for r in rows))
    # 24 steps: at 8 the random tiny model's batch loss still wanders around log 2 (the last one is chance)
    # full fine-tuning at lr 3e-3 collapses every score to one value (loss exactly log 2): 3e-4 for it
    metrics = reward_flow(overrides={**SMALL, "method": method, "training.max_steps": 24, "task_weights": {},
                                     **({"training.lr": 0.0003} if method == "full" else {})})
    on_disk = json.loads((reward_project / "reports" / "reward" / "evaluation.json").read_text())
    assert {"accuracy", "margin"} <= set(on_disk["eval"]) and "pairs_per_second" in on_disk["train"]
    assert 0 <= on_disk["eval"]["accuracy"] <= 1 and len(on_disk["eval"]["calibration"]) == 4
    history = metrics["train"]
    losses = [float(r["loss"]) for r in csv.DictReader(open(reward_project / "plots" / "reward" / "train.csv"))]
    assert history["steps"] == 24 and len(losses) == 24
    # the Bradley-Terry loss went down: the last 6 steps' mean below the first 6 steps' and below log 2
    assert sum(losses[-6:]) / 6 < min(sum(losses[:6]) / 6, math.log(2)), " ".join(f"{v:.3f}" for v in losses)

    out = reward_project / "models" / "reward"
    rm = AutoModelForSequenceClassification.from_pretrained(out)  # plain transformers
    tok = AutoTokenizer.from_pretrained(out)
    text = tok.apply_chat_template([{"role": "user", "content": "Which module defines `dumps`?"},
                                    {"role": "assistant", "content": "json"}], tokenize=False)
    with torch.no_grad():
        value = rm(**tok(text, return_tensors="pt")).logits[0, 0]
    assert torch.isfinite(value)


def test_reward_refuses_prompt_learning(reward_project, prefect_server):
    state = reward_flow(overrides={**SMALL, "method": "prefix"}, return_state=True)
    assert state.is_failed() and "not supported in stage 'reward'" in state.message


def test_ppo_stage_on_tiny_models(reward_project, prefect_server):
    """The PPO flow wires sft + reward + prompts (here with the preference prompts too: params
    `prompt_sources`) together and writes the metrics contract."""
    from flows.ppo import ppo_flow

    reward_flow(overrides={**SMALL, "method": "lora"})
    metrics = ppo_flow(overrides={"steps": 2, "batch_size": 4, "mini_batch_size": 2, "max_new_tokens": 6,
                                  "eval_prompts": 4, "eval_max_new_tokens": 6, "save_steps": 1,
                                  "prompt_sources": ["prompts", "preferences"]})
    manifest = json.loads((reward_project / "models" / "ppo" / "refinery_manifest.json").read_text())
    assert set(manifest["inputs"]) == {"model", "reward", "prompts", "preferences"}
    on_disk = json.loads((reward_project / "reports" / "ppo" / "evaluation.json").read_text())
    for key in ("reward_first", "reward_last", "kl_last", "steps", "episodes_per_second", "peak_memory_mb"):
        assert key in on_disk["train"], key
    for key in ("reward_policy", "reward_sft", "win_rate_vs_sft", "reference_score_policy", "reference_score_sft", "kl"):
        assert key in on_disk["eval"], key
    assert on_disk["train"]["steps"] == 2 and 0 <= on_disk["eval"]["win_rate_vs_sft"] <= 1
    assert metrics["eval"]["n"] == 4
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(reward_project / "models" / "ppo")


def test_task_weights_oversample_and_warn_about_absent_tasks(capsys):
    """`task_weights` repeats a task's pairs (the fractional part as a seeded share of them); a weight naming a
    task no pair has (the demo's which_module weight on a user's own data, or a typo) does nothing and says so in
    one line naming the params file and field."""
    from refinery.train.reward_model import weight_tasks

    rows = [{"task": "a", "i": i} for i in range(10)] + [{"task": "b", "i": i} for i in range(4)]
    out = weight_tasks(rows, {"b": 2.5}, seed=0, source="params/reward.yaml")
    assert sum(r["task"] == "a" for r in out) == 10 and sum(r["task"] == "b" for r in out) == 10
    assert {r["i"] for r in out if r["task"] == "b"} == set(range(4))
    assert out == weight_tasks(rows, {"b": 2.5}, seed=0, source="x")  # seeded
    assert weight_tasks(rows, {}, seed=0, source="x") is rows
    capsys.readouterr()
    assert weight_tasks(rows, {"c": 2.0}, seed=0, source="params/reward.yaml") is rows
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["warning: params/reward.yaml: task_weights.c: no training pair has task 'c' (tasks: a, b); "
                   "this weight does nothing"]

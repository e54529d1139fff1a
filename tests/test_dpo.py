"""DPO: the loss TRL computes, set up as the stage sets it up, is the DPO formula with the adapter-off model as
the LoRA reference; the stage raises the chosen-over-rejected log-ratio on a rule-based preference set and
records and saves like the other stages (plain transformers loads the output; the metrics follow the contract)."""
from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from flows.dpo import dpo_arguments, dpo_flow, model_for_trl, preference_rows
from refinery.config import DPOParams
from refinery.ops import metrics_contract as mc


def answer_logp(model, tok, prompt: str, answer: str) -> float:
    """log p(answer | prompt) with plain transformers: the tokens of the chat-rendered conversation after the
    rendered prompt (the answer, its end-of-turn token and what the template puts after it)."""
    head = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
    full = tok.apply_chat_template([{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}])
    head, full = (list(x["input_ids"] if hasattr(x, "keys") else x) for x in (head, full))
    ids = torch.tensor([full])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
    picked = logp[torch.arange(ids.shape[1] - 1), ids[0, 1:]]
    return float(picked[len(head) - 1:].sum())


def test_dpo_loss_on_a_hand_computed_pair_is_the_formula(tiny_base, tmp_path):
    """TRL's loss on one pair, set up as the stage sets it up (our conversational rows, DPOConfig fields, the
    LoRA config handed to TRL), equals -log σ(β((log π(c) - log ref(c)) - (log π(r) - log ref(r)))) computed
    here from plain forward passes with the reference = the policy with its adapter off: so that is TRL's
    reference (given an already-wrapped model it would have used a frozen copy of the initial adapter)."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(tiny_base)
    cfg = DPOParams(method="lora")
    model, config = model_for_trl(AutoModelForCausalLM.from_pretrained(tiny_base), cfg, seed=0)
    pair = {"prompt": "Which module defines `dumps`?", "chosen": "json", "rejected": "I don't know."}
    args = DPOConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, per_device_train_batch_size=1,
                     **dpo_arguments(cfg))
    trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(preference_rows([pair])),
                         processing_class=tok, peft_config=config)
    policy = trainer.model
    with torch.no_grad():  # move the adapter off zero, as training would (a fresh LoRA B is zero: margin 0)
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    policy.eval()
    with torch.no_grad():
        loss = float(trainer.compute_loss(trainer.model, trainer.data_collator([trainer.train_dataset[0]])))
        pc, pr = (answer_logp(policy, tok, pair["prompt"], pair[k]) for k in ("chosen", "rejected"))
        with policy.disable_adapter():
            rc, rr = (answer_logp(policy, tok, pair["prompt"], pair[k]) for k in ("chosen", "rejected"))
    margin = (pc - rc) - (pr - rr)
    assert abs(margin) > 0.05  # the adapter moves the policy: a margin of 0 would make any loss read log 2
    assert loss == pytest.approx(math.log1p(math.exp(-0.1 * margin)), abs=1e-4)


def test_preference_rows_are_conversational():
    rows = preference_rows([{"prompt": "Which module defines `dumps`?", "chosen": "json", "rejected": "os"},
                            {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
                             "chosen": "Hello.", "rejected": "Go away."}])
    assert rows[0]["prompt"] == [{"role": "user", "content": "Which module defines `dumps`?"}]
    assert rows[0]["chosen"] == [{"role": "assistant", "content": "json"}]
    assert rows[1]["prompt"][0]["role"] == "system"


@pytest.fixture
def dpo_project(project, prepared):
    """models/sft = the tiny base, models/reward = a scalar head on it, and rule-based pairs: the demo's prompts
    and chosen answers against one fixed wrong answer (learnable by a random 2-layer model in a few steps)."""
    shutil.copytree(prepared, project / "data" / "prepared")
    shutil.copytree(project / "models" / "base", project / "models" / "sft")
    rm = AutoModelForSequenceClassification.from_pretrained(project / "models" / "base", num_labels=1)
    tok = AutoTokenizer.from_pretrained(project / "models" / "base")
    rm.config.pad_token_id = tok.pad_token_id
    rm.save_pretrained(project / "models" / "reward")
    tok.save_pretrained(project / "models" / "reward")
    for split in ("train", "validation"):
        path = project / "data" / "prepared" / "preferences" / f"{split}.jsonl"
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        path.write_text("".join(json.dumps({**r, "rejected": "I don't know."}) + "\n" for r in rows))
    return project


def log_ratio(model, tok, pairs: list[dict]) -> float:
    """Mean over pairs of log p(chosen) - log p(rejected) (answer tokens only), with plain transformers."""
    return sum(answer_logp(model, tok, p["prompt"], p["chosen"]) - answer_logp(model, tok, p["prompt"], p["rejected"])
               for p in pairs) / len(pairs)


def test_dpo_stage_raises_the_chosen_over_rejected_log_ratio(dpo_project, prefect_server):
    metrics = dpo_flow(overrides={"training.max_steps": 8, "training.lr": 0.003})
    val = [json.loads(line) for line in
           (dpo_project / "data" / "prepared" / "preferences" / "validation.jsonl").read_text().splitlines()][:16]
    tok = AutoTokenizer.from_pretrained(dpo_project / "models" / "dpo")
    sft = AutoModelForCausalLM.from_pretrained(dpo_project / "models" / "sft").eval()
    dpo = AutoModelForCausalLM.from_pretrained(dpo_project / "models" / "dpo").eval()  # plain transformers
    before, after = log_ratio(sft, tok, val), log_ratio(dpo, tok, val)
    assert after > before + 1.0, (before, after)  # held-out pairs: the policy moved towards the chosen answers
    mc.validate("dpo", metrics)
    on_disk = json.loads((dpo_project / "metrics" / "dpo.json").read_text())
    assert on_disk["train"]["steps"] == 8 and on_disk["train"]["beta"] == 0.1
    assert 0 <= on_disk["eval"]["win_rate_vs_sft"] <= 1 and on_disk["eval"]["n"] == 4
    assert "sampled" in json.loads((dpo_project / "reports" / "dpo" / "evaluation.json").read_text())["eval"][
        "win_rate_basis"]


def test_dpo_refuses_a_prompt_learning_method(dpo_project, prefect_server):
    state = dpo_flow(overrides={"method": "prefix"}, return_state=True)
    assert state.is_failed() and "not supported in stage 'dpo'" in state.message
    assert not (dpo_project / "models" / "dpo").exists()

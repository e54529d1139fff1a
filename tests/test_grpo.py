"""GRPO: TRL's GRPOTrainer, set up as the stage sets it up (grpo_arguments + model_for_trl), raises a rule-based
reward, uses the adapter-off model as the LoRA reference, and is rewarded exactly as ppo scores its rollouts; the
stage records and saves like the other stages (plain transformers loads the output; the metrics follow the
contract) and refuses bad input in one line before training."""
from __future__ import annotations

import csv
import json
import shutil

import mlflow
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from flows.grpo import grpo_arguments, grpo_flow, main, prompt_rows
from refinery.config import GRPOParams
from refinery.ops import metrics_contract as mc
from refinery.rlhf.grpo_reward import RewardModelScore, stop_ids
from refinery.rlhf.policy_eval import load_judge
from refinery.rlhf.trl_policy import model_for_trl
from refinery.train.reward_model import render, score


def grpo_trainer(tiny_base, tmp_path, cfg: GRPOParams, reward, prompts: list[str], seed: int = 0):
    """GRPOTrainer as flows/grpo.py builds it (run_trainer's TrainingArguments aside)."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    tok = AutoTokenizer.from_pretrained(tiny_base)
    model, config = model_for_trl(AutoModelForCausalLM.from_pretrained(tiny_base), cfg, seed)
    t = cfg.training
    args = GRPOConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, max_steps=t.max_steps,
                      learning_rate=t.lr, lr_scheduler_type="constant", logging_steps=1, save_strategy="no",
                      seed=seed, **grpo_arguments(cfg))
    return GRPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(prompt_rows(
        [{"prompt": p} for p in prompts])), processing_class=tok, reward_funcs=[reward], peft_config=config), tok


def test_grpo_raises_a_rule_based_reward(tiny_base, tmp_path):
    """Reward = share of answer tokens in a target half of the vocabulary (tokens whose embedding leans along a
    fixed direction, so one LoRA direction can favour all of them). A random tiny model starts at ~0.5; 12 GRPO
    steps of 4 prompts x 4 answers lift it clearly (seeds 0-4: last four steps 0.77-0.85 from first two
    0.41-0.52). Temperature 0.1: the tiny model's logits are ~0.1 apart, too flat for any policy at 1.0."""
    emb = AutoModelForCausalLM.from_pretrained(tiny_base).get_input_embeddings().weight.detach()
    direction = torch.randn(emb.shape[1], generator=torch.Generator().manual_seed(0))
    target = set((emb @ direction > 0).nonzero().flatten().tolist())

    def target_share(prompts, completions, completion_ids, **_):
        return [sum(i in target for i in ids) / max(len(ids), 1) for ids in completion_ids]

    cfg = GRPOParams(method="lora", num_generations=4, max_new_tokens=8, temperature=0.1, beta=0.04,
                     training={"max_steps": 12, "batch_size": 4, "lr": 0.003})
    trainer, _ = grpo_trainer(tiny_base, tmp_path, cfg, target_share, [f"Question {i}: which module?" for i in range(8)])
    trainer.train()
    rewards = [h["reward"] for h in trainer.state.log_history if "reward" in h]
    assert len(rewards) == 12
    first, last = sum(rewards[:2]) / 2, sum(rewards[-4:]) / 4
    assert last > 0.65 and last > first + 0.15, rewards


def test_lora_reference_is_the_adapter_off_model(tiny_base, tmp_path):
    """TRL's reference log-probs, after every lora_B moved off zero (as training would move it), equal the
    adapter-off model's and differ from the policy's: a frozen copy of the adapter (TRL's "ref" adapter, what it
    does with an already-wrapped model) would have moved too and given other numbers."""
    cfg = GRPOParams(method="lora", num_generations=2, max_new_tokens=6, temperature=0.7, beta=0.04,
                     training={"max_steps": 1, "batch_size": 1})
    trainer, _ = grpo_trainer(tiny_base, tmp_path, cfg, lambda prompts, **_: [0.0] * len(prompts),
                              ["Which module defines `dumps`?"])
    policy = trainer.model
    assert trainer.ref_model is None and "ref" not in policy.peft_config
    with torch.no_grad():
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    policy.train()
    batch = trainer._generate_and_score_completions([dict(trainer.train_dataset[0]) for _ in range(2)])
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
    mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
    width, keep = batch["prompt_ids"].shape[1], batch["completion_mask"].bool()

    def logps(model):
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask).logits[:, width - 1:-1].float() / cfg.temperature
        return torch.log_softmax(logits, -1).gather(-1, batch["completion_ids"][..., None])[..., 0]

    with policy.disable_adapter():
        adapter_off = logps(policy)
    ref = batch["ref_per_token_logps"]
    # TRL's chunked, temperature-scaled log-softmax differs from this plain one by ~2e-3 nats (measured); the
    # adapter moves the policy ~0.8 away, and a frozen adapter copy would move the reference as far
    assert (ref[keep] - adapter_off[keep]).abs().max() < 1e-2
    assert (ref[keep] - logps(policy)[keep]).abs().max() > 0.3


def test_reward_is_ppo_scoring_minus_the_eos_penalty(tiny_base, tmp_path):
    """The reward of an answer that ended is refinery.train.reward_model.score of render(prompt, answer), as ppo
    scores a rollout; one cut at max_new_tokens (no EOS) gets missing_eos_penalty less."""
    torch.manual_seed(0)
    rm = AutoModelForSequenceClassification.from_pretrained(tiny_base, num_labels=1)
    tok = AutoTokenizer.from_pretrained(tiny_base)
    rm.config.pad_token_id = tok.pad_token_id
    rm.save_pretrained(tmp_path / "reward")
    judge = load_judge(str(tmp_path / "reward"), False, None)
    scorer = RewardModelScore(judge, tok, stop_ids(AutoModelForCausalLM.from_pretrained(tiny_base), tok), 0.7)
    prompt = [{"role": "user", "content": "Which module defines `dumps`?"}]
    answer, other = "json", "the os module, I think"
    ids = tok.encode(answer, add_special_tokens=False) + [tok.eos_token_id]
    cut = tok.encode(other, add_special_tokens=False)
    rewards = scorer([prompt, prompt], [[{"role": "assistant", "content": "x"}]] * 2, [ids, cut])
    expected = score(judge, [render(tok, prompt, answer, 512), render(tok, prompt, other, 512)], tok.pad_token_id)
    assert rewards[0] == pytest.approx(expected[0], abs=1e-5)
    assert rewards[1] == pytest.approx(expected[1] - 0.7, abs=1e-5)
    assert abs(expected[0] - expected[1]) > 1e-4  # the two answers are told apart: not a constant
    assert scorer.__name__ == "reward_model"


@pytest.fixture
def grpo_project(project, prepared):
    """models/sft = the tiny base, models/reward = a scalar head on it (full weights), the prepared demo data."""
    shutil.copytree(prepared, project / "data" / "prepared")
    shutil.copytree(project / "models" / "base", project / "models" / "sft")
    torch.manual_seed(0)
    rm = AutoModelForSequenceClassification.from_pretrained(project / "models" / "base", num_labels=1)
    tok = AutoTokenizer.from_pretrained(project / "models" / "base")
    rm.config.pad_token_id = tok.pad_token_id
    rm.save_pretrained(project / "models" / "reward")
    tok.save_pretrained(project / "models" / "reward")
    return project


def test_grpo_stage_end_to_end(grpo_project, prefect_server):
    metrics = grpo_flow()
    out = grpo_project / "models" / "grpo"
    AutoModelForCausalLM.from_pretrained(out)  # plain transformers: the adapter was merged
    mc.validate("grpo", metrics)
    on_disk = json.loads((grpo_project / "metrics" / "grpo.json").read_text())
    train = on_disk["train"]
    assert train["steps"] == 3 and train["num_generations"] == 2 and train["kl_last"] is not None
    assert train["reward_slope"]["estimate"] is not None and 0 <= on_disk["eval"]["win_rate_vs_sft"] <= 1
    with open(grpo_project / "plots" / "grpo" / "train.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["step"]) for r in rows] == [1, 2, 3] and all(r["reward"] and r["kl"] for r in rows)
    assert float(rows[0]["reward"]) == pytest.approx(metrics["train"]["reward_first"])
    run = mlflow.search_runs(experiment_names=["llm-refinery"], order_by=["start_time DESC"]).iloc[0]
    assert run["tags.method"] == "lora"
    assert run["metrics.train.reward_last"] == pytest.approx(metrics["train"]["reward_last"])
    assert len(mlflow.MlflowClient().get_metric_history(run["run_id"], "reward")) == 3  # per step


@pytest.mark.bad_input
def test_grpo_refuses_an_adapter_reward_model_in_one_line(grpo_project, prefect_server, capsys):
    """models/reward holding an adapter (not full weights) is refused before anything loads: exit 2, one line."""
    shutil.rmtree(grpo_project / "models" / "reward")
    (grpo_project / "models" / "reward").mkdir()
    (grpo_project / "models" / "reward" / "adapter_config.json").write_text("{}")
    with pytest.raises(SystemExit) as exit_:
        main([])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert exit_.value.code == 2
    assert len(errors) == 1 and "models/reward: the reward model must be full weights" in errors[0], errors
    assert not (grpo_project / "models" / "grpo").exists()


@pytest.mark.bad_input
def test_grpo_refuses_eval_steps_and_a_group_of_one(tmp_path):
    """No validation loss to monitor, and an advantage needs at least two answers per prompt."""
    from refinery.config import load_params
    from refinery.errors import UserError

    (tmp_path / "grpo.yaml").write_text("training:\n  eval_steps: 4\n")
    with pytest.raises(UserError, match="GRPO has no validation loss"):
        load_params("grpo", tmp_path)
    (tmp_path / "grpo.yaml").write_text("num_generations: 1\n")
    with pytest.raises(UserError, match="key 'num_generations'"):
        load_params("grpo", tmp_path)


def test_grpo_trains_on_the_preference_prompts_when_asked(grpo_project):
    """`prompt_sources: [prompts, preferences]`: the preference pairs' prompts join the training prompts (never a
    held-out one), and the preferences folder is an input (manifest and checkpoint key)."""
    from flows.grpo import load_inputs

    args = ("params", "models/sft", "models/reward", "data/prepared")
    alone = load_inputs(*args, None)
    both = load_inputs(*args, {"prompt_sources": ["prompts", "preferences"]})
    assert "preferences" not in alone.inputs and both.inputs["preferences"] == "data/prepared/preferences"
    assert len(both.train) > len(alone.train)
    held_out = {json.dumps(r["prompt"]) for r in both.val_records}
    assert not held_out & {json.dumps(r["prompt"][0]["content"]) for r in both.train}

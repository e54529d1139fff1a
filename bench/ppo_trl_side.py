"""TRL's side of bench/ppo_bench.py: TRL 0.19.1's PPOTrainer (its last release with PPO) on the spec the driver
wrote, in its own venv (transformers 4.57: bench/requirements-trl019.txt). Imports nothing from this project,
whose code needs transformers 5. Prints one `RESULT {json}` line.

    bench/.venv-trl019/bin/python bench/ppo_trl_side.py --spec spec.json
"""
from __future__ import annotations

import argparse
import json
import resource
import shutil
import tempfile
import time

import torch
import transformers
import trl
from datasets import Dataset
from peft import LoraConfig
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    PreTrainedTokenizerFast,
    TrainerCallback,
)
from trl import PPOConfig, PPOTrainer


class StepClock(TrainerCallback):
    """Wall time at the end of each PPO update (TRL calls on_step_end once per update)."""

    def __init__(self):
        self.ends: list[float] = []

    def on_step_end(self, args, state, control, **kw):
        self.ends.append(time.perf_counter())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--spec", required=True)
    spec = json.loads(open(ap.parse_args().spec).read())
    torch.set_num_threads(spec["threads"])
    torch.manual_seed(spec["seed"])
    # the folder was written by transformers 5 (tokenizer_class "TokenizersBackend", unknown to 4.57): load its
    # tokenizer.json and special tokens through the fast class itself; prompts arrive as ids already
    tok = PreTrainedTokenizerFast.from_pretrained(spec["policy"])
    tok.padding_side = "left"  # PPO generates after the prompt
    fp32 = dict(torch_dtype=torch.float32, use_safetensors=True)
    policy = AutoModelForCausalLM.from_pretrained(spec["policy"], **fp32)
    value = AutoModelForSequenceClassification.from_pretrained(spec["reward"], num_labels=1, **fp32)
    reward = AutoModelForSequenceClassification.from_pretrained(spec["reward"], num_labels=1, **fp32)
    for m in (value, reward):
        m.config.pad_token_id = tok.pad_token_id
    s = spec["settings"]
    data = Dataset.from_dict({"input_ids": spec["prompts"]})
    out = tempfile.mkdtemp(prefix="trl-ppo-")
    cfg = PPOConfig(
        output_dir=out, report_to="none", save_strategy="no", logging_steps=1000, seed=spec["seed"],
        use_cpu=not torch.cuda.is_available(), bf16=spec["bf16"],
        per_device_train_batch_size=s["mini_batch_size"],
        gradient_accumulation_steps=s["batch_size"] // s["mini_batch_size"],
        num_mini_batches=s["batch_size"] // s["mini_batch_size"], num_ppo_epochs=s["ppo_epochs"],
        total_episodes=s["steps"] * s["batch_size"], local_rollout_forward_batch_size=s["batch_size"],
        response_length=s["max_new_tokens"], temperature=s["temperature"], stop_token="eos",
        missing_eos_penalty=s["missing_eos_penalty"], learning_rate=s["lr"], kl_coef=s["kl_coef"],
        cliprange=s["clip_range"], cliprange_value=s["clip_range_value"], vf_coef=s["vf_coef"], gamma=s["gamma"],
        lam=s["lam"], num_sample_generations=0, gradient_checkpointing=False, dataloader_num_workers=0)
    lora = LoraConfig(task_type="CAUSAL_LM", r=s["lora_r"], lora_alpha=s["lora_alpha"], lora_dropout=0.0,
                      target_modules=s["lora_targets"])
    trainer = PPOTrainer(args=cfg, processing_class=tok, model=policy, ref_model=None, reward_model=reward,
                         train_dataset=data, value_model=value, peft_config=lora)
    clock = StepClock()
    trainer.add_callback(clock)
    t0 = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t0
    shutil.rmtree(out, ignore_errors=True)
    steps = len(clock.ends)
    steady = (clock.ends[-1] - clock.ends[0]) / (steps - 1) if steps > 1 else None
    print("RESULT " + json.dumps({
        "side": "trl", "steps": steps, "seconds": wall, "episodes_per_second": steps * s["batch_size"] / wall,
        "steady_episodes_per_second": s["batch_size"] / steady if steady else None,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "value_model": "full fine-tuning (TRL's PPO has no adapter for the value model)",
        "versions": {"trl": trl.__version__, "transformers": transformers.__version__, "torch": torch.__version__}}))


if __name__ == "__main__":
    main()

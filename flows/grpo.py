"""Stage `grpo`: GRPO (Shao et al. 2024) from the SFT policy on the prompts, an alternative to `ppo` with no value
model: each prompt gets `num_generations` sampled answers, models/reward scores each as ppo scores its rollouts
(refinery/rlhf/grpo_reward.py: same rendering, same head, same missing-EOS penalty), and an answer's advantage is
its score against its group's. Training is TRL's `GRPOTrainer` (sampling, the clipped loss, the KL to the
reference, dropout off); this flow adds what every stage here has: params checked before anything loads, the
method registry, checkpoints keyed by params and inputs and resumed after a crash, MLflow + Prefect records, and
the evaluation ppo and dpo get (refinery/rlhf/policy_eval.py), so the three compare.

The reference is the SFT policy: for LoRA-style methods the same weights with the adapter off (the peft config
handed to TRL, refinery/rlhf/trl_policy.py), for `full` TRL's frozen copy. `training.batch_size` counts prompts:
TRL's per-device batch counts answers, so it is batch_size x num_generations, and one optimiser step trains on
batch_size x grad_accum prompts x num_generations answers, all sampled by the policy of that step. GRPO has no
validation loss: `training.eval_steps` must be 0 and the last step is the output.

    python -m flows.grpo                      # params/grpo.yaml; models/sft -> models/grpo
    python -m flows.grpo --set beta=0.0 --set num_generations=8 --out-dir experiments/grpo-g8
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from prefect import flow
from transformers import TrainerCallback

from refinery.config import load_params
from refinery.data.chat import as_messages, prompt_ids
from refinery.data.prompt_sources import none_within, source_dirs, training_prompts
from refinery.data.records import read_jsonl
from refinery.errors import UserError
from refinery.evaluation.forgetting import load_general, retention_summary
from refinery.evaluation.stats import slope, within_group_slope
from refinery.modeling.attention import left_padded_attention
from refinery.modeling.loading import model_kind
from refinery.modeling.manifest import check_same_tokenizer, hash_obj
from refinery.modeling.methods import REGISTRY, count_parameters
from refinery.modeling.precision import compute_precision
from refinery.ops.distributed import world_size
from refinery.ops.prefect_artifacts import Progress, metrics_table, publish_summary
from refinery.ops.prefect_tasks import uncached_task
from refinery.ops.stage_cli import flow_run_namer, open_stage_record, refuse, stage_main, summary_markdown
from refinery.rlhf.grpo_reward import RewardModelScore, stop_ids
from refinery.rlhf.policy_eval import (
    evaluate_policy,
    load_judge,
    retention_against_sft,
    score_lines,
    win_rate_lines,
)
from refinery.rlhf.trl_policy import model_for_trl, sft_policy
from refinery.train.stage_io import StageInputs, load_start, save_stage_output, train_block
from refinery.train.trainer import derive_max_steps, global_batch, run_trainer

# Every logits processor transformers would otherwise take from the model's generation_config.json (TRL fills only
# temperature, top-k, top-p and repetition_penalty; a None field is filled from the model's file): stated neutral,
# so the answers are drawn from the policy TRL scores (as refinery/rlhf/rollout.py `sampling_config` does for ppo).
NEUTRAL_SAMPLING = dict(repetition_penalty=1.0, encoder_repetition_penalty=1.0, no_repeat_ngram_size=0,
                        min_new_tokens=0, typical_p=1.0, epsilon_cutoff=0.0, eta_cutoff=0.0, renormalize_logits=False)


def prompt_rows(records: list[dict]) -> list[dict]:
    """Prompts in TRL's conversational format, so TRL renders them with the tokenizer's chat template."""
    return [{"prompt": as_messages(r["prompt"])} for r in records]


@dataclass(frozen=True, kw_only=True)
class GrpoInputs(StageInputs):
    reward_dir: str
    tokenizer_hash: str
    prompts_dir: Path
    train: list[dict]                # conversational prompts within max_prompt_tokens
    val_records: list[dict]          # held-out prompts for the policy evaluation
    val_prompts: list[list[int]]


def load_inputs(params_dir: str, input_dir: str, reward_dir: str, data_dir: str, overrides: dict | None) -> GrpoInputs:
    """Params, tokenizer, prompts and the policy, checked before anything trains."""
    if model_kind(reward_dir) != "full":
        raise UserError(f"{reward_dir}: the reward model must be full weights (reward saves merged weights)")
    prompts_dir = Path(data_dir) / "prompts"
    val_records = [r for _, r in read_jsonl(prompts_dir / "validation.jsonl")]
    # the training prompts before the model loads: a missing file is fast
    records = training_prompts(data_dir, load_params("grpo", params_dir, overrides).prompt_sources, val_records)
    base, cfg, _, model, tokenizer = load_start("grpo", params_dir, input_dir, overrides)
    val_records = val_records[:cfg.eval.eval_prompts]
    tok_hash = check_same_tokenizer(tokenizer, {"sft": input_dir, "reward": reward_dir})
    train = [r for r in records if len(prompt_ids(tokenizer, r["prompt"])) <= cfg.max_prompt_tokens]
    if not train:
        raise none_within(data_dir, cfg.prompt_sources, cfg.max_prompt_tokens)
    derive_max_steps("grpo", cfg.training, len(train), global_batch(cfg.training))  # an epoch = every prompt once
    return GrpoInputs(stage="grpo", base=base, cfg=cfg, tokenizer=tokenizer, model=model,
                      inputs={"model": input_dir, "reward": reward_dir, "prompts": str(prompts_dir),
                              **source_dirs(data_dir, cfg.prompt_sources)},
                      reward_dir=reward_dir, tokenizer_hash=tok_hash, prompts_dir=prompts_dir,
                      train=prompt_rows(train), val_records=val_records,
                      val_prompts=[prompt_ids(tokenizer, r["prompt"]) for r in val_records],
                      general=load_general(data_dir, tokenizer))


def grpo_arguments(cfg) -> dict:
    """GRPOConfig's own fields (the TrainingArguments ones come from params' `training` block). TRL's
    per_device_train_batch_size counts answers; with steps_per_generation left to TRL (= grad_accum) one
    optimiser step samples and trains batch_size x grad_accum prompts x num_generations answers."""
    return {"per_device_train_batch_size": cfg.training.batch_size * cfg.num_generations,
            "num_generations": cfg.num_generations, "max_completion_length": cfg.max_new_tokens,
            "temperature": cfg.temperature, "top_k": cfg.top_k, "top_p": cfg.top_p, "min_p": None,
            "generation_kwargs": dict(NEUTRAL_SAMPLING), "beta": cfg.beta, "epsilon": cfg.epsilon,
            "loss_type": cfg.loss_type, "scale_rewards": cfg.scale_rewards, "num_iterations": cfg.num_iterations,
            "mask_truncated_completions": False, "disable_dropout": True, "log_completions": False}


class RewardLog(TrainerCallback):
    """The per-step reward, RM score, KL and EOS share TRL logs, into the stage's MLflow run."""

    KEYS = {"reward": "reward", "rm_score": "rm_score", "kl": "kl", "eos_fraction": "eos_fraction",
            "completions/mean_length": "answer_length"}

    def __init__(self, record):
        self.record = record

    def on_log(self, args, state, control, logs=None, **kw):
        if self.record is not None and logs and "reward" in logs:
            self.record.log_step(state.global_step, {v: logs[k] for k, v in self.KEYS.items()
                                                     if logs.get(k) is not None})


def step_history(log_history: list[dict]) -> list[dict]:
    """One row per trained step from TRL's log (which a resumed run reads back from its checkpoint)."""
    return [{"step": h["step"], "reward": h["reward"], "rm_score": h.get("rm_score"), "kl": h.get("kl"),
             "eos_fraction": h.get("eos_fraction"), "answer_length": h.get("completions/mean_length"),
             "loss": h.get("loss")} for h in log_history if "reward" in h]


def reward_trend(history: list[dict], episodes: list[list], seed: int) -> tuple[dict, dict | None]:
    """(train-block entries, the trend) as ppo reports them: the within-prompt slope of the reward per step when
    enough prompts came back at two or more steps (stats.within_group_slope), else the slope of the step means."""
    if len(history) < 3:
        return {}, None
    step_means = slope([h["reward"] for h in history], seed=seed)
    try:
        steps, prompts, rewards = zip(*episodes) if episodes else ((), (), ())
        trend, estimator = within_group_slope(prompts, steps, rewards, seed=seed), "within-prompt"
    except ValueError:
        trend, estimator = step_means, "step means"
    return {"reward_slope_step_means": step_means.as_dict(),
            "reward_slope": {**trend.as_dict(), "estimator": estimator}}, {"text": f"{trend.text()} {estimator}"}


def grpo_trainer_class():
    """TRL's GRPOTrainer taking run_trainer's `data_collator=None` (GRPO collates nothing: its batches are prompts,
    and its constructor has no such argument)."""
    from trl import GRPOTrainer

    class StageGRPOTrainer(GRPOTrainer):
        def __init__(self, *args, data_collator=None, **kwargs):
            assert data_collator is None, "GRPOTrainer takes no data collator"
            super().__init__(*args, **kwargs)

    return StageGRPOTrainer


@uncached_task
def train_grpo(job: GrpoInputs, rec, progress, scorer: RewardModelScore):
    from datasets import Dataset
    from trl import GRPOConfig

    model, config = model_for_trl(job.model, job.cfg, job.base.seed)
    with left_padded_attention():  # TRL samples the groups from left-padded prompts, and trains on them
        return run_trainer(model, Dataset.from_list(job.train), None, job.cfg.training, job.checkpoint, job.base.seed,
                           record=rec, progress=progress, trainer_cls=grpo_trainer_class(), callbacks=[RewardLog(rec)],
                           resumable=REGISTRY[job.cfg.method].resumable, args_cls=GRPOConfig,
                           args_extra=grpo_arguments(job.cfg), processing_class=job.tokenizer, reward_funcs=[scorer],
                           peft_config=config)


@uncached_task
def evaluate_grpo(*args):
    return evaluate_policy(*args)


@flow(name="grpo", flow_run_name=flow_run_namer("grpo"))
def grpo_flow(params_dir: str = "params", input_dir: str = "models/sft", reward_dir: str = "models/reward",
              data_dir: str = "data/prepared", out_dir: str = "models/grpo", overrides: dict | None = None):
    try:
        job = load_inputs(params_dir, input_dir, reward_dir, data_dir, overrides)
    except UserError as exc:
        return refuse(exc)
    base, cfg, tokenizer, params = job.base, job.cfg, job.tokenizer, job.params
    with (open_stage_record("grpo", base, params, method=cfg.method,
                            tags={"tokenizer_hash": job.tokenizer_hash, **job.lineage_tags("prompts")}) as rec,
          compute_precision(cfg.training.precision)):
        rec.log_dataset(job.prompts_dir / "train.jsonl", "prompts", context="training")
        t = cfg.training
        print(f"grpo: method {cfg.method}; {len(job.train)} prompts, {t.batch_size} x {cfg.num_generations} "
              f"answers per step, beta {cfg.beta}, loss {cfg.loss_type}")
        reward_model = load_judge(job.reward_dir, base.trust_remote_code, base.attn_implementation)
        scorer = RewardModelScore(reward_model, tokenizer, stop_ids(job.model, tokenizer), cfg.missing_eos_penalty)
        summary, trainer = train_grpo(job, rec, Progress("grpo"), scorer)
        policy = trainer.model
        trainable, total = count_parameters(policy)
        sft_model, sft_ctx = sft_policy(trainer, cfg.method, input_dir, base.trust_remote_code,
                                        base.attn_implementation)
        policy.config.use_cache = True  # generation-heavy evaluation
        evaluation, table = evaluate_grpo(policy, sft_model, sft_ctx, reward_model, tokenizer, job.val_records,
                                          job.val_prompts, cfg.eval, base.seed)
        general = retention_against_sft(policy, sft_model, sft_ctx, job.general, tokenizer.pad_token_id, base.seed)
        save_stage_output("grpo", policy, tokenizer, cfg.method, out_dir, input_dir, params, job.inputs, base.seed)
        history = step_history(trainer.state.log_history)
        answers = (summary.steps - (summary.resumed_from or 0)) * t.batch_size * t.grad_accum * cfg.num_generations
        trend_block, trend = reward_trend(history, scorer.episodes, base.seed)
        first, last = (history[0], history[-1]) if history else ({}, {})
        metrics = {"train": train_block(cfg.method, summary, trainable, total, init_from=input_dir,
                                        episodes_per_second=round(answers * world_size() / max(summary.seconds, 1e-9), 3),
                                        precision=t.precision, beta=cfg.beta, loss_type=cfg.loss_type,
                                        num_generations=cfg.num_generations, prompts_per_step=t.batch_size * t.grad_accum,
                                        reward_first=first.get("reward"), reward_last=last.get("reward"),
                                        rm_score_first=first.get("rm_score"), rm_score_last=last.get("rm_score"),
                                        kl_last=last.get("kl"), eos_fraction_last=last.get("eos_fraction"),
                                        **trend_block),
                   "eval": evaluation, **({"general_retention": general} if general else {})}
        rec.write_metrics(metrics)
        rec.write_plot(history, "train", ys=("reward", "rm_score", "kl", "eos_fraction"))
        rec.log_table(table, "eval_generations.json")
        lines = {"method": cfg.method, "beta / group": f"{cfg.beta} / {cfg.num_generations}",
                 "reward (train)": (f"{first['reward']:.3f} -> {last['reward']:.3f}" if history else "(no step ran)"),
                 "KL last (per token)": f"{last['kl']:.4f}" if last.get("kl") is not None else "(beta 0: not computed)",
                 "reward slope per step [95% CI]": trend["text"] if trend else f"(needs >= 3 steps, ran {len(history)})",
                 **win_rate_lines(evaluation), **score_lines(evaluation), **retention_summary(metrics),
                 "answers/s": metrics["train"]["episodes_per_second"], "params hash": hash_obj(params)[:12]}
        publish_summary("grpo", summary_markdown("grpo", "group relative policy optimisation", lines, rec.run_url,
                                                 out_dir), metrics_table(metrics))
    print("grpo: " + "; ".join(f"{k}: {v}" for k, v in lines.items()))
    return metrics


main = stage_main(grpo_flow, "grpo")  # no multi-process worker yet: nproc_per_node > 1 is refused in one line


if __name__ == "__main__":
    main()

"""Stage `dpo`: direct preference optimisation from the SFT policy on the preference pairs, an alternative to
`ppo` with no reward model in the training loop. Training is TRL's `DPOTrainer` (the losses, the reference
log-probs, dropout off); this flow adds what every stage here has: params checked before anything loads, the
method registry (full, lora, qlora, ia3), checkpoints keyed by params and inputs and resumed after a crash,
validation-loss monitoring with early stopping and the best checkpoint kept, MLflow + Prefect records, and
the evaluation PPO gets (refinery/rlhf/policy_eval.py: RM-judged win rate over SFT on held-out prompts,
reward-model score, reference agreement, exact KL, general-domain retention), so the two compare.

The reference is the SFT policy: for LoRA-style methods the same weights with the adapter off (TRL's
behaviour for a peft model without `ref_model`, and what `ppo` does), for `full` TRL's frozen copy. The
reward model is read for the evaluation only.

    python -m flows.dpo                      # params/dpo.yaml; models/sft -> models/dpo
    python -m flows.dpo --set beta=0.2 --set loss_type=ipo --out-dir experiments/dpo-ipo
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from prefect import flow

from refinery.data.chat import as_messages, prompt_ids
from refinery.data.records import read_jsonl
from refinery.errors import UserError
from refinery.evaluation.forgetting import load_general, retention_summary
from refinery.modeling.loading import model_kind
from refinery.modeling.manifest import check_same_tokenizer, hash_obj
from refinery.modeling.methods import REGISTRY, count_parameters
from refinery.modeling.precision import compute_precision
from refinery.ops.distributed import world_size
from refinery.ops.prefect_artifacts import Progress, metrics_table, publish_summary
from refinery.ops.prefect_tasks import uncached_task
from refinery.ops.stage_cli import flow_run_namer, open_stage_record, refuse, stage_main, summary_markdown
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


def preference_rows(records: list[dict]) -> list[dict]:
    """Pairs in TRL's conversational preference format (the prompt as messages, each answer as one assistant
    turn), so TRL renders them with the tokenizer's chat template, as sft, reward and ppo do."""
    return [{"prompt": as_messages(r["prompt"]), "chosen": [{"role": "assistant", "content": r["chosen"]}],
             "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in records]


@dataclass(frozen=True, kw_only=True)
class DpoInputs(StageInputs):
    reward_dir: str
    tokenizer_hash: str
    prefs: Path                      # data/prepared/preferences
    train: list[dict]                # conversational pairs
    val: list[dict]                  # the validation slice monitored for early stopping
    val_records: list[dict]          # held-out prompts for the policy evaluation
    val_prompts: list[list[int]]


def load_inputs(params_dir: str, input_dir: str, reward_dir: str, data_dir: str, overrides: dict | None) -> DpoInputs:
    """Params, tokenizer, pairs, prompts and the policy, checked before anything trains."""
    if model_kind(reward_dir) != "full":
        raise UserError(f"{reward_dir}: the reward model must be full weights (reward saves merged weights)")
    base, cfg, _, model, tokenizer = load_start("dpo", params_dir, input_dir, overrides)
    tok_hash = check_same_tokenizer(tokenizer, {"sft": input_dir, "reward": reward_dir})
    prefs, prompts_dir = Path(data_dir) / "preferences", Path(data_dir) / "prompts"
    train = preference_rows([r for _, r in read_jsonl(prefs / "train.jsonl")])
    val = preference_rows([r for _, r in read_jsonl(prefs / "validation.jsonl")])
    derive_max_steps("dpo", cfg.training, len(train), global_batch(cfg.training))  # an epoch = every pair once
    val_records = [r for _, r in read_jsonl(prompts_dir / "validation.jsonl")][:cfg.eval.eval_prompts]
    return DpoInputs(stage="dpo", base=base, cfg=cfg, tokenizer=tokenizer, model=model,
                     inputs={"model": input_dir, "reward": reward_dir, "preferences": str(prefs),
                             "prompts": str(prompts_dir)},
                     reward_dir=reward_dir, tokenizer_hash=tok_hash, prefs=prefs, train=train, val=val[:64],
                     val_records=val_records, val_prompts=[prompt_ids(tokenizer, r["prompt"]) for r in val_records],
                     general=load_general(data_dir, tokenizer))


def dpo_arguments(cfg) -> dict:
    """DPOConfig's own fields (the TrainingArguments ones come from params' `training` block)."""
    return {"beta": cfg.beta, "loss_type": [cfg.loss_type], "label_smoothing": cfg.label_smoothing,
            "max_length": cfg.max_length, "disable_dropout": True}


@uncached_task
def train_dpo(job: DpoInputs, rec, progress):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    model, config = model_for_trl(job.model, job.cfg, job.base.seed)
    return run_trainer(model, Dataset.from_list(job.train), None, job.cfg.training, job.checkpoint, job.base.seed,
                       record=rec, progress=progress, trainer_cls=DPOTrainer, count_tokens="non_padding",
                       resumable=REGISTRY[job.cfg.method].resumable, eval_dataset=Dataset.from_list(job.val),
                       args_cls=DPOConfig, args_extra=dpo_arguments(job.cfg), processing_class=job.tokenizer,
                       peft_config=config)


@uncached_task
def evaluate_dpo(*args):
    return evaluate_policy(*args)


@flow(name="dpo", flow_run_name=flow_run_namer("dpo"))
def dpo_flow(params_dir: str = "params", input_dir: str = "models/sft", reward_dir: str = "models/reward",
             data_dir: str = "data/prepared", out_dir: str = "models/dpo", overrides: dict | None = None):
    try:
        job = load_inputs(params_dir, input_dir, reward_dir, data_dir, overrides)
    except UserError as exc:
        return refuse(exc)
    base, cfg, tokenizer, params = job.base, job.cfg, job.tokenizer, job.params
    with (open_stage_record("dpo", base, params, method=cfg.method,
                            tags={"tokenizer_hash": job.tokenizer_hash, **job.lineage_tags("preferences")}) as rec,
          compute_precision(cfg.training.precision)):
        rec.log_dataset(job.prefs / "train.jsonl", "preferences", context="training")
        print(f"dpo: method {cfg.method}; {len(job.train)} pairs, beta {cfg.beta}, loss {cfg.loss_type}")
        summary, trainer = train_dpo(job, rec, Progress("dpo"))
        policy = trainer.model
        trainable, total = count_parameters(policy)
        sft_model, sft_ctx = sft_policy(trainer, cfg.method, input_dir, base.trust_remote_code,
                                        base.attn_implementation)
        policy.config.use_cache = True  # generation-heavy evaluation
        reward_model = load_judge(job.reward_dir, base.trust_remote_code, base.attn_implementation)
        evaluation, table = evaluate_dpo(policy, sft_model, sft_ctx, reward_model, tokenizer, job.val_records,
                                         job.val_prompts, cfg.eval, base.seed)
        general = retention_against_sft(policy, sft_model, sft_ctx, job.general, tokenizer.pad_token_id, base.seed)
        save_stage_output("dpo", policy, tokenizer, cfg.method, out_dir, input_dir, params, job.inputs, base.seed)
        t = cfg.training
        pairs = (summary.steps - (summary.resumed_from or 0)) * t.batch_size * t.grad_accum * world_size()
        last = next((h for h in reversed(trainer.state.log_history) if "rewards/margins" in h), {})
        metrics = {"train": train_block(cfg.method, summary, trainable, total, init_from=input_dir,
                                        pairs_per_second=round(pairs / max(summary.seconds, 1e-9), 3),
                                        precision=t.precision, beta=cfg.beta, loss_type=cfg.loss_type,
                                        reward_margin_last=last.get("rewards/margins"),
                                        reward_accuracy_last=last.get("rewards/accuracies")),
                   "eval": evaluation, "early_stopping": summary.selection(t),
                   **({"general_retention": general} if general else {})}
        rec.write_metrics(metrics)
        rec.write_plot(summary.history, "train", ys=("loss", "lr", "grad_norm", "tokens_per_second"))
        rec.log_table(table, "eval_generations.json")
        lines = {"method": cfg.method, "beta / loss": f"{cfg.beta} / {cfg.loss_type}", **win_rate_lines(evaluation),
                 **score_lines(evaluation), **retention_summary(metrics), "pairs/s": metrics["train"]["pairs_per_second"],
                 "params hash": hash_obj(params)[:12]}
        publish_summary("dpo", summary_markdown("dpo", "direct preference optimisation", lines, rec.run_url, out_dir),
                        metrics_table(metrics))
    print("dpo: " + "; ".join(f"{k}: {v}" for k, v in lines.items()))
    return metrics


main = stage_main(dpo_flow, "dpo")  # no multi-process worker yet: nproc_per_node > 1 is refused in one line


if __name__ == "__main__":
    main()

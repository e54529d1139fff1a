"""Stage `ppo`: PPO-based RLHF. Policy from `sft`; frozen reference = the SFT policy (for LoRA: the same
weights with the adapter disabled, held once); value model initialised from the reward model (as
InstructGPT and DeepSpeed-Chat do: a value head that already reads response quality), or with
`value_model: policy_trunk` a value head on the policy's own trunk (refinery/rlhf/value_head.py); the reward
model scores complete responses."""
from __future__ import annotations

import contextlib
import copy
import gc
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from prefect import flow

from refinery.config import load_params
from refinery.data.chat import prompt_ids
from refinery.data.prompt_sources import none_within, source_dirs, training_prompts
from refinery.data.records import read_jsonl
from refinery.errors import UserError
from refinery.evaluation.forgetting import load_general, retention_summary
from refinery.evaluation.stats import Estimate, slope, within_group_slope
from refinery.modeling.loading import (
    full_weights_of,
    load_causal_lm,
    load_scalar_model,
    load_tokenizer,
    model_kind,
    to_compute_device,
)
from refinery.modeling.manifest import check_same_tokenizer
from refinery.modeling.methods import apply_method, check_stage_method, count_parameters
from refinery.modeling.precision import compute_precision, resolve, store_frozen_linears
from refinery.ops.host_memory import release_freed_memory, settle_for_evaluation, settle_process
from refinery.ops.prefect_artifacts import Progress, metrics_table, publish_summary
from refinery.ops.prefect_tasks import uncached_task
from refinery.ops.stage_cli import (
    flow_run_namer,
    open_stage_record,
    refuse,
    stage_main,
    summary_markdown,
)
from refinery.rlhf.policy_eval import (
    decode_responses,
    evaluate_policy,
    load_judge,
    ppo_judge,
    retention_against_sft,
    rm_scores,
    score_lines,
    win_rate_lines,
)
from refinery.rlhf.ppo_distributed import Ranks
from refinery.rlhf.ppo_trainer import PPOTrainer, ppo_train_block
from refinery.rlhf.value_head import check_trunk_head, head_from_reward_model
from refinery.train.stage_io import StageInputs, save_stage_output
from refinery.train.trainer import peak_memory_mb


@uncached_task
def train_ppo(trainer: PPOTrainer):
    return trainer.train()


@uncached_task
def evaluate_ppo(*args):
    return evaluate_policy(*args)


@dataclass(frozen=True, kw_only=True)
class PPOInputs(StageInputs):
    policy_dir: str                 # full weights the policy starts from (the SFT output, or its base)
    reward_dir: str
    tokenizer_hash: str
    prompts_dir: Path
    train_records: list[dict]       # prompts within max_prompt_tokens
    train_prompts: list[list[int]]  # their chat-rendered ids
    val_records: list[dict]
    val_prompts: list[list[int]]


def load_inputs(params_dir: str, input_dir: str, reward_dir: str, data_dir: str, overrides: dict | None) -> PPOInputs:
    """Params, tokenizer, prompts and the policy, checked before anything trains."""
    base = load_params("base", params_dir)
    cfg = load_params("ppo", params_dir, overrides)
    check_stage_method(cfg, "ppo", f"{params_dir}/ppo.yaml")
    if model_kind(reward_dir) != "full":
        raise UserError(f"{reward_dir}: the reward model must be full weights (reward saves merged weights)")
    policy_dir, note = full_weights_of(input_dir)
    if note:
        print(f"warning: ppo: {note}", file=sys.stderr)
    tokenizer = load_tokenizer(input_dir, base.trust_remote_code)
    tok_hash = check_same_tokenizer(tokenizer, {"sft": input_dir, "reward": reward_dir})
    if cfg.value_model == "policy_trunk":
        check_trunk_head(policy_dir, reward_dir)
    prompts_dir = Path(data_dir) / "prompts"
    val_all = [r for _, r in read_jsonl(prompts_dir / "validation.jsonl")]
    train_records = training_prompts(data_dir, cfg.prompt_sources, val_all)
    val_records = val_all[:cfg.eval_prompts]
    train_prompts = [prompt_ids(tokenizer, r["prompt"]) for r in train_records]
    keep = [i for i, p in enumerate(train_prompts) if len(p) <= cfg.max_prompt_tokens]
    if not keep:
        raise none_within(data_dir, cfg.prompt_sources, cfg.max_prompt_tokens)
    sources = source_dirs(data_dir, cfg.prompt_sources)
    return PPOInputs(stage="ppo", base=base, cfg=cfg, tokenizer=tokenizer,
                     inputs={"model": input_dir, "reward": reward_dir, "prompts": str(prompts_dir), **sources},
                     model=load_causal_lm(policy_dir, base.trust_remote_code, method=cfg,
                                          attn_implementation=base.attn_implementation),
                     policy_dir=policy_dir, reward_dir=reward_dir, tokenizer_hash=tok_hash, prompts_dir=prompts_dir,
                     train_records=[train_records[i] for i in keep], train_prompts=[train_prompts[i] for i in keep],
                     val_records=val_records, val_prompts=[prompt_ids(tokenizer, r["prompt"]) for r in val_records],
                     general=load_general(data_dir, tokenizer))


def reward_trend_within_prompts(episodes: list[list], seed: int) -> Estimate | None:
    """The training-reward slope per step within each prompt (stats.within_group_slope; n = prompts drawn at
    two or more steps), or None when too few prompts came back (then the slope of the step means is used)."""
    if not episodes:
        return None
    steps, prompts, scores = zip(*episodes)
    try:
        return within_group_slope(prompts, steps, scores, seed=seed)
    except ValueError:
        return None


@dataclass
class PPOModels:
    policy: torch.nn.Module
    value_model: torch.nn.Module
    reward_model: torch.nn.Module | None
    ref_model: torch.nn.Module | None  # None: the policy with its adapter off
    precision: str
    freed: int                          # bytes of frozen fp32 weights now held in `precision`
    trainable: int
    total: int


def build_models(job: PPOInputs) -> PPOModels:
    """Policy, reference, value and reward models as every rank builds them (the same seed, so the same
    adapter initialisation on every rank)."""
    base, cfg = job.base, job.cfg
    input_dir, reward_dir = job.inputs["model"], job.reward_dir
    torch.manual_seed(base.seed)
    policy = to_compute_device(job.model)
    ref_model = None
    if cfg.method == "full":  # a frozen copy; LoRA-style policies use their own weights with the adapter off
        ref_model = copy.deepcopy(policy).eval().requires_grad_(False)
    policy.config.use_cache = True  # generation-heavy: keep the KV cache
    attn = base.attn_implementation
    if cfg.value_model == "policy_trunk":  # values from a head on the policy's trunk; the judge frozen on its own
        reward_model = load_judge(reward_dir, base.trust_remote_code, attn)
        value_model = head_from_reward_model(policy, reward_model)
        trunks = [policy]
    else:  # a value model initialised from the reward model (InstructGPT)
        value_model = to_compute_device(load_scalar_model(reward_dir, base.trust_remote_code, cfg, attn))
        trunks = [policy, value_model]
    if cfg.gradient_checkpointing:  # only in train mode: rollouts and scoring (eval mode) keep their activations
        for model in trunks:
            model.activation_checkpointing_enable(every_n_layers=cfg.checkpoint_every_n_layers)
    policy = apply_method(policy, cfg, "CAUSAL_LM", input_dir, seed=base.seed)
    if cfg.value_model == "separate":
        value_model = apply_method(value_model, cfg, "SEQ_CLS", reward_dir, seed=base.seed)
        reward_model = ppo_judge(value_model, cfg.method, reward_dir, base.trust_remote_code, attn)
    trainable, total = count_parameters(policy)
    precision = resolve(base.precision)  # rollouts, scoring and updates under one autocast; fp32 master weights
    # every forward of these four runs under that autocast: their frozen linears can be held in its dtype
    # (the adapter-off judge holds the value model's weights: already cast there, it frees nothing twice)
    freed = sum(store_frozen_linears(model, precision) for model in (policy, value_model, reward_model, ref_model)
                if model is not None)
    return PPOModels(policy, value_model, reward_model, ref_model, precision, freed, trainable, total)


def make_trainer(job: PPOInputs, m: PPOModels, **hooks) -> PPOTrainer:
    """The PPO loop over the job's prompts, on the ranks torchrun started (one without it); `hooks`: the
    record, progress and on_step callbacks rank 0 passes."""
    tokenizer, train_records = job.tokenizer, job.train_records

    def reward_fn(idx, rollout):
        answers = decode_responses(tokenizer, rollout)
        scores = rm_scores(m.reward_model, tokenizer, [train_records[i]["prompt"] for i in idx], answers)
        return scores.to(rollout.sequences.device)

    return PPOTrainer(job.cfg, m.policy, m.value_model, reward_fn, job.train_prompts, tokenizer, job.checkpoint,
                      job.base.seed, ref_model=m.ref_model, ranks=Ranks.from_environment(), **hooks)


def train_worker(params_dir: str = "params", input_dir: str = "models/sft", reward_dir: str = "models/reward",
                 data_dir: str = "data/prepared", overrides: dict | None = None, **_) -> None:
    """A non-zero rank of a multi-process PPO: the same models and steps as rank 0 on its share of each step's
    prompts; rank 0 records, evaluates and saves."""
    settle_process()  # allocator and kernel-cache settings, before the first matmul (ops/host_memory.py)
    job = load_inputs(params_dir, input_dir, reward_dir, data_dir, overrides)
    m = build_models(job)
    with compute_precision(m.precision):
        make_trainer(job, m).train()


@flow(name="ppo", flow_run_name=flow_run_namer("ppo"))
def ppo_flow(params_dir: str = "params", input_dir: str = "models/sft", reward_dir: str = "models/reward",
             data_dir: str = "data/prepared", out_dir: str = "models/ppo", overrides: dict | None = None):
    settle_process()  # allocator and kernel-cache settings, before the first matmul (ops/host_memory.py)
    try:
        job = load_inputs(params_dir, input_dir, reward_dir, data_dir, overrides)
    except UserError as exc:
        return refuse(exc)
    base, cfg, tokenizer, params = job.base, job.cfg, job.tokenizer, job.params
    m = build_models(job)
    policy, ref_model, reward_model = m.policy, m.ref_model, m.reward_model
    trainable, total, precision = m.trainable, m.total, m.precision

    with (open_stage_record("ppo", base, params, method=cfg.method,
                            tags={"tokenizer_hash": job.tokenizer_hash, **job.lineage_tags("prompts")}) as rec,
          compute_precision(precision)):
        rec.log_dataset(job.prompts_dir / "train.jsonl", "prompts", context="training")

        def on_step(step, metrics, rollout):
            if step % cfg.sample_every == 0 or step == 1:
                answers = decode_responses(tokenizer, rollout)
                rec.log_table([{"step": step, "response": a} for a in answers[:4]], f"samples/step_{step:04d}.json")

        trainer = make_trainer(job, m, record=rec, progress=Progress("ppo"), on_step=on_step)
        print(f"ppo: method {cfg.method}: {trainable:,} of {total:,} policy parameters trainable; "
              f"{cfg.steps} steps x {cfg.batch_size} episodes")
        state = train_ppo(trainer)
        release_freed_memory()  # the training steps' freed heap, before the evaluation's generation
        settle_for_evaluation()  # its KV caches and logits from the heap, not mapped per step (ops/host_memory.py)
        if ref_model is None:
            sft_model, sft_ctx = policy, policy.disable_adapter
        else:
            sft_model, sft_ctx = ref_model, contextlib.nullcontext
        evaluation, table = evaluate_ppo(policy, sft_model, sft_ctx, reward_model, tokenizer, job.val_records,
                                         job.val_prompts, cfg, base.seed)
        general = retention_against_sft(policy, sft_model, sft_ctx, job.general, tokenizer.pad_token_id, base.seed)
        # the value and reward models are done: let them go before the save reloads the fp32 input weights to
        # merge the adapter into (their ~0.7 GB at 135M would otherwise sit under that reload)
        trainer.value_model = m.value_model = m.reward_model = reward_model = None
        gc.collect()
        release_freed_memory()
        save_stage_output("ppo", policy, tokenizer, cfg.method, out_dir, input_dir, params, job.inputs, base.seed)
        h = state.history
        train = ppo_train_block(trainer, job.policy_dir, trainable, total, peak_memory_mb())
        train["precision"] = precision
        train["frozen_weights_16bit_mb"] = round(m.freed / 2**20, 1)  # fp32 frozen weights held in `precision`
        train["gradient_checkpointing"] = cfg.gradient_checkpointing
        train["checkpoint_every_n_layers"] = cfg.checkpoint_every_n_layers if cfg.gradient_checkpointing else None
        train["padding_free"] = trainer.padding_free  # `auto` resolved
        train["value_model"] = cfg.value_model
        # the ranks that took part (not the setting asked for); rates are the whole run's, peak memory rank 0's
        train["processes"] = trainer.ranks.world
        reward_trend = f"(needs >= 3 steps, ran {len(h)})"
        if len(h) >= 3:  # does the training reward rise? a fitted slope over the steps, with its CI
            step_means = slope([x["reward_mean"] for x in h], seed=base.seed)
            within = reward_trend_within_prompts(state.episodes, base.seed)
            trend, estimator = (within, "within-prompt") if within else (step_means, "step means")
            train["reward_slope_step_means"] = step_means.as_dict()
            train["reward_slope"] = {**trend.as_dict(), "estimator": estimator}
            reward_trend = f"{trend.text()} {estimator}"
        metrics = {"train": train, "eval": evaluation, **({"general_retention": general} if general else {})}
        rec.write_metrics(metrics)
        rec.write_plot([{k: v for k, v in x.items()} for x in h], "train",
                       ys=("reward_mean", "kl", "kl_coef", "entropy", "value_loss", "clip_fraction"))
        rec.log_table(table, "eval_generations.json")
        lines = {"method": cfg.method, "reward (train)": f"{train['reward_first']:.3f} -> {train['reward_last']:.3f}",
                 "KL last / target": f"{train['kl_last']:.3f} / {cfg.target_kl}",
                 **win_rate_lines(evaluation),
                 "reward slope per step [95% CI]": reward_trend,
                 **retention_summary(metrics),
                 **score_lines(evaluation)}
        publish_summary("ppo", summary_markdown("ppo", "PPO-based RLHF", lines, rec.run_url, out_dir),
                        metrics_table(metrics))
    print("ppo: " + "; ".join(f"{k}: {v}" for k, v in lines.items()))
    return metrics


main = stage_main(ppo_flow, 'ppo', worker=train_worker)


if __name__ == "__main__":
    main()

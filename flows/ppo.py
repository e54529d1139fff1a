"""Stage `ppo`: PPO-based RLHF. Policy from `sft`; frozen reference = the SFT policy (for LoRA: the same
weights with the adapter disabled, held once); value model initialised from the reward model (as
InstructGPT and DeepSpeed-Chat do: a value head that already reads response quality); the reward model
scores complete responses."""
from __future__ import annotations

import contextlib
import copy
import sys
from pathlib import Path

import torch
from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from transformers import AutoModelForSequenceClassification

from refinery.ops.prefect_artifacts import Progress, metrics_table, publish_summary
from refinery.config import load_params
from refinery.errors import UserError
from refinery.modeling.manifest import check_same_tokenizer, hash_obj, hash_path
from refinery.modeling.methods import apply_method, check_stage_method, count_parameters, quantization_kwargs
from refinery.modeling.loading import full_weights_of, load_causal_lm, load_tokenizer, model_kind
from refinery.rlhf.policy_eval import decode_responses, evaluate_policy, rm_scores
from refinery.rlhf.ppo_trainer import PPOTrainer
from refinery.data.records import read_jsonl
from refinery.data.chat import prompt_ids
from refinery.ops.stage_cli import (
    checkpoint_dir,
    flow_run_namer,
    refuse,
    run_name,
    stage_main,
    summary_markdown,
)
from refinery.ops.tracking import StageRecord
from refinery.train.stage_io import save_stage_output
from refinery.train.trainer import peak_memory_mb


def load_scalar_model(folder: str, trust_remote_code: bool, method=None):
    kwargs = {"dtype": torch.float32, **quantization_kwargs(method)}
    return AutoModelForSequenceClassification.from_pretrained(folder, use_safetensors=True,
                                                              trust_remote_code=trust_remote_code, **kwargs)


def on_device(model):
    """The GPU when there is one (rollouts, values and rewards on one device); 4-bit models were placed at load."""
    if torch.cuda.is_available() and not getattr(model, "is_quantized", False):
        return model.to("cuda")
    return model


@task(cache_policy=NO_CACHE)
def train_ppo(trainer: PPOTrainer):
    return trainer.train()


@task(cache_policy=NO_CACHE)
def evaluate_ppo(*args):
    return evaluate_policy(*args)


@flow(name="ppo", flow_run_name=flow_run_namer("ppo"))
def ppo_flow(params_dir: str = "params", input_dir: str = "models/sft", reward_dir: str = "models/reward",
             data_dir: str = "data/prepared", out_dir: str = "models/ppo", overrides: dict | None = None):
    try:
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
        prompts_dir = Path(data_dir) / "prompts"
        train_records = [r for _, r in read_jsonl(prompts_dir / "train.jsonl")]
        val_records = [r for _, r in read_jsonl(prompts_dir / "validation.jsonl")][:cfg.eval_prompts]
        policy = load_causal_lm(policy_dir, base.trust_remote_code, method=cfg)
    except UserError as exc:
        return refuse(exc)
    params = {"base": base.model_dump(), "ppo": cfg.model_dump()}
    inputs = {"model": input_dir, "reward": reward_dir, "prompts": str(prompts_dir)}
    input_hashes = {k: hash_path(v) for k, v in inputs.items()}
    render = lambda recs: [prompt_ids(tokenizer, r["prompt"])
                           for r in recs]
    train_prompts, val_prompts = render(train_records), render(val_records)
    keep = [i for i, p in enumerate(train_prompts) if len(p) <= cfg.max_prompt_tokens]
    if not keep:
        return refuse(UserError(f"{prompts_dir}/train.jsonl: no prompt within max_prompt_tokens={cfg.max_prompt_tokens}"))
    train_records, train_prompts = [train_records[i] for i in keep], [train_prompts[i] for i in keep]

    torch.manual_seed(base.seed)
    policy = on_device(policy)
    ref_model = None
    if cfg.method == "full":  # a frozen copy; LoRA-style policies use their own weights with the adapter off
        ref_model = copy.deepcopy(policy).eval().requires_grad_(False)
    policy.config.use_cache = True  # generation-heavy: keep the KV cache
    policy = apply_method(policy, cfg, "CAUSAL_LM", input_dir, seed=base.seed)
    value_model = apply_method(on_device(load_scalar_model(reward_dir, base.trust_remote_code, cfg)), cfg, "SEQ_CLS",
                               reward_dir, seed=base.seed)
    reward_model = on_device(load_scalar_model(reward_dir, base.trust_remote_code)).eval().requires_grad_(False)
    trainable, total = count_parameters(policy)

    def reward_fn(idx, rollout):
        answers = decode_responses(tokenizer, rollout)
        scores = rm_scores(reward_model, tokenizer, [train_records[i]["prompt"] for i in idx], answers)
        return scores.to(rollout.sequences.device)

    with StageRecord("ppo", experiment=base.tracking.experiment, params=params, run_name=run_name("ppo", cfg.method),
                     on_unreachable=base.tracking.on_server_unreachable,
                     tags={"method": cfg.method, "params_hash": hash_obj(params)[:12], "tokenizer_hash": tok_hash,
                           "data_hash": input_hashes["prompts"][:12]}) as rec:
        rec.log_dataset(Path(prompts_dir) / "train.jsonl", "prompts", context="training")

        def on_step(step, metrics, rollout):
            if step % cfg.sample_every == 0 or step == 1:
                answers = decode_responses(tokenizer, rollout)
                rec.log_table([{"step": step, "response": a} for a in answers[:4]], f"samples/step_{step:04d}.json")

        trainer = PPOTrainer(cfg, policy, value_model, reward_fn, train_prompts, tokenizer,
                             checkpoint_dir("ppo", params, input_hashes), base.seed, ref_model=ref_model, record=rec,
                             progress=Progress("ppo"), on_step=on_step)
        print(f"ppo: method {cfg.method}: {trainable:,} of {total:,} policy parameters trainable; "
              f"{cfg.steps} steps x {cfg.batch_size} episodes")
        state = train_ppo(trainer)
        if ref_model is None:
            sft_model, sft_ctx = policy, policy.disable_adapter
        else:
            sft_model, sft_ctx = ref_model, contextlib.nullcontext
        evaluation, table = evaluate_ppo(policy, sft_model, sft_ctx, reward_model, tokenizer, val_records,
                                         val_prompts, cfg)
        save_stage_output("ppo", policy, tokenizer, cfg.method, out_dir, input_dir, params, inputs, base.seed)
        h = state.history
        run_steps = [x for x in h if x["step"] > (getattr(trainer, "resumed_from", 0) or 0)]
        train = {"method": cfg.method, "init_from": policy_dir, "steps": state.step, "reward_first": h[0]["reward_mean"],
                 "reward_last": h[-1]["reward_mean"], "reward_last3_mean": sum(x["reward_mean"] for x in h[-3:]) / len(h[-3:]),
                 "kl_last": h[-1]["kl"], "kl_coef_last": h[-1]["kl_coef"], "target_kl": cfg.target_kl,
                 "episodes_per_second": sum(x["episodes_per_second"] for x in run_steps) / max(len(run_steps), 1),
                 "tokens_per_second": sum(x["tokens_per_second"] for x in run_steps) / max(len(run_steps), 1),
                 "peak_memory_mb": round(peak_memory_mb(), 1), "trainable_params": trainable,
                 "trainable_percent": round(100 * trainable / total, 4),
                 "resumed_from_step": getattr(trainer, "resumed_from", None)}
        metrics = {"train": train, "eval": evaluation}
        rec.write_metrics(metrics)
        rec.write_plot([{k: v for k, v in x.items()} for x in h], "train",
                       ys=("reward_mean", "kl", "kl_coef", "entropy", "value_loss", "clip_fraction"))
        rec.log_table(table, "eval_generations.json")
        lines = {"method": cfg.method, "reward (train)": f"{train['reward_first']:.3f} -> {train['reward_last']:.3f}",
                 "KL last / target": f"{train['kl_last']:.3f} / {cfg.target_kl}",
                 "win rate vs SFT": f"{evaluation['win_rate_vs_sft']:.3f}",
                 "RM score policy / sft": f"{evaluation['reward_policy']:.3f} / {evaluation['reward_sft']:.3f}",
                 "reference score policy / sft": f"{evaluation['reference_score_policy']:.3f} / "
                                                 f"{evaluation['reference_score_sft']:.3f}"}
        publish_summary("ppo", summary_markdown("ppo", "PPO-based RLHF", lines, rec.run_url, out_dir),
                        metrics_table(metrics))
    print("ppo: " + "; ".join(f"{k}: {v}" for k, v in lines.items()))
    return metrics


main = stage_main(ppo_flow, 'ppo')


if __name__ == "__main__":
    main()

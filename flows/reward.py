"""Stage `reward`: a scalar-head reward model on the SFT model, Bradley-Terry loss on preference pairs."""
from __future__ import annotations

import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from prefect import flow

from refinery.config import load_params
from refinery.data.records import read_jsonl
from refinery.errors import UserError
from refinery.evaluation.stats import bootstrap_mean, paired_difference
from refinery.modeling.loading import full_weights_of, load_tokenizer
from refinery.modeling.manifest import check_same_tokenizer, hash_obj
from refinery.modeling.methods import apply_method, check_stage_method, count_parameters
from refinery.modeling.precision import compute_precision
from refinery.ops.distributed import world_size
from refinery.ops.prefect_artifacts import Progress, metrics_table, publish_summary
from refinery.ops.prefect_tasks import uncached_task
from refinery.ops.stage_cli import (
    flow_run_namer,
    open_stage_record,
    refuse,
    stage_main,
    summary_markdown,
)
from refinery.train.reward_model import (
    BradleyTerryTrainer,
    evaluate_pairs,
    init_reward_model,
    pair_collator,
    pair_layout,
    pair_rows,
    scalar_head,
    weight_tasks,
)
from refinery.train.stage_io import StageInputs, save_stage_output, train_block
from refinery.train.trainer import derive_max_steps, global_batch, run_trainer


@uncached_task
def evaluate_rm(model, rows, pad_id, cfg) -> tuple[dict, list[float]]:
    return evaluate_pairs(model, rows, pad_id, cfg.eval.batch_size, cfg.eval.buckets)


@uncached_task
def train_rm(model, rows, padding_free, pad, cfg, ckpt, seed, rec, progress, val_rows=None):
    return run_trainer(model, rows, pair_collator(padding_free, pad, cfg.share_prompts), cfg.training, ckpt, seed,
                       record=rec, progress=progress, trainer_cls=BradleyTerryTrainer,
                       count_tokens="all" if padding_free else "non_padding",
                       margin=cfg.margin,
                       eval_dataset=val_rows)[0]


@dataclass(frozen=True, kw_only=True)
class RewardInputs(StageInputs):
    init_dir: str          # full weights the reward model starts from (the SFT output, or its base)
    note: str | None       # why init_dir is not the SFT output itself, when it is not
    prefs: Path            # data/prepared/preferences
    train: list[dict]      # chat-rendered pairs
    val: list[dict]
    pad: int
    padding_free: bool     # params' padding_free, `auto` resolved for this machine
    attn: str | None       # the attention kernel the model was loaded with (pair_layout)


def load_inputs(params_dir: str, input_dir: str, data_dir: str, overrides: dict | None) -> RewardInputs:
    """Params, tokenizer, pairs and the initial reward model, checked before anything trains (every rank
    builds the same)."""
    base = load_params("base", params_dir)
    cfg = load_params("reward", params_dir, overrides)
    check_stage_method(cfg, "reward", f"{params_dir}/reward.yaml")
    init_dir, note = full_weights_of(input_dir)
    tokenizer = load_tokenizer(input_dir, base.trust_remote_code)
    check_same_tokenizer(tokenizer, {"sft": input_dir})
    prefs = Path(data_dir) / "preferences"
    train = weight_tasks(pair_rows(tokenizer, [r for _, r in read_jsonl(prefs / "train.jsonl")], cfg.max_length),
                         cfg.task_weights, base.seed, f"{params_dir}/reward.yaml")
    derive_max_steps("reward", cfg.training, len(train), global_batch(cfg.training))  # an epoch = every (weighted) pair
    val = pair_rows(tokenizer, [r for _, r in read_jsonl(prefs / "validation.jsonl")], cfg.max_length)
    pad = tokenizer.pad_token_id
    padding_free, attn = pair_layout(cfg.share_prompts, cfg.padding_free, base.attn_implementation)
    model = init_reward_model(init_dir, pad, base.seed, base.trust_remote_code, cfg, attn)
    if padding_free and scalar_head(model) is None:
        raise UserError(f"{params_dir}/reward.yaml: padding_free: {type(model).__name__} has no per-position `score` "
                        "head to read a joined row's scores from; set padding_free: false")
    return RewardInputs(stage="reward", base=base, cfg=cfg, tokenizer=tokenizer,
                        inputs={"model": input_dir, "preferences": str(prefs)}, model=model,
                        init_dir=init_dir, note=note, prefs=prefs, train=train, val=val[:cfg.eval.max_pairs], pad=pad,
                        padding_free=padding_free, attn=attn)


def train_worker(params_dir: str = "params", input_dir: str = "models/sft", data_dir: str = "data/prepared",
                 overrides: dict | None = None, **_) -> None:
    """A non-zero rank of a multi-process reward run: the same model and pairs, trained in step with rank 0."""
    job = load_inputs(params_dir, input_dir, data_dir, overrides)
    model = apply_method(job.model, job.cfg, "SEQ_CLS", input_dir, seed=job.base.seed)
    train_rm.fn(model, job.train, job.padding_free, job.pad, job.cfg, job.checkpoint, job.base.seed,
                None, None, job.val)


@flow(name="reward", flow_run_name=flow_run_namer("reward"))
def reward_flow(params_dir: str = "params", input_dir: str = "models/sft", data_dir: str = "data/prepared",
                out_dir: str = "models/reward", overrides: dict | None = None):
    try:
        job = load_inputs(params_dir, input_dir, data_dir, overrides)
    except UserError as exc:
        return refuse(exc)
    if job.note:
        print(f"warning: reward: {job.note}", file=sys.stderr)
    base, cfg, init_dir, tokenizer, train, val = job.base, job.cfg, job.init_dir, job.tokenizer, job.train, job.val
    params, pad, model = job.params, job.pad, job.model

    with (open_stage_record("reward", base, params, method=cfg.method, tags=job.lineage_tags("preferences")) as rec,
          compute_precision(cfg.training.precision)):
        rec.log_dataset(job.prefs / "train.jsonl", "preferences", context="training")
        before, correct_before = evaluate_rm(model, val, pad, cfg)
        model = apply_method(model, cfg, "SEQ_CLS", input_dir, seed=base.seed)
        trainable, total = count_parameters(model)
        per_task = Counter(r["task"] or "(no task)" for r in train)
        print(f"reward: method {cfg.method}: {trainable:,} of {total:,} parameters trainable; {len(train)} pairs ("
              + ", ".join(f"{t} {n}" for t, n in sorted(per_task.items()))
              + (f"; task_weights {cfg.task_weights}" if cfg.task_weights else "") + ")")
        summary = train_rm(model, train, job.padding_free, pad, cfg, job.checkpoint,
                           base.seed, rec, Progress("reward"), val)
        after, correct_after = evaluate_rm(model, val, pad, cfg)
        manifest = save_stage_output("reward", model, tokenizer, cfg.method, out_dir, input_dir, params, job.inputs,
                                     base.seed)
        t = cfg.training
        pairs = (summary.steps - (summary.resumed_from or 0)) * t.batch_size * t.grad_accum * world_size()
        comparison = {"accuracy_change": paired_difference(correct_before, correct_after, seed=base.seed).as_dict(),
                      "accuracy": bootstrap_mean(correct_after, null=0.5, seed=base.seed).as_dict()}
        metrics = {"eval": after, "before": before, "comparison": comparison,
                   "train": train_block(cfg.method, summary, trainable, total, init_from=init_dir,
                                        pairs_per_second=round(pairs / max(summary.seconds, 1e-9), 3),
                                        precision=cfg.training.precision, padding_free=job.padding_free,
                                        share_prompts=cfg.share_prompts, attention=job.attn or "sdpa"),
                   "early_stopping": summary.selection(cfg.training)}
        rec.write_metrics(metrics)
        rec.write_plot(summary.history, "train", ys=("loss", "lr", "grad_norm", "tokens_per_second"))
        rec.write_plot(after["calibration"], "calibration", x="bucket", ys=("accuracy",))
        rec.set_tags({"tokenizer_hash": manifest["tokenizer_hash"]})
        lines = {"method": cfg.method, "accuracy": f"{before['accuracy']:.3f} -> {after['accuracy']:.3f}",
                 "accuracy [95% CI]": (f"{comparison['accuracy']['estimate']:.3f} [{comparison['accuracy']['ci_low']:.3f}, "
                                       f"{comparison['accuracy']['ci_high']:.3f}] n={after['n']}"),
                 "accuracy change": (f"{comparison['accuracy_change']['estimate']:+.3f} "
                                     f"[{comparison['accuracy_change']['ci_low']:+.3f}, "
                                     f"{comparison['accuracy_change']['ci_high']:+.3f}] "
                                     f"{comparison['accuracy_change']['verdict']}"),
                 "mean margin": f"{before['margin']:.3f} -> {after['margin']:.3f}",
                 "pairs/s": metrics["train"]["pairs_per_second"], "params hash": hash_obj(params)[:12]}
        publish_summary("reward", summary_markdown("reward", "reward model", lines, rec.run_url, out_dir),
                        after["calibration"] + metrics_table({"accuracy_by_task": after["accuracy_by_task"]}))
    print(f"reward: held-out accuracy {before['accuracy']:.3f} -> {after['accuracy']:.3f}, margin "
          f"{before['margin']:.3f} -> {after['margin']:.3f} ({after['n']} pairs) -> {out_dir}")
    return metrics


main = stage_main(reward_flow, 'reward', worker=train_worker)


if __name__ == "__main__":
    main()

"""Stage `sft`: multi-task supervised fine-tuning on a weighted task mixture, loss on the response only."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from prefect import flow

from refinery.data.chat import render_example
from refinery.data.mixture import build_train_rows, load_task, mixture_probs
from refinery.data.packing import FlatCollator, LabelledLogitsOnly, PadCollator, batch_collator
from refinery.errors import UserError
from refinery.evaluation.forgetting import general_losses, load_general, retention, retention_summary
from refinery.evaluation.sft_tasks import compare_tasks, evaluate_tasks
from refinery.modeling.manifest import hash_obj
from refinery.modeling.methods import REGISTRY, apply_method, count_parameters
from refinery.modeling.precision import compute_precision
from refinery.ops.prefect_artifacts import Progress, publish_summary
from refinery.ops.prefect_tasks import uncached_task
from refinery.ops.stage_cli import (
    checkpoint_dir,
    flow_run_namer,
    open_stage_record,
    refuse,
    stage_main,
    summary_markdown,
)
from refinery.train.stage_io import StageInputs, load_start, save_stage_output, train_block
from refinery.train.trainer import derive_max_steps, global_batch, run_trainer


@uncached_task
def evaluate_sft(model, tokenizer, val, metrics, cfg):
    return evaluate_tasks(model, tokenizer, val, metrics, cfg)


@uncached_task
def train_sft(model, rows, collate, cfg, ckpt, seed, rec, progress, count_tokens, val_rows=None):
    return run_trainer(model, rows, collate, cfg.training, ckpt, seed, record=rec, progress=progress,
                       count_tokens=count_tokens, resumable=REGISTRY[cfg.method].resumable, eval_dataset=val_rows)[0]


@dataclass(frozen=True, kw_only=True)
class SftInputs(StageInputs):
    folder: Path                     # data/prepared/sft
    val: dict[str, list[dict]]       # task -> held-out records
    probs: dict[str, float]          # task -> mixture probability
    rows: list[dict]                 # the training rows, drawn from the mixture
    counts: dict[str, int]           # task -> examples in those rows
    collate: PadCollator | FlatCollator | LabelledLogitsOnly  # training batches
    count_tokens: str                # "all" for packed rows, "non_padding" for padded ones

    @property
    def monitor_rows(self) -> list[dict]:
        """The fixed validation slice monitored during training: the held-out examples of every task (the
        ones the after-eval scores), one row each, response-only labels."""
        n = self.cfg.eval.max_examples_per_task
        return [dict(zip(("input_ids", "labels"), render_example(self.tokenizer, r["prompt"], r["response"], all_turns=False)))
                for records in self.val.values() for r in records[:n]]


def load_inputs(params_dir: str, input_dir: str, data_dir: str, overrides: dict | None) -> SftInputs:
    """Params, model, data and the training rows, checked before anything trains (every rank builds the same)."""
    base, cfg, method, model, tokenizer = load_start("sft", params_dir, input_dir, overrides)
    folder = Path(data_dir) / "sft"
    train = {t: load_task(folder, t, "train") for t in cfg.tasks}
    val = {t: load_task(folder, t, "validation") for t in cfg.tasks}
    all_turns = cfg.loss_on == "all_turns"
    pools = {t: [render_example(tokenizer, r["prompt"], r["response"], all_turns) for r in recs]
             for t, recs in train.items()}
    probs = mixture_probs({t: len(p) for t, p in pools.items()}, {t: s.weight for t, s in cfg.tasks.items()},
                          cfg.mixing, cfg.temperature)
    t = cfg.training
    # an epoch = every training example once, in expectation (rows are drawn from the mixture); a packed row holds
    # about block_size / (mean example length) examples
    n_examples = sum(map(len, pools.values()))
    mean_len = sum(min(len(ex[0]), cfg.block_size) for p in pools.values() for ex in p) / max(n_examples, 1)
    per_row = max(1, cfg.block_size // max(int(mean_len), 1)) if method.packing else 1
    derive_max_steps("sft", t, n_examples, global_batch(t) * per_row)
    n_rows = t.max_steps * global_batch(t)
    rows, counts = build_train_rows(pools, probs, n_rows, cfg.block_size, method.packing, base.seed)
    # the LM head on answer positions only (LabelledLogitsOnly); not with virtual tokens (positions shift), Liger
    # (its fused loss never builds the logits) or torch.compile (a new index length per batch would recompile)
    head_on_labels = not (method.virtual_tokens or t.use_liger_kernel or t.torch_compile)
    return SftInputs(stage="sft", base=base, cfg=cfg, model=model, tokenizer=tokenizer,
                     inputs={"model": input_dir, "sft_data": str(folder)}, folder=folder, val=val, probs=probs,
                     rows=rows, counts=counts, collate=batch_collator(cfg.padding_free, tokenizer.pad_token_id, head_on_labels),
                     general=load_general(data_dir, tokenizer),
                     count_tokens="all" if method.packing else "non_padding")


def train_worker(params_dir: str = "params", input_dir: str = "models/dapt", data_dir: str = "data/prepared",
                 overrides: dict | None = None, stage: str = "sft", **_) -> None:
    """A non-zero rank of a multi-process SFT: the same model and rows, trained in step with rank 0."""
    job = load_inputs(params_dir, input_dir, data_dir, overrides)
    model = apply_method(job.model, job.cfg, "CAUSAL_LM", input_dir, seed=job.base.seed)
    train_sft.fn(model, job.rows, job.collate, job.cfg, checkpoint_dir(stage, job.params, job.input_hashes),
                 job.base.seed, None, None, job.count_tokens, job.monitor_rows)


@flow(name="sft", flow_run_name=flow_run_namer("sft"))
def sft_flow(params_dir: str = "params", input_dir: str = "models/dapt", data_dir: str = "data/prepared",
             out_dir: str = "models/sft", overrides: dict | None = None, stage: str = "sft", record_root: str = "."):
    """`stage`/`record_root` let the method comparison run this same flow per method without touching
    metrics/sft.json (its records go under experiments/compare/<name>/seed<s>/<method>/)."""
    try:
        job = load_inputs(params_dir, input_dir, data_dir, overrides)
    except UserError as exc:
        return refuse(exc)
    base, cfg, tokenizer, model, val, params = job.base, job.cfg, job.tokenizer, job.model, job.val, job.params
    share = {k: round(v / max(sum(job.counts.values()), 1), 4) for k, v in job.counts.items()}
    metric_of = {k: s.metric for k, s in cfg.tasks.items()}

    with (open_stage_record(stage, base, params, method=cfg.method, root=record_root,
                            tags=job.lineage_tags("sft_data")) as rec, compute_precision(cfg.training.precision)):
        for task_name in cfg.tasks:
            rec.log_dataset(job.folder / task_name / "train.jsonl", f"sft/{task_name}", context="training")
        if cfg.eval.before:
            before, samples_before, per_before = evaluate_sft(model, tokenizer, val, metric_of, cfg)
            general_before = general_losses(model, job.general, tokenizer.pad_token_id)
        else:
            before, samples_before, per_before, general_before = None, [], None, None
        model = apply_method(model, cfg, "CAUSAL_LM", input_dir, seed=base.seed)
        trainable, total = count_parameters(model)
        print(f"{stage}: method {cfg.method}: {trainable:,} of {total:,} parameters trainable "
              f"({100 * trainable / total:.3f}%); {len(job.rows)} rows, mixture share {share}")
        summary = train_sft(model, job.rows, job.collate, cfg, checkpoint_dir(stage, params, job.input_hashes), base.seed, rec,
                            Progress(stage), job.count_tokens, job.monitor_rows)
        after, samples_after, per_after = evaluate_sft(model, tokenizer, val, metric_of, cfg)
        manifest = save_stage_output(stage, model, tokenizer, cfg.method, out_dir, input_dir, params, job.inputs, base.seed)
        comparison = compare_tasks(per_before, per_after, base.seed) if per_before else None
        general_after = general_losses(model, job.general, tokenizer.pad_token_id) if general_before else None
        metrics = {**({"before": before} if before else {}), "after": after,
                   **({"comparison": comparison} if comparison else {}),
                   "train": train_block(cfg.method, summary, trainable, total, rows=len(job.rows),
                                        mixture_probability={k: round(v, 4) for k, v in job.probs.items()},
                                        mixture_share=share, examples=sum(job.counts.values()),
                                        precision=cfg.training.precision),
                   "early_stopping": summary.selection(cfg.training),
                   # each held-out example's task score after training (reports/<stage>/evaluation.json only):
                   # what the method comparison's CIs and its "within noise of the best" are computed from
                   "per_example_after": {t: [round(s, 6) for s in v["score"]] for t, v in per_after.items()},
                   **({"general_retention": retention(general_before, general_after, base.seed)}
                      if general_before else {})}
        rec.write_metrics(metrics)
        rec.write_plot(summary.history, "train", ys=("loss", "lr", "grad_norm", "tokens_per_second"))
        before_score = (lambda k: before["tasks"][k]["score"]) if before else (lambda k: None)
        rec.write_plot([{"task": k, "before": before_score(k), "after": after["tasks"][k]["score"]}
                        for k in cfg.tasks], "task_scores", x="task", ys=("before", "after"))
        rec.log_table([{**a, "generation_before": b["generation"] if b else None}
                       for a, b in zip(samples_after, samples_before or [None] * len(samples_after))], "samples.json")
        rec.set_tags({"tokenizer_hash": manifest["tokenizer_hash"]})
        ref = before or after
        table = [{"task": k, "metric": v["metric"], "score_before": round(ref["tasks"][k]["score"], 4),
                  "score_after": round(v["score"], 4), "loss_before": round(ref["tasks"][k]["loss"], 4),
                  "loss_after": round(v["loss"], 4), "n": v["n"],
                  "score change [95% CI]": (f"{comparison[k]['score_change']['estimate']:+.3f} "
                                            f"[{comparison[k]['score_change']['ci_low']:+.3f}, "
                                            f"{comparison[k]['score_change']['ci_high']:+.3f}]") if comparison else "",
                  "verdict": comparison[k]["score_change"]["verdict"] if comparison else "",
                  "share": share[k]} for k, v in after["tasks"].items()]
        lines = {"method": cfg.method, "mean score": f"{ref['mean_score']:.3f} -> {after['mean_score']:.3f}",
                 "trainable": f"{trainable:,} ({100 * trainable / total:.3f}%)",
                 **retention_summary(metrics),
                 "tokens/s": metrics["train"]["tokens_per_second"], "params hash": hash_obj(params)[:12]}
        publish_summary(stage, summary_markdown(stage, "multi-task SFT", lines, rec.run_url, out_dir), table)
    for row in table:
        print(f"{stage}: {row['task']:<14} {row['metric']:<12} {row['score_before']:.3f} -> {row['score_after']:.3f}"
              f"   loss {row['loss_before']:.3f} -> {row['loss_after']:.3f}   share {row['share']:.2f}   n={row['n']}"
              f"  {row['score change [95% CI]']} {row['verdict']}")
    return metrics


main = stage_main(sft_flow, 'sft', worker=train_worker)


if __name__ == "__main__":
    main()

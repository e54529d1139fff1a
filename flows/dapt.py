"""Stage `dapt`: domain-adaptive pretraining, causal-LM loss on the packed in-domain corpus."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from prefect import flow

from refinery.data.corpus import corpus_rows, sample_prompts
from refinery.data.packing import FlatCollator, PadCollator, batch_collator
from refinery.errors import UserError
from refinery.evaluation.forgetting import general_losses, load_general, retention, retention_summary
from refinery.evaluation.heldout import generate, row_losses
from refinery.evaluation.stats import paired_difference
from refinery.modeling.manifest import hash_obj
from refinery.modeling.methods import REGISTRY, apply_method, count_parameters
from refinery.modeling.precision import compute_precision
from refinery.ops.prefect_artifacts import Progress, metrics_table, publish_summary
from refinery.ops.prefect_tasks import uncached_task
from refinery.ops.stage_cli import flow_run_namer, open_stage_record, refuse, stage_main, summary_markdown
from refinery.train.stage_io import StageInputs, load_start, save_stage_output, train_block
from refinery.train.trainer import derive_max_steps, global_batch, run_trainer

SOURCE = "params/dapt.yaml"


@uncached_task
def evaluate_lm(model, rows, collate, cfg) -> tuple[dict, list[float]]:
    return row_losses(model, rows, cfg.eval.batch_size, cfg.eval.max_batches, collate)


@uncached_task
def train_lm(model, rows, collate, cfg, ckpt, seed, rec, progress, val_rows=None):
    count = "all" if "position_ids" in rows[0] else "non_padding"
    return run_trainer(model, rows, collate, cfg.training, ckpt, seed, record=rec, progress=progress,
                       count_tokens=count, resumable=REGISTRY[cfg.method].resumable, eval_dataset=val_rows)[0]


@dataclass(frozen=True, kw_only=True)
class DaptInputs(StageInputs):
    corpus: Path
    train_rows: list[dict]
    val_rows: list[dict]
    collate: PadCollator | FlatCollator  # training batches

    @property
    def monitor_rows(self) -> list[dict]:
        """The fixed validation slice monitored during training (the same rows the after-eval reads)."""
        e = self.cfg.eval
        return self.val_rows[:e.batch_size * e.max_batches]


def load_inputs(params_dir: str, input_dir: str, data_dir: str, overrides: dict | None) -> DaptInputs:
    """Params, model, tokenizer and rows, checked before anything trains (every rank builds the same)."""
    base, cfg, method, model, tokenizer = load_start("dapt", params_dir, input_dir, overrides)
    corpus = Path(data_dir) / "corpus"
    train_rows = corpus_rows(corpus / "train.jsonl", tokenizer, cfg.block_size, method.packing)
    derive_max_steps("dapt", cfg.training, len(train_rows), global_batch(cfg.training))  # an epoch = every row once
    return DaptInputs(stage="dapt", base=base, cfg=cfg, model=model, tokenizer=tokenizer,
                      inputs={"model": input_dir, "corpus": str(corpus)}, corpus=corpus,
                      general=load_general(data_dir, tokenizer), train_rows=train_rows,
                      val_rows=corpus_rows(corpus / "validation.jsonl", tokenizer, cfg.block_size, method.packing),
                      collate=batch_collator(cfg.padding_free, tokenizer.pad_token_id))


def train_worker(params_dir: str = "params", input_dir: str = "models/base", data_dir: str = "data/prepared",
                 overrides: dict | None = None, **_) -> None:
    """A non-zero rank of a multi-process dapt: the same model and rows, trained in step with rank 0."""
    job = load_inputs(params_dir, input_dir, data_dir, overrides)
    model = apply_method(job.model, job.cfg, "CAUSAL_LM", input_dir, seed=job.base.seed)
    train_lm.fn(model, job.train_rows, job.collate, job.cfg, job.checkpoint, job.base.seed, None, None,
                job.monitor_rows)


@flow(name="dapt", flow_run_name=flow_run_namer("dapt"))
def dapt_flow(params_dir: str = "params", input_dir: str = "models/base", data_dir: str = "data/prepared",
              out_dir: str = "models/dapt", overrides: dict | None = None):
    try:
        job = load_inputs(params_dir, input_dir, data_dir, overrides)
    except UserError as exc:
        return refuse(exc)
    base, cfg, tokenizer, model = job.base, job.cfg, job.tokenizer, job.model
    prompts = sample_prompts(job.corpus / "validation.jsonl", cfg.eval.num_samples)

    with (open_stage_record("dapt", base, job.params, method=cfg.method, tags=job.lineage_tags("corpus")) as rec,
          compute_precision(cfg.training.precision)):
        rec.log_dataset(job.corpus / "train.jsonl", "corpus", context="training")
        padded = PadCollator(tokenizer.pad_token_id)  # per-row losses (paired CIs): one row per document block
        before, rows_before = evaluate_lm(model, job.val_rows, padded, cfg)
        gens_before = generate(model, tokenizer, prompts, cfg.eval.max_new_tokens, chat=False)
        general_before = general_losses(model, job.general, tokenizer.pad_token_id)
        model = apply_method(model, cfg, "CAUSAL_LM", input_dir, seed=base.seed)
        trainable, total = count_parameters(model)
        print(f"dapt: method {cfg.method}: {trainable:,} of {total:,} parameters trainable "
              f"({100 * trainable / total:.3f}%), {len(job.train_rows)} rows of {cfg.block_size} tokens")
        summary = train_lm(model, job.train_rows, job.collate, cfg, job.checkpoint, base.seed, rec, Progress("dapt"),
                           job.monitor_rows)
        after, rows_after = evaluate_lm(model, job.val_rows, padded, cfg)
        gens_after = generate(model, tokenizer, prompts, cfg.eval.max_new_tokens, chat=False)
        general_after = general_losses(model, job.general, tokenizer.pad_token_id)
        manifest = save_stage_output("dapt", model, tokenizer, cfg.method, out_dir, input_dir, job.params, job.inputs, base.seed)
        # per held-out row (a block of documents): the change of its mean token loss, paired
        comparison = {"eval_loss_change": paired_difference(rows_before, rows_after, higher_is_better=False,
                                                            seed=base.seed).as_dict()}
        metrics = {"before": before, "after": after, "comparison": comparison,
                   "train": train_block(cfg.method, summary, trainable, total, rows=len(job.train_rows),
                                        precision=cfg.training.precision),
                   "early_stopping": summary.selection(cfg.training)}
        if general_before is not None:
            metrics["general_retention"] = retention(general_before, general_after, base.seed)
        rec.write_metrics(metrics)
        rec.write_plot(summary.history, "train", ys=("loss", "lr", "grad_norm", "tokens_per_second"))
        rec.log_table([{"prompt": p, "before": b, "after": a} for p, b, a in zip(prompts, gens_before, gens_after)],
                      "samples.json")
        rec.set_tags({"tokenizer_hash": manifest["tokenizer_hash"]})
        lines = {"method": cfg.method, "eval loss": f"{before['eval_loss']:.4f} -> {after['eval_loss']:.4f}",
                 "perplexity": f"{before['perplexity']:.2f} -> {after['perplexity']:.2f}",
                 "loss change per row [95% CI]": (f"{comparison['eval_loss_change']['estimate']:+.4f} "
                                                  f"[{comparison['eval_loss_change']['ci_low']:+.4f}, "
                                                  f"{comparison['eval_loss_change']['ci_high']:+.4f}] "
                                                  f"n={comparison['eval_loss_change']['n']}, "
                                                  f"{comparison['eval_loss_change']['verdict']}"),
                 **retention_summary(metrics),
                 "tokens/s": metrics["train"]["tokens_per_second"], "params hash": hash_obj(job.params)[:12],
                 "data hash": job.input_hashes["corpus"][:12]}
        publish_summary("dapt", summary_markdown("dapt", "domain-adaptive pretraining", lines, rec.run_url, out_dir),
                        metrics_table(metrics))
    print(f"dapt: eval loss {before['eval_loss']:.4f} -> {after['eval_loss']:.4f}, perplexity "
          f"{before['perplexity']:.2f} -> {after['perplexity']:.2f}; {summary.tokens_per_second:.0f} tokens/s; "
          f"-> {out_dir}")
    return metrics


main = stage_main(dapt_flow, 'dapt', worker=train_worker)


if __name__ == "__main__":
    main()

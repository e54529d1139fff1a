"""Stage `dapt`: domain-adaptive pretraining, causal-LM loss on the packed in-domain corpus."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from refinery.ops.prefect_artifacts import Progress, metrics_table, publish_summary
from refinery.data.corpus import corpus_rows, sample_prompts
from refinery.errors import UserError
from refinery.evaluation.heldout import eval_loss, generate
from refinery.modeling.manifest import hash_obj, hash_path
from refinery.modeling.methods import REGISTRY, apply_method, count_parameters
from refinery.data.packing import PadCollator
from refinery.ops.stage_cli import checkpoint_dir, flow_run_namer, refuse, run_name, stage_main, summary_markdown
from refinery.ops.tracking import StageRecord
from refinery.train.stage_io import load_start, save_stage_output, train_block
from refinery.train.trainer import run_trainer

SOURCE = "params/dapt.yaml"


@task(cache_policy=NO_CACHE)
def evaluate_lm(model, rows, collate, cfg) -> dict:
    return eval_loss(model, rows, cfg.eval.batch_size, cfg.eval.max_batches, collate)


@task(cache_policy=NO_CACHE)
def train_lm(model, rows, collate, cfg, ckpt, seed, rec, progress):
    count = "all" if "position_ids" in rows[0] else "non_padding"
    return run_trainer(model, rows, collate, cfg.training, ckpt, seed, record=rec, progress=progress,
                       count_tokens=count, resumable=REGISTRY[cfg.method].resumable)[0]


def load_inputs(params_dir: str, input_dir: str, data_dir: str, overrides: dict | None) -> SimpleNamespace:
    """Params, model, tokenizer and rows, checked before anything trains (every rank builds the same)."""
    base, cfg, method, model, tokenizer = load_start("dapt", params_dir, input_dir, overrides)
    corpus = Path(data_dir) / "corpus"
    train_rows = corpus_rows(corpus / "train.jsonl", tokenizer, cfg.block_size, method.packing)
    val_rows = corpus_rows(corpus / "validation.jsonl", tokenizer, cfg.block_size, method.packing)
    params = {"base": base.model_dump(), "dapt": cfg.model_dump()}
    inputs = {"model": input_dir, "corpus": str(corpus)}
    input_hashes = {k: hash_path(v) for k, v in inputs.items()}
    return SimpleNamespace(base=base, cfg=cfg, model=model, tokenizer=tokenizer, corpus=corpus,
                           train_rows=train_rows, val_rows=val_rows, params=params, inputs=inputs,
                           input_hashes=input_hashes, ckpt=checkpoint_dir("dapt", params, input_hashes),
                           collate=PadCollator(tokenizer.pad_token_id))


def train_worker(params_dir: str = "params", input_dir: str = "models/base", data_dir: str = "data/prepared",
                 overrides: dict | None = None, **_) -> None:
    """A non-zero rank of a multi-process dapt: the same model and rows, trained in step with rank 0."""
    job = load_inputs(params_dir, input_dir, data_dir, overrides)
    model = apply_method(job.model, job.cfg, "CAUSAL_LM", input_dir, seed=job.base.seed)
    train_lm.fn(model, job.train_rows, job.collate, job.cfg, job.ckpt, job.base.seed, None, None)


@flow(name="dapt", flow_run_name=flow_run_namer("dapt"))
def dapt_flow(params_dir: str = "params", input_dir: str = "models/base", data_dir: str = "data/prepared",
              out_dir: str = "models/dapt", overrides: dict | None = None):
    try:
        job = load_inputs(params_dir, input_dir, data_dir, overrides)
    except UserError as exc:
        return refuse(exc)
    base, cfg, model, tokenizer, corpus = job.base, job.cfg, job.model, job.tokenizer, job.corpus
    train_rows, val_rows, params, inputs, input_hashes = (job.train_rows, job.val_rows, job.params, job.inputs,
                                                          job.input_hashes)
    ckpt, collate = job.ckpt, job.collate
    prompts = sample_prompts(corpus / "validation.jsonl", cfg.eval.num_samples)

    with StageRecord("dapt", experiment=base.tracking.experiment, params=params,
                     run_name=run_name("dapt", cfg.method), on_unreachable=base.tracking.on_server_unreachable,
                     tags={"method": cfg.method, "params_hash": hash_obj(params)[:12],
                           "data_hash": input_hashes["corpus"][:12], "input_model_hash": input_hashes["model"][:12]}) as rec:
        rec.log_dataset(corpus / "train.jsonl", "corpus", context="training")
        before = evaluate_lm(model, val_rows, collate, cfg)
        gens_before = generate(model, tokenizer, prompts, cfg.eval.max_new_tokens, chat=False)
        model = apply_method(model, cfg, "CAUSAL_LM", input_dir, seed=base.seed)
        trainable, total = count_parameters(model)
        print(f"dapt: method {cfg.method}: {trainable:,} of {total:,} parameters trainable "
              f"({100 * trainable / total:.3f}%), {len(train_rows)} rows of {cfg.block_size} tokens")
        summary = train_lm(model, train_rows, collate, cfg, ckpt, base.seed, rec, Progress("dapt"))
        after = evaluate_lm(model, val_rows, collate, cfg)
        gens_after = generate(model, tokenizer, prompts, cfg.eval.max_new_tokens, chat=False)
        manifest = save_stage_output("dapt", model, tokenizer, cfg.method, out_dir, input_dir, params, inputs, base.seed)
        metrics = {"before": before, "after": after,
                   "train": train_block(cfg.method, summary, trainable, total, rows=len(train_rows))}
        rec.write_metrics(metrics)
        rec.write_plot(summary.history, "train", ys=("loss", "lr", "grad_norm", "tokens_per_second"))
        rec.log_table([{"prompt": p, "before": b, "after": a} for p, b, a in zip(prompts, gens_before, gens_after)],
                      "samples.json")
        rec.set_tags({"tokenizer_hash": manifest["tokenizer_hash"]})
        lines = {"method": cfg.method, "eval loss": f"{before['eval_loss']:.4f} -> {after['eval_loss']:.4f}",
                 "perplexity": f"{before['perplexity']:.2f} -> {after['perplexity']:.2f}",
                 "tokens/s": metrics["train"]["tokens_per_second"], "params hash": hash_obj(params)[:12],
                 "data hash": input_hashes["corpus"][:12]}
        publish_summary("dapt", summary_markdown("dapt", "domain-adaptive pretraining", lines, rec.run_url, out_dir),
                        metrics_table(metrics))
    print(f"dapt: eval loss {before['eval_loss']:.4f} -> {after['eval_loss']:.4f}, perplexity "
          f"{before['perplexity']:.2f} -> {after['perplexity']:.2f}; {summary.tokens_per_second:.0f} tokens/s; "
          f"-> {out_dir}")
    return metrics


main = stage_main(dapt_flow, 'dapt', worker=train_worker)


if __name__ == "__main__":
    main()

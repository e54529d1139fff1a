"""Stage `sft`: multi-task supervised fine-tuning on a weighted task mixture, loss on the response only."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from refinery.ops.prefect_artifacts import Progress, publish_summary
from refinery.ops.distributed import world_size
from refinery.errors import UserError
from refinery.modeling.manifest import hash_obj, hash_path
from refinery.modeling.methods import REGISTRY, apply_method, count_parameters
from refinery.data.packing import PadCollator
from refinery.data.chat import render_example
from refinery.data.mixture import build_train_rows, load_task, mixture_probs
from refinery.evaluation.sft_tasks import evaluate_tasks
from refinery.ops.stage_cli import (
    checkpoint_dir,
    flow_run_namer,
    refuse,
    run_name,
    stage_main,
    summary_markdown,
)
from refinery.ops.tracking import StageRecord
from refinery.train.stage_io import load_start, save_stage_output, train_block
from refinery.train.trainer import run_trainer


@task(cache_policy=NO_CACHE)
def evaluate_sft(model, tokenizer, val, metrics, cfg):
    return evaluate_tasks(model, tokenizer, val, metrics, cfg)


@task(cache_policy=NO_CACHE)
def train_sft(model, rows, collate, cfg, ckpt, seed, rec, progress, count_tokens):
    return run_trainer(model, rows, collate, cfg.training, ckpt, seed, record=rec, progress=progress,
                       count_tokens=count_tokens, resumable=REGISTRY[cfg.method].resumable)[0]


def load_inputs(params_dir: str, input_dir: str, data_dir: str, overrides: dict | None) -> SimpleNamespace:
    """Params, model, data and the training rows, checked before anything trains (every rank builds the same)."""
    base, cfg, method, model, tokenizer = load_start("sft", params_dir, input_dir, overrides)
    folder = Path(data_dir) / "sft"
    train = {t: load_task(folder, t, "train") for t in cfg.tasks}
    val = {t: load_task(folder, t, "validation") for t in cfg.tasks}
    params = {"base": base.model_dump(), "sft": cfg.model_dump()}
    inputs = {"model": input_dir, "sft_data": str(folder)}
    input_hashes = {k: hash_path(v) for k, v in inputs.items()}
    pools = {t: [render_example(tokenizer, r["prompt"], r["response"]) for r in recs] for t, recs in train.items()}
    probs = mixture_probs({t: len(p) for t, p in pools.items()}, {t: s.weight for t, s in cfg.tasks.items()},
                          cfg.mixing, cfg.temperature)
    t = cfg.training
    rows, counts = build_train_rows(pools, probs, t.max_steps * t.batch_size * t.grad_accum * max(t.nproc_per_node, world_size()),
                                    cfg.block_size, method.packing, base.seed)
    return SimpleNamespace(base=base, cfg=cfg, method=method, model=model, tokenizer=tokenizer, folder=folder,
                           val=val, params=params, inputs=inputs, input_hashes=input_hashes, probs=probs, rows=rows,
                           counts=counts, collate=PadCollator(tokenizer.pad_token_id),
                           count_tokens="all" if method.packing else "non_padding")


def train_worker(params_dir: str = "params", input_dir: str = "models/dapt", data_dir: str = "data/prepared",
                 overrides: dict | None = None, stage: str = "sft", **_) -> None:
    """A non-zero rank of a multi-process SFT: the same model and rows, trained in step with rank 0."""
    job = load_inputs(params_dir, input_dir, data_dir, overrides)
    model = apply_method(job.model, job.cfg, "CAUSAL_LM", input_dir, seed=job.base.seed)
    train_sft.fn(model, job.rows, job.collate, job.cfg, checkpoint_dir(stage, job.params, job.input_hashes),
                 job.base.seed, None, None, job.count_tokens)


@flow(name="sft", flow_run_name=flow_run_namer("sft"))
def sft_flow(params_dir: str = "params", input_dir: str = "models/dapt", data_dir: str = "data/prepared",
             out_dir: str = "models/sft", overrides: dict | None = None, stage: str = "sft", record_root: str = "."):
    """`stage`/`record_root` let the method comparison run this same flow per method without touching
    metrics/sft.json (its records go under reports/compare/<method>/)."""
    try:
        job = load_inputs(params_dir, input_dir, data_dir, overrides)
    except UserError as exc:
        return refuse(exc)
    base, cfg, tokenizer, model, folder, val = job.base, job.cfg, job.tokenizer, job.model, job.folder, job.val
    params, inputs, input_hashes, probs, rows, counts = (job.params, job.inputs, job.input_hashes, job.probs,
                                                         job.rows, job.counts)
    share = {k: round(v / max(sum(counts.values()), 1), 4) for k, v in counts.items()}
    metric_of = {k: s.metric for k, s in cfg.tasks.items()}
    collate = job.collate

    with StageRecord(stage, experiment=base.tracking.experiment, params=params, run_name=run_name(stage, cfg.method),
                     root=Path(record_root), on_unreachable=base.tracking.on_server_unreachable,
                     tags={"method": cfg.method, "params_hash": hash_obj(params)[:12],
                           "data_hash": input_hashes["sft_data"][:12], "input_model_hash": input_hashes["model"][:12]}) as rec:
        for task_name in cfg.tasks:
            rec.log_dataset(folder / task_name / "train.jsonl", f"sft/{task_name}", context="training")
        if cfg.eval.before:
            before, samples_before = evaluate_sft(model, tokenizer, val, metric_of, cfg)
        else:
            before, samples_before = None, []
        model = apply_method(model, cfg, "CAUSAL_LM", input_dir, seed=base.seed)
        trainable, total = count_parameters(model)
        print(f"{stage}: method {cfg.method}: {trainable:,} of {total:,} parameters trainable "
              f"({100 * trainable / total:.3f}%); {len(rows)} rows, mixture share {share}")
        summary = train_sft(model, rows, collate, cfg, checkpoint_dir(stage, params, input_hashes), base.seed, rec,
                            Progress(stage), job.count_tokens)
        after, samples_after = evaluate_sft(model, tokenizer, val, metric_of, cfg)
        manifest = save_stage_output(stage, model, tokenizer, cfg.method, out_dir, input_dir, params, inputs, base.seed)
        metrics = {**({"before": before} if before else {}), "after": after,
                   "train": train_block(cfg.method, summary, trainable, total, rows=len(rows),
                                        mixture_probability={k: round(v, 4) for k, v in probs.items()},
                                        mixture_share=share, examples=sum(counts.values()))}
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
                  "loss_after": round(v["loss"], 4), "share": share[k]} for k, v in after["tasks"].items()]
        lines = {"method": cfg.method, "mean score": f"{ref['mean_score']:.3f} -> {after['mean_score']:.3f}",
                 "trainable": f"{trainable:,} ({100 * trainable / total:.3f}%)",
                 "tokens/s": metrics["train"]["tokens_per_second"], "params hash": hash_obj(params)[:12]}
        publish_summary(stage, summary_markdown(stage, "multi-task SFT", lines, rec.run_url, out_dir), table)
    for row in table:
        print(f"{stage}: {row['task']:<14} {row['metric']:<12} {row['score_before']:.3f} -> {row['score_after']:.3f}"
              f"   loss {row['loss_before']:.3f} -> {row['loss_after']:.3f}   share {row['share']:.2f}")
    return metrics


main = stage_main(sft_flow, 'sft', worker=train_worker)


if __name__ == "__main__":
    main()

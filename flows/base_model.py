"""Stage `base_model`: import the base checkpoint into models/base/ as a plain HF folder."""
from __future__ import annotations

from prefect import flow

from refinery.atomic import atomic_dir
from refinery.config import load_params
from refinery.errors import UserError
from refinery.evaluation.heldout import generate
from refinery.modeling.base_import import import_base
from refinery.modeling.manifest import build_manifest, tokenizer_fingerprint, write_manifest
from refinery.modeling.methods import count_parameters
from refinery.ops.dvc_deps import check_stage
from refinery.ops.prefect_artifacts import metrics_table, publish_summary
from refinery.ops.prefect_tasks import uncached_task
from refinery.ops.stage_cli import open_stage_record, refuse, run_name, stage_main, summary_markdown

SMOKE_PROMPT = "What is the capital of France?"


@uncached_task
def save_base(model, tokenizer, out_dir: str, params: dict, seed: int) -> dict:
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        manifest = build_manifest("base_model", tmp, params=params, inputs={},
                                  tokenizer_hash=tokenizer_fingerprint(tokenizer), seed=seed)
        write_manifest(tmp, manifest)
    return manifest


@flow(name="base_model", flow_run_name="base_model-{out_dir}")
def base_model_flow(params_dir: str = "params", out_dir: str = "models/base", overrides: dict | None = None):
    try:
        base = load_params("base", params_dir)
        cfg = load_params("base_model", params_dir, overrides)
        if params_dir == "params":  # the DVC stage: a local folder it reads must be a dep (refinery/ops/dvc_deps.py)
            check_stage("base_model")
        model, tokenizer = import_base(cfg, base.seed, base.trust_remote_code)
    except UserError as exc:
        return refuse(exc)
    params = {"base": base.model_dump(), "base_model": cfg.model_dump()}
    if cfg.source == "hub":  # what a branch or tag resolved to, so the manifest (and dvc.lock) pin it
        params["base_model"]["resolved_revision"] = getattr(model.config, "_commit_hash", None)
    with open_stage_record("base_model", base, params, name=run_name("base_model", cfg.source)) as rec:
        answer = generate(model, tokenizer, [SMOKE_PROMPT], max_new_tokens=16)[0]
        manifest = save_base(model, tokenizer, out_dir, params, base.seed)
        _, total = count_parameters(model)
        info = {"source": cfg.source, "parameters": total, "layers": model.config.num_hidden_layers,
                "hidden_size": model.config.hidden_size, "context": model.config.max_position_embeddings,
                "tokenizer_hash": manifest["tokenizer_hash"], "smoke_answer": answer}
        rec.set_tags({"base_model": cfg.path or cfg.source, "tokenizer_hash": manifest["tokenizer_hash"]})
        rec.write_metrics({k: v for k, v in info.items() if k != "smoke_answer"})
        rec.log_table([{"prompt": SMOKE_PROMPT, "answer": answer}], "samples.json")
        publish_summary("base-model", summary_markdown("base_model", f"imported {cfg.source}", info, rec.run_url,
                                                       out_dir), metrics_table(info))
    print(f"base_model: {total:,} parameters from '{cfg.source}' -> {out_dir} ({SMOKE_PROMPT!r} -> {answer!r})")
    return info


main = stage_main(base_model_flow, 'base_model')


if __name__ == "__main__":
    main()

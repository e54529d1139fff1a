"""Stage `prepare`: validate, deduplicate and split every raw data set into data/prepared/."""
from __future__ import annotations

from prefect import flow

from refinery.atomic import atomic_dir, atomic_write_json
from refinery.config import load_params
from refinery.data.prepare import prepare_all
from refinery.errors import UserError
from refinery.modeling.loading import load_tokenizer
from refinery.ops.dvc_deps import check_stage
from refinery.ops.prefect_artifacts import publish_summary
from refinery.ops.stage_cli import open_stage_record, refuse, stage_main, summary_markdown


@flow(name="prepare", flow_run_name="prepare")
def prepare_flow(params_dir: str = "params", model_dir: str = "models/base", out_dir: str = "data/prepared",
                 overrides: dict | None = None):
    import json
    from pathlib import Path

    try:
        base = load_params("base", params_dir)
        cfg = load_params("prepare", params_dir, overrides)
        if params_dir == "params":  # the DVC stage: every file it reads must be a dep (refinery/ops/dvc_deps.py)
            check_stage("prepare")
        tokenizer = load_tokenizer(model_dir, base.trust_remote_code)
        context = json.loads((Path(model_dir) / "config.json").read_text()).get("max_position_embeddings", 10**9)
        with atomic_dir(out_dir) as tmp:  # validation errors raise before the rename: nothing is written
            report = prepare_all(cfg, tokenizer, context, base.seed, tmp)
            atomic_write_json(tmp / "report.json", report)
    except UserError as exc:
        return refuse(exc)
    params = {"base": base.model_dump(), "prepare": cfg.model_dump()}
    with open_stage_record("prepare", base, params) as rec:
        rec.write_metrics(report)
        for name, counts in report["sets"].items():  # the general set is held out whole: no train split
            split = "train" if counts["train"] else "validation"
            rec.log_dataset(Path(out_dir) / name / f"{split}.jsonl", name, context="prepare")
        table = [{"set": k, **{c: v[c] for c in ("kept", "train", "validation", "dropped")}}
                 for k, v in report["sets"].items()]
        publish_summary("prepare", summary_markdown("prepare", "data report", report["total"], rec.run_url, out_dir),
                        table)
    for row in table:
        print(f"prepare: {row['set']:<22} kept {row['kept']:>5}  train {row['train']:>5}  "
              f"validation {row['validation']:>4}  dropped {row['dropped']}")
    return report


main = stage_main(prepare_flow, 'prepare')


if __name__ == "__main__":
    main()

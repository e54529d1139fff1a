"""The method comparison: the same SFT (data, steps, seed) once per adaptation method, measured side by side.

Each method runs `python -m flows.sft` in its own process, so its peak memory is its own (a process's
peak RSS never goes down, so in-process runs would inherit the previous method's peak) and methods can
run in parallel (`parallel:` in params/compare.yaml, a Prefect thread pool of subprocesses).
Writes reports/compare/methods.{md,csv}, quality_vs_trainable.png and metrics/compare.json; one MLflow
parent run with a child run per method; a Prefect table artifact.
"""
from __future__ import annotations

import os
from pathlib import Path

from prefect import flow

from refinery.config import load_params
from refinery.errors import UserError
from refinery.evaluation.method_claims import judge
from refinery.evaluation.stats import NO_CHANGE, WORSE, mean_of_task_means
from refinery.ops.prefect_artifacts import publish_summary
from refinery.ops.prefect_link import fan_out_runner
from refinery.ops.prefect_tasks import uncached_task
from refinery.ops.sft_points import run_sft_point, write_table
from refinery.ops.stage_cli import open_stage_record, refuse, stage_main

# held-out examples (all tasks together) below which the table ranks nothing: the project's rule of >= 50
# examples per comparison; the demo's smoke-sized comparison (2 per task) stays below it on purpose
MIN_RANK_N = 50
COLUMNS = ("method", "trainable_params", "trainable_percent", "peak_memory_mb", "seconds_per_step",
           "tokens_per_second", "eval_loss", "score", "score_ci", "vs_best", "seeds_claim", "agrees", "why_not",
           "status")


@uncached_task(task_run_name="sft-{method}", retries=0)
def run_method(method: str, params_dir: str, input_dir: str, data_dir: str, out: str, overrides: dict,
               env: dict) -> dict:
    stage = f"compare-{method.replace('_', '-')}"
    m, status = run_sft_point(Path(out) / method, {"method": method, **overrides}, env, params_dir, stage=stage,
                              extra_args=("--input-dir", input_dir, "--data-dir", data_dir))
    if m is None:
        return {"method": method, "status": status}
    tasks_after = m["after"]["tasks"].values()
    return {"method": method, **{k: m["train"][k] for k in ("trainable_params", "trainable_percent", "peak_memory_mb",
                                                            "seconds_per_step", "tokens_per_second")},
            "eval_loss": round(sum(t["loss"] for t in tasks_after) / len(tasks_after), 4),
            "score": round(m["after"]["mean_score"], 4),
            "per_example": m.get("per_example_after", {}),
            "status": "ok"}


def add_evidence(rows: list[dict], seed: int) -> list[dict]:
    """Per method: the score's 95% CI (examples resampled within each task), the paired difference to the
    best method on the same held-out examples (`within noise` when its CI contains 0), and the seeds'
    claims for the method against what this run measured (refinery/evaluation/method_claims.py)."""
    ok = [r for r in rows if r.get("status") == "ok" and r.get("per_example")]
    full = next((r for r in ok if r["method"] == "full"), None)
    best = max(ok, key=lambda r: r["score"], default=None)
    for r in rows:
        if r.get("status") != "ok":
            continue
        if r.get("per_example"):
            e = mean_of_task_means(r["per_example"], seed=seed)
            r["score_ci"] = f"[{e.ci_low:.3f}, {e.ci_high:.3f}] n={e.n}"
            d = None if r is best else mean_of_task_means(r["per_example"], best["per_example"], seed=seed)
            if d is None:
                r["vs_best"] = "best"
            elif e.n < MIN_RANK_N:  # a bootstrap over a handful of examples gives intervals far too narrow
                r["vs_best"] = f"{d.estimate:+.3f}: too few examples to rank (n={e.n}, needs >= {MIN_RANK_N})"
            else:
                r["vs_best"] = (f"{d.estimate:+.3f} [{d.ci_low:+.3f}, {d.ci_high:+.3f}]: "
                                + ("within noise" if d.verdict == NO_CHANGE else "worse" if d.verdict == WORSE else "better"))
        j = judge(r["method"], r, full)
        r.update({"seeds_claim": j["claim"], "agrees": j["agrees"], "why_not": j["why"]})
    return rows


FOOTER = ("`trainable_percent` = trainable / all parameters; `score` = mean over tasks of the held-out task metric "
          "after SFT, `score_ci` its 95% bootstrap CI (examples resampled within each task); `vs_best` = the paired "
          "difference to the best method on the same examples with its 95% CI (`within noise`: the CI contains 0, "
          "so this run cannot rank the two); `peak_memory_mb` = peak RSS of the method's process (CPU) or peak CUDA "
          "memory allocated (GPU); `seeds_claim` = the seed articles' table (parameters updated, compute, memory: "
          "low < 0.5x full, medium < 0.8x, high) against this run, `why_not` where they disagree.")


def plot_quality(rows: list[dict], path: Path) -> Path | None:
    ok = [r for r in rows if r.get("status") == "ok"]
    if not ok:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in ok:
        ax.scatter(r["trainable_percent"], r["score"], s=30)
        ax.annotate(r["method"], (r["trainable_percent"], r["score"]), textcoords="offset points", xytext=(4, 4))
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (% of the model, log scale)")
    ax.set_ylabel("held-out task score after SFT")
    ax.set_title("Quality against trainable parameters")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


@flow(name="compare_methods", flow_run_name="compare-methods")
def compare_flow(params_dir: str = "params", input_dir: str = "models/dapt", data_dir: str = "data/prepared",
                 out_dir: str = "reports/compare"):
    try:
        base = load_params("base", params_dir)
        cfg = load_params("compare", params_dir)
        load_params("sft", params_dir)
    except UserError as exc:
        return refuse(exc)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open_stage_record("compare", base, {"compare": cfg.model_dump()}) as rec:
        env = {**os.environ, "REFINERY_PARENT_RUN_ID": rec.run_id}
        base_overrides = {"training.max_steps": cfg.max_steps, **cfg.sft_overrides}
        with fan_out_runner(cfg.task_runner, cfg.parallel) as runner:
            futures = [runner.submit(run_method, {
                "method": m, "params_dir": params_dir, "input_dir": input_dir, "data_dir": data_dir, "out": out_dir,
                "overrides": {**base_overrides, **({"training.lr": cfg.lr[m]} if m in cfg.lr else {})}, "env": env})
                for m in cfg.methods]
            rows = add_evidence([f.result() for f in futures], base.seed)
        md = write_table(rows, list(COLUMNS), out, "methods", "Method comparison (same SFT data, steps and seed)",
                         FOOTER)
        png = plot_quality(rows, out / "quality_vs_trainable.png")
        rec.write_metrics({"methods": {r["method"]: {k: v for k, v in r.items() if k not in ("method", "per_example")}
                                       for r in rows}})
        for f in (out / "methods.md", out / "methods.csv", png):
            if f:
                rec.log_artifact(f, "comparison")
        publish_summary("compare-methods", md, rows)
    print(md)
    failed = [r for r in rows if r.get("status") != "ok"]
    if failed:
        raise RuntimeError(f"{len(failed)} method(s) failed: " + "; ".join(f"{r['method']}: {r['status']}" for r in failed))
    return rows


main = stage_main(compare_flow, 'compare')


if __name__ == "__main__":
    main()

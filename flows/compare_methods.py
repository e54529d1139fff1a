"""The method comparison: the same SFT (data, steps) once per adaptation method and per seed, side by side.

    python -m flows.compare_methods [--name NAME] [--seeds 42,43] [--methods full,lora,...] [--max-steps N]
                                    [--parallel N]                      (defaults: params/compare.yaml)
    make compare                                                        (the same, with params/compare.yaml)

An experiment command like flows/sweep.py, not a DVC stage: a comparison that can rank methods (n >= 50
held-out examples per method, two seeds) does not fit the demo's 30-minute budget on 2 CPU cores, and at the
demo's smoke budget it ranked nothing. A frozen DVC stage does not help (one with missing outs still leaves
`dvc status` unclean), and `dvc status` reads every dvc.yaml in the repository, so no separate dvc.yaml either.

Inputs: models/dapt and data/prepared (from `make demo` or `dvc repro sft`). Outputs, all under
experiments/compare/<name>/ (gitignored): seed<seed>/<method>/ per run (model/, metrics/, plots/, log.txt),
params-seed<seed>/ (params/ with base.yaml's `seed` replaced: what the sft flow reads), methods.{md,csv} and
quality_vs_trainable.png (the table: one row per method), metrics/compare.json and
reports/compare/evaluation.json. One MLflow parent run (stage `compare`) with a child run per method and seed;
a Prefect table artifact.

Each method runs `python -m flows.sft` in its own process, so its peak memory is its own (a process's peak RSS
never goes down, so in-process runs would inherit the previous method's peak) and methods can run in parallel
(`parallel:`, a Prefect thread pool of subprocesses).
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
from pathlib import Path

import yaml
from prefect import flow

from refinery.config import load_params
from refinery.errors import UserError, exit_on_user_error
from refinery.evaluation.method_claims import judge
from refinery.evaluation.stats import NO_CHANGE, WORSE, mean_of_task_means
from refinery.ops.prefect_artifacts import publish_summary
from refinery.ops.prefect_link import fan_out_runner
from refinery.ops.prefect_tasks import uncached_task
from refinery.ops.sft_points import run_sft_point, write_table
from refinery.ops.stage_cli import open_stage_record, refuse, run_cli, run_name

# held-out examples (all tasks together) below which the table ranks nothing: the project's rule of >= 50
# examples per comparison (params/compare.yaml's 50 per task x 3 tasks = 150 clears it)
MIN_RANK_N = 50
COLUMNS = ("method", "trainable_params", "trainable_percent", "peak_memory_mb", "seconds_per_step",
           "tokens_per_second", "eval_loss", "score", "score_ci", "vs_best", "seeds_claim", "agrees", "why_not",
           "status")
EXPERIMENTS = Path("experiments") / "compare"
NOT_READY = "run the pipeline first (`make demo` or `dvc repro sft`)"


@uncached_task(task_run_name="sft-{method}-seed{seed}", retries=0)
def run_method(method: str, seed: int, params_dir: str, input_dir: str, data_dir: str, out: str, overrides: dict,
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


def verdict_word(row: dict) -> str:
    """A method's verdict against the best in one seed: best / within noise / worse / better, `unranked` (too
    few examples to rank) or `failed`."""
    if row.get("status") != "ok":
        return "failed"
    text = row.get("vs_best", "too few examples to rank")  # no per-example scores: nothing to rank by
    if text == "best":  # the highest score, but from fewer than MIN_RANK_N examples that ranks nothing either
        n = re.search(r"\bn=(\d+)", row.get("score_ci", ""))
        return "unranked" if n and int(n.group(1)) < MIN_RANK_N else "best"
    if "too few examples to rank" in text:
        return "unranked"
    return text.rsplit(": ", 1)[-1]


def kendall_tau(x: list[float], y: list[float]) -> float | None:
    """Kendall's tau-b of two paired score lists (ties counted as scipy.stats.kendalltau does); None when it
    is undefined (fewer than 2 pairs, or one list all ties)."""
    concordant = discordant = ties_x = ties_y = 0
    for i in range(len(x)):
        for j in range(i + 1, len(x)):
            dx, dy = x[i] - x[j], y[i] - y[j]
            if dx == 0 and dy == 0:
                continue
            if dx == 0:
                ties_x += 1
            elif dy == 0:
                ties_y += 1
            elif (dx > 0) == (dy > 0):
                concordant += 1
            else:
                discordant += 1
    denom = ((concordant + discordant + ties_x) * (concordant + discordant + ties_y)) ** 0.5
    return (concordant - discordant) / denom if denom else None


def stability(rows_by_seed: dict[int, list[dict]]) -> tuple[list[dict], dict, str]:
    """The table across seeds (a pure function of rows already judged per seed by `add_evidence`): the first
    seed's rows, plus `score_seed<s>` for every seed, `vs_best_seed<s>` for the other seeds and `stable` (`yes`
    when the verdict against the best is the same in every seed, `no` when it differs, `n/a` when a seed could
    not rank the method (fewer than MIN_RANK_N examples, the best one's included) or it failed).
    Returns (rows, summary, the line for under the table)."""
    seeds = list(rows_by_seed)
    first = seeds[0]
    by_seed = {s: {r["method"]: r for r in rows} for s, rows in rows_by_seed.items()}
    rows = [dict(r) for r in rows_by_seed[first]]
    if len(seeds) == 1:
        return rows, {"seeds": seeds}, "one seed: stability not checked."
    for r in rows:
        m = r["method"]
        for s in seeds:
            r[f"score_seed{s}"] = by_seed[s].get(m, {}).get("score", "")
        words = [verdict_word(by_seed[s].get(m, {})) for s in seeds]
        for s, w in zip(seeds[1:], words[1:]):
            r[f"vs_best_seed{s}"] = w
        r["stable"] = ("n/a" if {"unranked", "failed"} & set(words) else "yes" if len(set(words)) == 1 else "no")
    taus, corr = {}, []
    for s in seeds[1:]:
        both = [m for m, r in by_seed[first].items()
                if r.get("status") == "ok" and by_seed[s].get(m, {}).get("status") == "ok"]
        tau = kendall_tau([by_seed[first][m]["score"] for m in both], [by_seed[s][m]["score"] for m in both])
        taus[f"seed{first}_vs_seed{s}"] = {"tau": None if tau is None else round(tau, 4), "n": len(both)}
        corr.append(f"seed {first} vs {s}: " + ("undefined" if tau is None else f"{tau:+.3f}") + f" (n={len(both)} methods)")
    judged = [r["stable"] for r in rows if r["stable"] != "n/a"]
    summary = {"seeds": seeds, "kendall_tau": taus,
               "stable_verdicts": {"stable": judged.count("yes"), "judged": len(judged), "methods": len(rows)}}
    line = (f"Rank correlation of the methods' scores between seeds (Kendall tau): {'; '.join(corr)}. Stable "
            f"verdicts against the best: {judged.count('yes')} of {len(judged)} judged ({len(rows) - len(judged)} "
            "n/a: too few examples to rank, or a failed run).")
    return rows, summary, line


FOOTER = ("`trainable_percent` = trainable / all parameters; `score` = mean over tasks of the held-out task metric "
          "after SFT, `score_ci` its 95% bootstrap CI (examples resampled within each task); `vs_best` = the paired "
          "difference to the best method on the same examples with its 95% CI (`within noise`: the CI contains 0, "
          "so this run cannot rank the two); `peak_memory_mb` = peak RSS of the method's process (CPU) or peak CUDA "
          "memory allocated (GPU); `seeds_claim` = the seed articles' table (parameters updated, compute, memory: "
          "low < 0.5x full, medium < 0.8x, high) against this run, `why_not` where they disagree. All of these are "
          "the first seed's; `score_seed<s>` = each seed's score, `vs_best_seed<s>` = the other seeds' verdict "
          "against their best, `stable` = `yes` when the verdict is the same in every seed.")


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


def load_compare(params_dir: str, overrides: dict | None = None):
    """(base params, compare params with the command line's values), validated; UserError on bad params."""
    base = load_params("base", params_dir)
    cfg = load_params("compare", params_dir, {k: v for k, v in (overrides or {}).items() if v is not None})
    load_params("sft", params_dir)
    return base, cfg


def check_inputs(input_dir: str, data_dir: str) -> None:
    """Refuse before anything trains when the pipeline has not produced the comparison's inputs."""
    for path in (Path(input_dir), Path(data_dir) / "sft"):
        if not path.is_dir():
            raise UserError(f"{path}: not found; the method comparison starts from the pipeline's outputs: "
                            f"{NOT_READY}")


def seed_params(params_dir: str, seed: int, dst: Path) -> Path:
    """A copy of `params_dir` with base.yaml's `seed` set to `seed` (base.yaml loses its comments there)."""
    dst.mkdir(parents=True, exist_ok=True)
    for f in Path(params_dir).glob("*.yaml"):
        shutil.copy2(f, dst / f.name)
    base = yaml.safe_load((Path(params_dir) / "base.yaml").read_text()) or {}
    base["seed"] = seed
    (dst / "base.yaml").write_text(yaml.safe_dump(base, sort_keys=False))
    return dst


@flow(name="compare_methods", flow_run_name="compare-methods-{name}")
def compare_flow(name: str = "default", params_dir: str = "params", input_dir: str = "models/dapt",
                 data_dir: str = "data/prepared", seeds: list[int] | None = None, methods: list[str] | None = None,
                 max_steps: int | None = None, parallel: int | None = None):
    """`seeds`, `methods`, `max_steps`, `parallel`: None takes params/compare.yaml's value."""
    try:
        base, cfg = load_compare(params_dir, {"seeds": seeds, "methods": methods, "max_steps": max_steps,
                                              "parallel": parallel})
        check_inputs(input_dir, data_dir)
        runner = fan_out_runner(cfg.task_runner, cfg.parallel)
    except UserError as exc:
        return refuse(exc)
    out = EXPERIMENTS / name
    out.mkdir(parents=True, exist_ok=True)
    dirs = {s: str(seed_params(params_dir, s, out / f"params-seed{s}")) for s in cfg.seeds}
    with open_stage_record("compare", base, {"compare": cfg.model_dump()}, root=out,
                           name=run_name("compare", name)) as rec:
        env = {**os.environ, "REFINERY_PARENT_RUN_ID": rec.run_id}
        # equal budgets: the same steps for every method, whatever params/sft.yaml says about epochs
        base_overrides = {"training.max_steps": cfg.max_steps, "training.num_epochs": None, **cfg.sft_overrides}
        with runner:
            futures = {(s, m): runner.submit(run_method, {
                "method": m, "seed": s, "params_dir": dirs[s], "input_dir": input_dir, "data_dir": data_dir,
                "out": str(out / f"seed{s}"), "env": env,
                "overrides": {**base_overrides, **({"training.lr": cfg.lr[m]} if m in cfg.lr else {})}})
                for s in cfg.seeds for m in cfg.methods}
            per_seed = {s: add_evidence([futures[s, m].result() for m in cfg.methods], s) for s in cfg.seeds}
        rows, summary, line = stability(per_seed)
        columns = [*COLUMNS[:COLUMNS.index("seeds_claim")],
                   *dict.fromkeys(k for r in rows for k in r if k.startswith(("score_seed", "vs_best_seed"))),
                   *(["stable"] if len(cfg.seeds) > 1 else []), *COLUMNS[COLUMNS.index("seeds_claim"):]]
        title = (f"Method comparison (same SFT data and steps; seeds {', '.join(map(str, cfg.seeds))}; "
                 f"table values from seed {cfg.seeds[0]})")
        md = write_table(rows, columns, out, "methods", title, f"{line}\n\n{FOOTER}")
        png = plot_quality(rows, out / "quality_vs_trainable.png")
        table = [{k: v for k, v in r.items() if k != "per_example"} for r in rows]
        rec.write_metrics({"methods": {r["method"]: {k: v for k, v in r.items() if k != "method"} for r in table},
                           **summary,
                           "per_seed": {f"seed{s}": {r["method"]: {k: r.get(k) for k in ("score", "vs_best", "status")}
                                                     for r in rs} for s, rs in per_seed.items()}})
        for f in (out / "methods.md", out / "methods.csv", png):
            if f:
                rec.log_artifact(f, "comparison")
        publish_summary(f"compare-{name}".lower().replace("_", "-").replace(".", "-"), md, table)
    print(md)
    failed = [f"seed {s} {r['method']}: {r['status']}" for s, rs in per_seed.items() for r in rs if r.get("status") != "ok"]
    if failed:
        raise RuntimeError(f"{len(failed)} method run(s) failed: " + "; ".join(failed))
    return rows


def int_list(text: str, option: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise UserError(f"{option} {text}: expected whole numbers separated by commas, e.g. 42,43") from None


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Compare adaptation methods: the same SFT once per method and seed "
                                             "(defaults: params/compare.yaml).")
    ap.add_argument("--name", default="default", help="experiments/compare/<name>/ holds the outputs")
    ap.add_argument("--seeds", help="comma-separated seeds, e.g. 42,43")
    ap.add_argument("--methods", help="comma-separated methods, e.g. full,lora,ia3")
    ap.add_argument("--max-steps", type=int, help="SFT steps per method")
    ap.add_argument("--parallel", type=int, help="method runs at once (each in its own process)")
    ap.add_argument("--params-dir", default="params")
    ap.add_argument("--input-dir", default="models/dapt")
    ap.add_argument("--data-dir", default="data/prepared")
    args = ap.parse_args(argv)
    kwargs = {"seeds": int_list(args.seeds, "--seeds") if args.seeds else None,
              "methods": args.methods.split(",") if args.methods else None,
              "max_steps": args.max_steps, "parallel": args.parallel}

    def precheck():  # bad params or missing inputs: one line in a second, before Prefect starts
        load_compare(args.params_dir, kwargs)
        check_inputs(args.input_dir, args.data_dir)

    run_cli(compare_flow, precheck=precheck, name=args.name, params_dir=args.params_dir, input_dir=args.input_dir,
            data_dir=args.data_dir, **kwargs)


if __name__ == "__main__":
    main(sys.argv[1:])

"""A Prefect parameter sweep over SFT: the Cartesian product of `--grid KEY=V1,V2,...`, each point the `sft`
stage's own flow in its own process (a subflow in the Prefect UI, a child MLflow run under one sweep run),
with its outputs under experiments/<name>/<point>/ (model/, metrics/sft.json, plots/sft/, log.txt).

Same params, same result: a point runs exactly what `dvc exp run sft -S params/sft.yaml:KEY=V` runs (the
slow test checks both give the same metrics). A point whose params equal an earlier run's reuses that run's
checkpoints (checkpoints/ is keyed by params and inputs), so a rerun of a sweep resumes instead of retraining.

    python -m flows.sweep --name lr --grid training.lr=0.0001,0.0003
    python -m flows.sweep --name methods --grid method=lora,ia3,adapter --parallel 2 --task-runner dask
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys
from pathlib import Path

import yaml
from prefect import flow

from refinery.config import load_params
from refinery.errors import UserError, exit_on_user_error
from refinery.modeling.methods import check_stage_method
from refinery.ops.prefect_artifacts import publish_summary
from refinery.ops.prefect_link import fan_out_runner
from refinery.ops.prefect_tasks import uncached_task
from refinery.ops.sft_points import run_sft_point, write_table
from refinery.ops.stage_cli import open_stage_record, refuse, run_cli, run_name


def grid_points(grid: dict[str, list]) -> list[dict]:
    keys = list(grid)
    return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]


def point_name(point: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in point.items()).replace("/", "_")


@uncached_task(task_run_name="{name}", retries=0)
def run_point(name: str, point: dict, params_dir: str, out: str, env: dict) -> dict:
    m, status = run_sft_point(Path(out) / name, point, env, params_dir)
    if m is None:
        return {"point": name, **point, "status": status}
    return {"point": name, **point, "score": round(m["after"]["mean_score"], 4),
            "final_loss": m["train"]["final_loss"], "tokens_per_second": m["train"]["tokens_per_second"],
            "peak_memory_mb": m["train"]["peak_memory_mb"], "status": "ok"}


@flow(name="sweep", flow_run_name="sweep-{name}")
def sweep_flow(grid: dict[str, list], name: str = "sweep", params_dir: str = "params", parallel: int = 1,
               task_runner: str = "thread"):
    try:
        base = load_params("base", params_dir)
        points = grid_points(grid)
        if not points:
            raise UserError("--grid: nothing to sweep (give KEY=V1,V2,...)")
        for point in points:  # every point's params are valid before anything trains
            check_stage_method(load_params("sft", params_dir, point), "sft", f"{params_dir}/sft.yaml")
        runner = fan_out_runner(task_runner, parallel)
    except UserError as exc:
        return refuse(exc)
    out = Path("experiments") / name
    out.mkdir(parents=True, exist_ok=True)
    with open_stage_record("sweep", base, {"grid": grid, "task_runner": task_runner}, root=out,
                           name=run_name("sweep", name)) as rec:
        env = {**os.environ, "REFINERY_PARENT_RUN_ID": rec.run_id}
        with runner:
            futures = [runner.submit(run_point, {"name": point_name(p), "point": p, "params_dir": params_dir,
                                                 "out": str(out), "env": env}) for p in points]
            rows = [f.result() for f in futures]
        md = write_table(rows, list(dict.fromkeys(k for r in rows for k in r)), out, "sweep", "SFT sweep")
        rec.log_artifact(out / "sweep.csv")
        publish_summary(f"sweep-{name}".lower().replace("_", "-").replace(".", "-"), md, rows)
    print(md)
    failed = [r for r in rows if r["status"] != "ok"]
    if failed:
        raise RuntimeError(f"{len(failed)} point(s) failed: " + "; ".join(f"{r['point']}: {r['status']}" for r in failed))
    return rows


def parse_grid(items: list[str]) -> dict[str, list]:
    grid: dict[str, list] = {}
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or not values:
            raise UserError(f"--grid {item}: expected KEY=V1,V2,... e.g. training.lr=0.0001,0.0003")
        grid[key] = [yaml.safe_load(v) for v in values.split(",")]
    return grid


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Sweep SFT params as one Prefect flow (one subflow per point).")
    ap.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2", required=True)
    ap.add_argument("--name", default="sweep", help="experiments/<name>/ holds the points' outputs")
    ap.add_argument("--params-dir", default="params")
    ap.add_argument("--parallel", type=int, default=1, help="points run at once (each in its own process)")
    ap.add_argument("--task-runner", default="thread", choices=("thread", "dask"))
    args = ap.parse_args(argv)
    run_cli(sweep_flow, grid=parse_grid(args.grid), name=args.name, params_dir=args.params_dir,
            parallel=args.parallel, task_runner=args.task_runner)


if __name__ == "__main__":
    main(sys.argv[1:])

"""The whole pipeline as one Prefect flow, in DVC's order, executed by DVC.

Each stage is a Prefect task that runs `dvc repro --single-item <stage>`: DVC runs the stage's own flow
(`python -m flows.<stage>`) and records it in dvc.lock, so after a Prefect run `dvc status` is clean and
`dvc repro` does nothing. A stage DVC reports up to date is not run: its task ends in a `Skipped` state
with DVC's reason. The order comes from dvc.yaml (refinery/ops/dag.py), never from a list here.

    python -m flows.pipeline                      # everything that changed
    python -m flows.pipeline --from sft --to ppo  # a slice
    python -m flows.pipeline --set sft.method=ia3 --set ppo.steps=20   # writes params/<stage>.yaml first
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from pathlib import Path

import yaml
from prefect import flow
from prefect.states import Completed

from refinery.atomic import atomic_write_json
from refinery.config import apply_overrides, load_params
from refinery.errors import UserError, exit_on_user_error
from refinery.ops import dvc_deps
from refinery.ops.dag import flow_name, locked_stage_hash, pipeline_status, stage_order, stage_status
from refinery.ops.prefect_artifacts import publish_summary
from refinery.ops.prefect_link import DeferredLink, close_unfinished, inherited_env
from refinery.ops.prefect_log import run_logged
from refinery.ops.prefect_tasks import uncached_task
from refinery.ops.repo_lock import repository_lock
from refinery.ops.stage_cli import leave_after, open_stage_record, refuse, run_cli, run_name
from refinery.ops.warm_start import WarmServer

REPORT = Path("reports/pipeline/report.md")
TIMING = Path("reports/pipeline-timing.json")  # beside, not inside, the report stage's DVC out


def select(order: list[str], start: str | None, stop: str | None) -> list[str]:
    for name in (start, stop):
        if name is not None and name not in order:
            raise UserError(f"unknown stage '{name}' (dvc.yaml has: {', '.join(order)})")
    i = order.index(start) if start else 0
    j = order.index(stop) + 1 if stop else len(order)
    if i >= j:
        raise UserError(f"--from {start} comes after --to {stop} in dvc.yaml")
    return order[i:j]


@uncached_task(retries=2, retry_delay_seconds=5)  # reading DVC state is I/O: worth a retry
def dvc_status(stage: str) -> dict:
    return stage_status(stage)


@uncached_task(retries=0)  # a training failure is deterministic: no retry
def run_stage(stage: str, env: dict, force: bool = False) -> float:
    """Runs the stage through DVC (`--force`: even when DVC says it is up to date); returns its wall seconds."""
    t0 = time.perf_counter()
    # the stage's flow run shows as this task's subflow; created while DVC and the stage process start
    link = DeferredLink(flow_name(stage), env)
    code = run_logged(["dvc", "repro", "--single-item", stage] + (["--force"] if force else []), link.env, stage)
    close_unfinished(link.run_id(), code)
    if code != 0:
        raise RuntimeError(f"stage '{stage}' failed (dvc repro exit code {code}); its previous "
                           "output is untouched and a rerun resumes from its last checkpoint")
    return time.perf_counter() - t0


@uncached_task(retries=2, retry_delay_seconds=5)
def tag_dvc_hash(stage: str, parent_run_id: str) -> str | None:
    """DVC's view of what the stage ran on (cmd, deps' md5s, params in dvc.lock), as a tag on the stage's
    MLflow child run and on the pipeline run, so an MLflow run can be matched to a dvc.lock entry."""
    digest = locked_stage_hash(stage)
    if digest is None:
        return None
    import mlflow

    client = mlflow.MlflowClient()
    client.set_tag(parent_run_id, f"dvc_stage_hash.{stage}", digest[:16])
    children = client.search_runs(
        [client.get_run(parent_run_id).info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}' and tags.stage = '{stage}'")
    for run in children:
        client.set_tag(run.info.run_id, "dvc_stage_hash", digest[:16])
    return digest


def overhead(total: float, status_s: float, walls: dict[str, float], parent_run_id: str) -> dict:
    """Where the pipeline's time went: the stages' own bodies (training, evaluation, saving: StageRecord's
    timing.body_seconds less its MLflow time) against everything around them."""
    import mlflow

    client = mlflow.MlflowClient()
    try:
        runs = client.search_runs([client.get_run(parent_run_id).info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'")
        body = {r.data.tags.get("stage"): r.data.metrics for r in runs}
    except Exception:  # tracking unreachable: the stages' bodies are unknown, count them as overhead-free
        body = {s: {"timing.body_seconds": w} for s, w in walls.items()}
    stages = {s: {"wall_seconds": round(w, 2), "body_seconds": round(body.get(s, {}).get("timing.body_seconds", 0), 2),
                  "mlflow_seconds": round(body.get(s, {}).get("timing.mlflow_seconds", 0), 2)} for s, w in walls.items()}
    mlflow_s = sum(v["mlflow_seconds"] for v in stages.values())
    compute = sum(v["body_seconds"] for v in stages.values()) - mlflow_s
    outside = sum(v["wall_seconds"] - v["body_seconds"] for v in stages.values())
    return {"total_seconds": round(total, 2), "compute_seconds": round(compute, 2),
            "overhead_share": round(1 - compute / total, 4) if total > 0 else None,
            "dvc_status_seconds": round(status_s, 2), "mlflow_seconds": round(mlflow_s, 2),
            "stage_process_outside_body_seconds": round(outside, 2),
            "pipeline_flow_seconds": round(total - sum(walls.values()) - status_s, 2), "stages": stages}


@uncached_task
def skip_stage(stage: str, reason: str):
    return Completed(name="Skipped", message=f"{stage}: {reason}")


def pipeline_run_name() -> str:
    """`pipeline-<sha>`, or `pipeline-sft..ppo-<sha>` for a slice, unless the run was given a name."""
    from prefect.runtime import flow_run

    args = flow_run.parameters or {}
    if args.get("name"):
        return args["name"]
    start, stop = args.get("from_stage"), args.get("to_stage")
    span = f"{start or ''}..{stop or ''}" if start or stop else None
    return run_name("pipeline", span)


@flow(name="pipeline", flow_run_name=pipeline_run_name)
def pipeline_flow(from_stage: str | None = None, to_stage: str | None = None, overrides: dict | None = None,
                  force: bool = False, name: str | None = None, wait: bool = False):
    """`wait`: queue behind a run that holds the repository instead of failing (refinery/ops/repo_lock.py)."""
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    with contextlib.ExitStack() as held:
        try:  # only the lock's refusal is answered here; the run's own errors are _run_pipeline's
            held.enter_context(repository_lock(ctx.flow_run.name if ctx else (name or "pipeline"), wait))
        except UserError as exc:
            return refuse(exc)
        return _run_pipeline(from_stage, to_stage, overrides, force, name)


def _run_pipeline(from_stage: str | None, to_stage: str | None, overrides: dict | None, force: bool,
                  name: str | None):
    try:
        apply_overrides(overrides or {})
        for change in dvc_deps.sync():  # data paths named in params/ become deps before DVC decides what is stale
            print(f"pipeline: dvc.yaml updated: {change}")
        stages = select(stage_order(), from_stage, to_stage)
        base = load_params("base")
    except UserError as exc:
        return refuse(exc)
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    flow_run_id = str(ctx.flow_run.id) if ctx else ""
    results: dict[str, str] = {}
    with open_stage_record("pipeline", base, {"stages": ",".join(stages), "overrides": overrides or {}, "force": force},
                           name=ctx.flow_run.name if ctx else (name or run_name("pipeline")),
                           tags={"prefect_flow_run_id": flow_run_id}) as rec:
        env = {**os.environ, "REFINERY_PARENT_RUN_ID": rec.run_id, "REFINERY_PREFECT_FLOW_RUN_ID": flow_run_id}
        t_start, status_s, walls = time.perf_counter(), 0.0, {}
        # the stage processes DVC starts fork from one interpreter that imported torch & co. once
        # (refinery/ops/warm_start.py); started with the first stage that runs, which itself starts cold: made to
        # wait for the server instead, the demo's first stage spent 13.5 s outside its body against 9.5 s cold
        # (the server imports every stage's libraries; reports/pipeline-timing.json, 2026-12-02)
        warm = WarmServer({**inherited_env(env), "PYTHONUNBUFFERED": "1"})
        try:
            for i, stage in enumerate(stages):
                t0 = time.perf_counter()
                status = dvc_status.with_options(task_run_name=f"status-{stage}")(stage)
                status_s += time.perf_counter() - t0
                if status or force:
                    stage_env = warm.offer(env)
                    if i < len(stages) - 1:
                        warm.start()  # imports while this stage runs (cold); later ones fork from it
                    walls[stage] = run_stage.with_options(task_run_name=stage)(stage, stage_env, force=force)
                    results[stage] = "ran"
                else:
                    skip_stage.with_options(task_run_name=stage)(stage, "up to date in dvc.lock")
                    results[stage] = "skipped (up to date)"
                tag_dvc_hash.with_options(task_run_name=f"lineage-{stage}")(stage, rec.run_id)
        finally:
            warm.close()
        rec.log_text("\n".join(f"{k}: {v}" for k, v in results.items()), "stages.txt")
        timing = overhead(time.perf_counter() - t_start, status_s, walls, rec.run_id)
        rec.log_step(0, {f"timing.{k}": v for k, v in timing.items() if isinstance(v, (int, float))})
        if walls:  # a fully skipped run keeps the breakdown of the last run that trained (bench reads it)
            atomic_write_json(TIMING, timing)
            rec.log_artifact(TIMING)
        if REPORT.is_file():
            rec.log_artifact(REPORT, "report")
            publish_summary("pipeline", REPORT.read_text())
        run_url = rec.run_url
    print("\npipeline: " + ", ".join(f"{k} {v}" for k, v in results.items()))
    share = timing["overhead_share"]
    print(f"  time:    {timing['total_seconds']:.0f} s, of which stage compute {timing['compute_seconds']:.0f} s"
          + (f" (orchestration, tracking and I/O: {100 * share:.1f}%; {TIMING})" if share is not None else ""))
    print(f"  report:  {REPORT} (and report.html beside it)")
    print(f"  metrics: dvc metrics show   |   MLflow: {run_url}")
    print(f"  Prefect: flow run {flow_run_id} (make ui, then http://127.0.0.1:4200)")
    return results


def nothing_to_do(start: str | None, stop: str | None) -> bool:
    """The CLI's check before anything starts: True (and says so) when every selected stage is up to date.

    A run with nothing stale then ends as `dvc repro` does, without starting Prefect's API or an MLflow run (a
    fully skipped pipeline run took 24 s, nearly all of it starting those to record that nothing ran). Checked
    under the repository lock, so a running pipeline's half-written dvc.lock is never read; when the lock is
    held, or anything is stale, or `--force`/`--set`/`--name` ask for a recorded run, the flow runs as usual
    (and a deployment run, which never comes through here, always records its Skipped stages)."""
    try:
        with repository_lock("pipeline (up-to-date check)"):
            if dvc_deps.sync():  # params changed which stages exist: not up to date
                return False
            stages = select(stage_order(), start, stop)
            if pipeline_status(stages):
                return False
    except UserError:  # the lock is held, or a bad --from/--to: the flow path says so in its own words
        return False
    print("pipeline: " + ", ".join(f"{s} skipped (up to date)" for s in stages))
    print("  nothing to run: every stage is up to date in dvc.lock (no Prefect flow run or MLflow run recorded; "
          "--name NAME records one)")
    return True


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Run the pipeline (DVC order, DVC skip logic) as a Prefect flow.")
    ap.add_argument("--from", dest="from_stage")
    ap.add_argument("--to", dest="to_stage")
    ap.add_argument("--set", action="append", default=[], metavar="STAGE.KEY=VALUE")
    ap.add_argument("--force", action="store_true", help="run the selected stages even if DVC says up to date")
    ap.add_argument("--name", default=None, help="flow-run name (default pipeline-<git sha>)")
    ap.add_argument("--wait", action="store_true", help="queue behind a pipeline run that holds this repository")
    args = ap.parse_args(argv)
    overrides: dict[str, dict] = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        stage, dot, rest = key.partition(".")
        if not sep or not dot:
            raise UserError(f"--set {item}: expected STAGE.KEY=VALUE, e.g. sft.method=ia3")
        overrides.setdefault(stage, {})[rest] = yaml.safe_load(value)
    if not (overrides or args.force or args.name) and nothing_to_do(args.from_stage, args.to_stage):
        return
    run_cli(pipeline_flow, from_stage=args.from_stage, to_stage=args.to_stage, overrides=overrides or None,
            force=args.force, name=args.name, wait=args.wait)


if __name__ == "__main__":
    leave_after(main, sys.argv[1:])  # without the interpreter's ~2 s teardown (refinery/ops/stage_cli.py)

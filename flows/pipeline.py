"""The whole pipeline as one Prefect flow, in DVC's order, executed by DVC.

Each stage is a Prefect task that runs `dvc repro --single-item <stage>`: DVC runs the stage's own flow
(`python -m flows.<stage>`) and records it in dvc.lock, so after a Prefect run `dvc status` is clean and
`dvc repro` does nothing. A stage DVC reports up to date is not run: its task ends in a `Skipped` state
with DVC's reason. The order comes from dvc.yaml (tasks/dag.py), never from a list here.

    python -m flows.pipeline                      # everything that changed
    python -m flows.pipeline --from sft --to ppo  # a slice
    python -m flows.pipeline --set sft.method=ia3 --set ppo.steps=20   # writes params/<stage>.yaml first
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import yaml
from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.states import Completed

from tasks.artifacts import publish_summary
from tasks.config import load_params
from tasks.dag import flow_name, locked_stage_hash, stage_order, stage_status
from tasks.errors import UserError, exit_on_user_error
from tasks.prefect_link import child_env, close_unfinished
from tasks.stage import refuse, run_cli, run_name
from tasks.tracking import StageRecord

REPORT = Path("reports/pipeline/report.md")


def select(order: list[str], start: str | None, stop: str | None) -> list[str]:
    for name in (start, stop):
        if name is not None and name not in order:
            raise UserError(f"unknown stage '{name}' (dvc.yaml has: {', '.join(order)})")
    i = order.index(start) if start else 0
    j = order.index(stop) + 1 if stop else len(order)
    if i >= j:
        raise UserError(f"--from {start} comes after --to {stop} in dvc.yaml")
    return order[i:j]


def apply_overrides(overrides: dict[str, dict], params_dir: str = "params") -> None:
    """{"sft": {"method": "ia3"}} -> params/sft.yaml (comments kept), validated before anything runs,
    the same edit `dvc exp run -S params/sft.yaml:method=ia3` makes."""
    from ruamel.yaml import YAML

    rt = YAML()
    for stage, values in (overrides or {}).items():
        path = Path(params_dir) / f"{stage}.yaml"
        if not path.is_file():
            raise UserError(f"{path}: no params file for stage '{stage}'")
        load_params(stage, params_dir, values)  # refuse bad values before writing
        data = rt.load(path.read_text())
        for dotted, value in values.items():
            node = data
            *parents, leaf = dotted.split(".")
            for key in parents:
                node = node.setdefault(key, {})
            node[leaf] = value
        with open(path, "w") as fh:
            rt.dump(data, fh)


@task(cache_policy=NO_CACHE, retries=2, retry_delay_seconds=5)  # reading DVC state is I/O: worth a retry
def dvc_status(stage: str) -> dict:
    return stage_status(stage)


@task(cache_policy=NO_CACHE, retries=0)  # a training failure is deterministic: no retry
def run_stage(stage: str, env: dict) -> str:
    env, linked = child_env(flow_name(stage), env)  # the stage's flow run shows as this task's subflow
    proc = subprocess.run(["dvc", "repro", "--single-item", stage], env=env)
    close_unfinished(linked, proc.returncode)
    if proc.returncode != 0:
        raise RuntimeError(f"stage '{stage}' failed (dvc repro exit code {proc.returncode}); its previous "
                           "output is untouched and a rerun resumes from its last checkpoint")
    return "ran"


@task(cache_policy=NO_CACHE, retries=2, retry_delay_seconds=5)
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


@task(cache_policy=NO_CACHE)
def skip_stage(stage: str, reason: str):
    return Completed(name="Skipped", message=f"{stage}: {reason}")


@flow(name="pipeline", flow_run_name="{name}")
def pipeline_flow(from_stage: str | None = None, to_stage: str | None = None, overrides: dict | None = None,
                  force: bool = False, name: str = "pipeline"):
    try:
        apply_overrides(overrides or {})
        stages = select(stage_order(), from_stage, to_stage)
        base = load_params("base")
    except UserError as exc:
        return refuse(exc)
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    flow_run_id = str(ctx.flow_run.id) if ctx else ""
    results: dict[str, str] = {}
    with StageRecord("pipeline", experiment=base.tracking.experiment,
                     params={"stages": ",".join(stages), "overrides": overrides or {}, "force": force},
                     run_name=name, on_unreachable=base.tracking.on_server_unreachable,
                     tags={"prefect_flow_run_id": flow_run_id}) as rec:
        env = {**os.environ, "REFINERY_PARENT_RUN_ID": rec.run_id, "REFINERY_PREFECT_FLOW_RUN_ID": flow_run_id}
        for stage in stages:
            status = dvc_status.with_options(task_run_name=f"status-{stage}")(stage)
            if status or force:
                run_stage.with_options(task_run_name=stage)(stage, env)
                results[stage] = "ran"
            else:
                skip_stage.with_options(task_run_name=stage)(stage, "up to date in dvc.lock")
                results[stage] = "skipped (up to date)"
            tag_dvc_hash.with_options(task_run_name=f"lineage-{stage}")(stage, rec.run_id)
        rec.log_text("\n".join(f"{k}: {v}" for k, v in results.items()), "stages.txt")
        if REPORT.is_file():
            rec.log_artifact(REPORT, "report")
            publish_summary("pipeline", REPORT.read_text())
        run_url = rec.run_url
    print("\npipeline: " + ", ".join(f"{k} {v}" for k, v in results.items()))
    print(f"  report:  {REPORT} (and report.html beside it)")
    print(f"  metrics: dvc metrics show   |   MLflow: {run_url}")
    print(f"  Prefect: flow run {flow_run_id} (make ui, then http://127.0.0.1:4200)")
    return results


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Run the pipeline (DVC order, DVC skip logic) as a Prefect flow.")
    ap.add_argument("--from", dest="from_stage")
    ap.add_argument("--to", dest="to_stage")
    ap.add_argument("--set", action="append", default=[], metavar="STAGE.KEY=VALUE")
    ap.add_argument("--force", action="store_true", help="run the selected stages even if DVC says up to date")
    ap.add_argument("--name", default=None, help="flow-run name (default pipeline-<git sha>)")
    args = ap.parse_args(argv)
    overrides: dict[str, dict] = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        stage, dot, rest = key.partition(".")
        if not sep or not dot:
            raise UserError(f"--set {item}: expected STAGE.KEY=VALUE, e.g. sft.method=ia3")
        overrides.setdefault(stage, {})[rest] = yaml.safe_load(value)
    run_cli(pipeline_flow, from_stage=args.from_stage, to_stage=args.to_stage, overrides=overrides or None,
            force=args.force, name=args.name or run_name("pipeline"))


if __name__ == "__main__":
    main(sys.argv[1:])

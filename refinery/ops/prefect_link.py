"""Stage flows run in child processes (DVC runs each stage's command; the method comparison runs one SFT per
method). So that the Prefect UI shows them as subflows of the flow that started them, the parent creates the
child's flow run, linked to its current task run, and passes the id down in REFINERY_STAGE_FLOW_RUN_ID; the
child then runs its flow *as* that flow run (prefect's `run_flow(flow, flow_run=...)`, as a worker does).

Without a task-run context (a stage run by hand, or by `dvc repro`) nothing is linked and the child
creates its own flow run as usual.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from uuid import UUID

ENV = "REFINERY_STAGE_FLOW_RUN_ID"
# env a child must not inherit: the worker's id of the *parent* run, and a link meant for us, not for it
_NOT_INHERITED = ("PREFECT__FLOW_RUN_ID", ENV)


def api_url() -> str | None:
    """The API this process talks to, so children land in the same place (and skip starting their own)."""
    from prefect.settings import get_current_settings

    url = get_current_settings().api.url
    if url:
        return str(url)
    try:  # the ephemeral server this process started (private API: on any change, children start their own)
        from prefect.server.api.server import SubprocessASGIServer

        running = [s for s in SubprocessASGIServer._instances.values() if s.running]
        return running[0].api_url if running else None
    except Exception:
        return None


def child_env(flow_name: str, base_env: dict[str, str] | None = None) -> tuple[dict[str, str], UUID | None]:
    """The environment for a child process whose flow run is a subflow of the current task run."""
    env = {k: v for k, v in (base_env if base_env is not None else os.environ).items() if k not in _NOT_INHERITED}
    if (url := api_url()) is not None:
        env["PREFECT_API_URL"] = url
    from prefect.context import TaskRunContext

    ctx = TaskRunContext.get()
    if ctx is None:
        return env, None
    from prefect import Flow
    from prefect.client.orchestration import get_client
    from prefect.states import Pending

    flow = Flow(fn=_placeholder, name=flow_name)
    with get_client(sync_client=True) as client:
        for attempt in range(60):
            try:
                run = client.create_flow_run(flow=flow, name=flow_name, parameters={}, state=Pending(),
                                             parent_task_run_id=ctx.task_run.id)
                break
            except Exception as exc:  # 409: the server has not stored our task run yet (task runs arrive as
                if "409" not in str(exc) or attempt == 59:  # events, e.g. from a Dask worker): wait for it
                    print(f"warning: the child flow run is not linked to this task ({exc})", file=sys.stderr)
                    return env, None
                time.sleep(0.5)
    env[ENV] = str(run.id)
    return env, run.id


def close_unfinished(flow_run_id: UUID | None, returncode: int) -> None:
    """A child that never started its flow (DVC found nothing to do) or was killed leaves its linked run
    Pending/Running: end it, so the UI does not show a run that will never finish."""
    if flow_run_id is None:
        return
    from prefect.client.orchestration import get_client
    from prefect.states import Cancelled, Crashed

    with get_client(sync_client=True) as client:
        run = client.read_flow_run(flow_run_id)
        if run.state is not None and run.state.is_final():
            return
        state = (Cancelled(message="the stage did not run: DVC found it up to date") if returncode == 0
                 else Crashed(message=f"the stage process exited with code {returncode} before its flow finished"))
        client.set_flow_run_state(flow_run_id, state, force=True)


def run_flow_as_linked(flow_fn, **kwargs):
    """Run `flow_fn` as the flow run our parent created for us, if any; returns the final state."""
    linked = os.environ.pop(ENV, None)
    if not linked:
        return flow_fn(return_state=True, **kwargs)
    from prefect.client.orchestration import get_client
    from prefect.flow_engine import run_flow

    try:
        with get_client(sync_client=True) as client:
            flow_run = client.read_flow_run(UUID(linked))
    except Exception as exc:  # the parent's API went away: still run, unlinked
        print(f"warning: cannot read the linked flow run {linked} ({exc}); running unlinked", file=sys.stderr)
        return flow_fn(return_state=True, **kwargs)
    return run_flow(flow_fn, flow_run=flow_run, parameters=kwargs, return_type="state")


def _placeholder():  # create_flow_run needs a Flow object only for its name
    return None


def run_child_flow(flow_name: str, cmd: list[str], env: dict[str, str], log_path) -> subprocess.CompletedProcess:
    """Run `cmd` (a stage's `python -m flows.<stage> ...`) as a subflow of the current task; its output goes
    to `log_path` (kept beside its results, so a failed child can be read after the fact)."""
    from pathlib import Path

    env, linked = child_env(flow_name, env)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    close_unfinished(linked, proc.returncode)
    Path(log_path).parent.mkdir(parents=True, exist_ok=True)
    Path(log_path).write_text(proc.stdout + proc.stderr)
    return proc


def fan_out_runner(kind: str, workers: int):
    """The Prefect task runner that fans out child runs: `thread` (default, in process) or `dask` (prefect-dask,
    a local Dask cluster; point DASK_SCHEDULER_ADDRESS at a running scheduler to use a real cluster)."""
    if kind == "thread":
        from prefect.task_runners import ThreadPoolTaskRunner

        return ThreadPoolTaskRunner(max_workers=workers)
    if kind == "dask":
        try:
            from prefect_dask import DaskTaskRunner
        except ImportError:
            from refinery.errors import UserError

            raise UserError("task_runner 'dask' needs prefect-dask (pip install prefect-dask)") from None
        if address := os.environ.get("DASK_SCHEDULER_ADDRESS"):
            return DaskTaskRunner(address=address)
        return DaskTaskRunner(cluster_kwargs={"n_workers": workers, "threads_per_worker": 1, "processes": True,
                                              "dashboard_address": None})
    from refinery.errors import UserError

    raise UserError(f"unknown task runner '{kind}' (thread | dask)")

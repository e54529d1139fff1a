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
    env = inherited_env(base_env)
    from prefect.context import TaskRunContext

    ctx = TaskRunContext.get()
    if ctx is None:
        return env, None
    run_id = create_linked_run(flow_name, ctx.task_run.id)
    if run_id is not None:
        env[ENV] = str(run_id)
    return env, run_id


def inherited_env(base_env: dict[str, str] | None = None) -> dict[str, str]:
    """`base_env` (ours by default) less what a child must not inherit, pointed at our Prefect API."""
    env = {k: v for k, v in (base_env if base_env is not None else os.environ).items() if k not in _NOT_INHERITED}
    if (url := api_url()) is not None:
        env["PREFECT_API_URL"] = url
    return env


def create_linked_run(flow_name: str, task_run_id: UUID) -> UUID | None:
    """A Pending flow run named `flow_name` whose parent is the task run `task_run_id`; None when it cannot be."""
    from prefect import Flow
    from prefect.client.orchestration import get_client
    from prefect.states import Pending

    flow = Flow(fn=_placeholder, name=flow_name)
    with get_client(sync_client=True) as client:
        for attempt in range(300):
            try:
                return client.create_flow_run(flow=flow, name=flow_name, parameters={}, state=Pending(),
                                              parent_task_run_id=task_run_id).id
            except Exception as exc:  # 409: the server has not stored our task run yet (task runs arrive as
                if "409" not in str(exc) or attempt == 299:  # events, stored within a second or two): wait for it
                    print(f"warning: the child flow run is not linked to this task ({exc})", file=sys.stderr)
                    return None
                time.sleep(0.1)
    return None


class DeferredLink:
    """`child_env`, without waiting for the linked flow run: the child's environment names a file instead of a
    run id, and the run is created in a thread while the child starts (DVC's own start and checks, the stage
    process's). Measured: creating the run waits 0.1-1.9 s for the server to store the task run that started the
    child (Prefect 3 records task runs from events), once per stage on the pipeline's critical path before.
    The child reads the file when it runs its flow (`run_flow_as_linked`, waiting for it if need be).

        link = DeferredLink(flow_name(stage), env)
        run(cmd, env=link.env)
        close_unfinished(link.run_id(), returncode)
    """

    def __init__(self, flow_name: str, base_env: dict[str, str] | None = None):
        import tempfile
        import threading
        from pathlib import Path

        from prefect.context import TaskRunContext

        self.env = inherited_env(base_env)
        self._run_id: UUID | None = None
        self._thread = None
        ctx = TaskRunContext.get()
        if ctx is None:
            return
        # a private folder: the child waits for the file to appear complete (written beside it, then renamed)
        self._file = Path(tempfile.mkdtemp(prefix="refinery-link-")) / "flow-run-id"
        self.env[ENV] = FILE_PREFIX + str(self._file)
        self._thread = threading.Thread(target=self._create, args=(flow_name, ctx.task_run.id), daemon=True)
        self._thread.start()

    def _create(self, flow_name: str, task_run_id: UUID) -> None:
        try:
            self._run_id = create_linked_run(flow_name, task_run_id)
        finally:
            tmp = self._file.with_name(self._file.name + ".tmp")
            tmp.write_text(str(self._run_id or ""))
            tmp.replace(self._file)

    def run_id(self) -> UUID | None:
        """The linked run, once created (waits for the thread); the hand-over file is removed."""
        if self._thread is not None:
            self._thread.join()
            self._file.unlink(missing_ok=True)
            self._file.parent.rmdir()
            self._thread = None
        return self._run_id


FILE_PREFIX = "file:"  # ENV's value when the run id is handed over in a file (DeferredLink)


def linked_run_id(value: str, timeout: float = 120.0) -> str | None:
    """The flow run id ENV names: the id itself, or (DeferredLink) the content of the file it names, waited for;
    None when the parent could not create the run or the file never came."""
    if not value.startswith(FILE_PREFIX):
        return value
    from pathlib import Path

    path, end = Path(value[len(FILE_PREFIX):]), time.monotonic() + timeout
    while not path.is_file():
        if time.monotonic() > end:
            print(f"warning: no linked flow run arrived in {path} within {timeout:.0f} s; running unlinked",
                  file=sys.stderr)
            return None
        time.sleep(0.02)
    return path.read_text().strip() or None


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
    if linked:
        linked = linked_run_id(linked)
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

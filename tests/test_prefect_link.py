"""The stage flow run a pipeline task hands its child (refinery/ops/prefect_link.py): created while the child
starts (DeferredLink), found by the child through the file its environment names, linked to the task run."""
import os
import subprocess
import sys

from refinery.ops.prefect_link import ENV, DeferredLink, linked_run_id


def test_a_deferred_link_reaches_the_child_and_is_the_tasks_subflow(prefect_server, tmp_path):
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.context import TaskRunContext

    from refinery.ops.prefect_tasks import uncached_task

    @uncached_task
    def start_child() -> tuple[str, str | None, str, str]:
        link = DeferredLink("child-stage", {"KEEP": "1", "PREFECT__FLOW_RUN_ID": "parent's"})
        assert link.env["KEEP"] == "1" and "PREFECT__FLOW_RUN_ID" not in link.env  # not the parent's run
        # the child, as run_flow_as_linked reads it: its own process, waiting for the file if need be
        seen = subprocess.run([sys.executable, "-c", "import os; from refinery.ops.prefect_link import ENV, "
                               "linked_run_id; print(linked_run_id(os.environ[ENV]))"],
                              env={**os.environ, ENV: link.env[ENV]}, capture_output=True, text=True, check=True)
        folder = link.env[ENV].removeprefix("file:").rsplit("/", 1)[0]
        run_id = link.run_id()
        assert not os.path.exists(folder)  # the hand-over file's folder is gone once the parent has the id
        return seen.stdout.strip(), str(run_id), str(TaskRunContext.get().task_run.id), link.env[ENV]

    @flow
    def parent():
        return start_child()

    child_saw, run_id, task_run_id, value = parent()
    assert value.startswith("file:") and child_saw == run_id != "None"
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(run_id)
    assert run.name == "child-stage" and str(run.parent_task_run_id) == task_run_id


def test_outside_a_task_nothing_is_linked_and_a_missing_hand_over_is_no_link(tmp_path):
    link = DeferredLink("child-stage", {"A": "b"})
    assert ENV not in link.env and link.run_id() is None
    assert linked_run_id("0b5f-plain-id") == "0b5f-plain-id"  # a run id handed over directly (child_env)
    assert linked_run_id(f"file:{tmp_path / 'never'}", timeout=0.1) is None
    (tmp_path / "empty").write_text("")  # the parent could not create the run
    assert linked_run_id(f"file:{tmp_path / 'empty'}") is None

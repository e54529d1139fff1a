"""A stage's printed lines reach the Prefect run log of the run that started it, and the console once."""
from __future__ import annotations

import sys

from prefect import flow, get_client
from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
from prefect.context import FlowRunContext

from refinery.ops.prefect_log import run_logged


@flow
def runs_a_stage() -> tuple[str, int]:
    code = run_logged([sys.executable, "-c", "print('dapt: loss 3.2 -> 2.9'); print(); print('dapt: done')"],
                      {}, "dapt")
    return str(FlowRunContext.get().flow_run.id), code


def test_stage_lines_go_to_the_run_log_and_the_console_once(prefect_server, capfd):
    run_id, code = runs_a_stage()
    assert code == 0
    printed = capfd.readouterr().out
    assert printed.count("dapt: loss 3.2 -> 2.9") == 1 and printed.count("dapt: done") == 1
    with get_client(sync_client=True) as client:
        logs = [entry.message for entry in client.read_logs(
            log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])), limit=200)]
    assert logs.count("dapt: loss 3.2 -> 2.9") == 1 and logs.count("dapt: done") == 1
    assert "" not in logs  # blank lines are not logged


def test_a_failing_stage_returns_its_exit_code(prefect_server):
    @flow
    def fails() -> int:
        return run_logged([sys.executable, "-c", "import sys; print('x'); sys.exit(3)"], {}, "sft")

    assert fails() == 3

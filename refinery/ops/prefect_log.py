"""A stage process's output lines in the Prefect run log of the pipeline run that started it.

The pipeline runs each stage as `dvc repro` in a child process, so what the stage prints never passes through
the pipeline's Prefect logger, and the pipeline's flow-run page said "This run didn't generate logs". Here
each line the child writes to stdout is echoed to the console as before and also sent to the Prefect API as
an INFO log of the current flow/task run, through Prefect's own `APILogHandler` on a logger that does not
propagate: Prefect's console handler never sees these records, so nothing is printed twice, and
PREFECT_LOGGING_LEVEL (WARNING in the Makefile, which keeps Prefect's own chatter off the console) does not
filter them. stderr (progress bars, warnings) stays on the console: bars redraw with carriage returns, which
a log would keep as hundreds of partial lines; the stages publish their progress as Prefect progress
artifacts instead (refinery/ops/prefect_artifacts.py)."""
from __future__ import annotations

import logging
import subprocess
import sys

LOGGER_NAME = "refinery.stage_output"


def stage_logger() -> logging.Logger:
    """The API-only logger (created once per process)."""
    from prefect.logging.handlers import APILogHandler

    logger = logging.getLogger(LOGGER_NAME)
    if not any(isinstance(h, APILogHandler) for h in logger.handlers):
        logger.addHandler(APILogHandler())
        logger.setLevel(logging.INFO)
        logger.propagate = False  # Prefect's console handler sits above: the console copy is ours
    return logger


def run_logged(cmd: list[str], env: dict, stage: str) -> int:
    """Run `cmd`, echo its stdout to ours line by line and into the Prefect run log; the exit code."""
    logger = stage_logger()
    proc = subprocess.Popen(cmd, env={**env, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE, text=True,
                            bufsize=1, errors="replace")
    assert proc.stdout is not None
    for line in proc.stdout:
        sys.stdout.write(line)
        sys.stdout.flush()
        if text := line.rstrip():
            logger.info(text, extra={"stage": stage})
    code = proc.wait()
    for handler in logger.handlers:
        handler.flush()  # the API log worker sends in batches: send this stage's lines before the next starts
    return code

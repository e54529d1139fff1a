"""One pipeline run per repository at a time: an exclusive `flock` on .dvc/tmp/refinery-pipeline.lock, held for
the whole run and released by the kernel however the run ends (kill -9 included), so a stale lock never blocks.

Without it, a run started while another runs fails ~30 s later inside DVC with a Prefect traceback ending in
DVC's LockError. With it, the second run either fails at once in one line naming the run that holds the
repository, or (`--wait`, and the deployments' `concurrency_limit` with ENQUEUE in prefect.yaml) waits for it.
"""
from __future__ import annotations

import fcntl
import json
import os
import time
from contextlib import contextmanager
from pathlib import Path

from refinery.errors import UserError

LOCK = Path(".dvc/tmp/refinery-pipeline.lock")


def holder(path: Path = LOCK) -> dict:
    try:
        return json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}


@contextmanager
def repository_lock(run: str, wait: bool = False, path: Path = LOCK):
    """Hold the repository for `run` (a name people can find in the Prefect UI and MLflow)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            h = holder(path)
            raise UserError(f"another pipeline run holds this repository: {h.get('run', '?')} (pid {h.get('pid', '?')}, "
                            f"started {h.get('started', '?')}); wait for it to end, or rerun with --wait to queue "
                            "behind it") from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"run": run, "pid": os.getpid(),
                                 "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}).encode())
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the flock

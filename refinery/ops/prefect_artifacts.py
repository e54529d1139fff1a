"""What the Prefect UI shows for a stage: a markdown summary, a metrics table, a live progress bar.

Artifacts need a flow run; outside one (a unit test calling the logic directly) these do nothing.
Keys are lowercase letters, digits and dashes (Prefect's rule).
"""
from __future__ import annotations

import logging
import time

log = logging.getLogger("refinery.artifacts")


def _in_flow_run() -> bool:
    from prefect.context import FlowRunContext

    return FlowRunContext.get() is not None


def _safe(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except Exception as exc:  # a UI artifact is never worth a failed stage
        log.warning("Prefect artifact not written: %s", exc)
        return None


class Progress:
    """A Prefect progress artifact updated at most every `every_s` seconds (plus the last step)."""

    def __init__(self, stage: str, every_s: float = 5.0):
        self.key, self.every_s, self._last, self._id = f"{stage}-progress", every_s, 0.0, None
        if _in_flow_run():
            from prefect.artifacts import create_progress_artifact

            self._id = _safe(create_progress_artifact, progress=0.0, key=self.key,
                             description=f"{stage}: training steps done (%)")

    def __call__(self, step: int, total: int) -> None:
        now = time.monotonic()
        if self._id is None or (now - self._last < self.every_s and step < total):
            return
        from prefect.artifacts import update_progress_artifact

        self._last = now
        _safe(update_progress_artifact, artifact_id=self._id, progress=100.0 * step / max(total, 1))


def publish_summary(stage: str, markdown: str, table: list[dict] | None = None) -> None:
    if not _in_flow_run():
        return
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    _safe(create_markdown_artifact, markdown=markdown, key=f"{stage}-summary", description=f"{stage} summary")
    if table:
        _safe(create_table_artifact, table=table, key=f"{stage}-metrics", description=f"{stage} metrics")


def metrics_table(metrics: dict, prefix: str = "") -> list[dict]:
    from refinery.ops.tracking import flatten

    return [{"metric": k, "value": v} for k, v in flatten(metrics, prefix).items()
            if isinstance(v, (int, float, str)) and not isinstance(v, bool)]

"""One record per stage run: an MLflow run, `metrics/<stage>.json` (the headline numbers),
`reports/<stage>/evaluation.json` (the whole evaluation) and `plots/<stage>/`, written from the same numbers
by the same code, so the views agree. What each stage must record: refinery/ops/metrics_contract.py.

MLflow is logged explicitly (transformers 5 defaults `report_to` to none, and MLflow's autolog is not
tested on transformers 5). With no MLFLOW_TRACKING_URI, the store is `sqlite:///mlflow.db` in the
project. If the server goes away mid-run, metric calls are buffered and retried at the end; training
never dies for a tracking error.
"""
from __future__ import annotations

import csv
import logging
import os
import re
import time
from pathlib import Path
from typing import Any

from refinery.atomic import atomic_write_json
from refinery.errors import UserError
from refinery.ops import metrics_contract
from refinery.ops.health import server_answers

log = logging.getLogger("refinery.tracking")
SECRET_KEY = re.compile(r"token|password|passwd|secret|api[_-]?key|credential", re.I)
URI_CREDENTIALS = re.compile(r"(\w+://)([^/@:\s]+):([^/@\s]+)@")


def redact(key: str, value: Any) -> Any:
    if SECRET_KEY.search(key):
        return "***"
    if isinstance(value, str):
        return URI_CREDENTIALS.sub(r"\1\2:***@", value)
    return value


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def tracking_uri(root: Path) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(root / 'mlflow.db').resolve()}"


def configure_mlflow(root: Path, on_unreachable: str) -> str:
    """Point MLflow at the configured store; an unreachable server fails fast (or falls back, if asked)."""
    import mlflow

    uri = tracking_uri(root)
    if uri.startswith(("http://", "https://")) and not server_answers(uri):
        shown = URI_CREDENTIALS.sub(r"\1\2:***@", uri)
        if on_unreachable == "error":
            raise UserError(f"MLflow tracking server {shown} is unreachable (set tracking.on_server_unreachable: "
                            "local in params/base.yaml to fall back to the local store)")
        uri = f"sqlite:///{(root / 'mlflow.db').resolve()}"
        log.warning("MLflow server %s unreachable: recording to the local store %s instead", shown, uri)
    mlflow.set_tracking_uri(uri)
    return uri


def lineage_tags() -> dict[str, str]:
    """Cross-links: git commit, the Prefect flow run (id and UI URL), the pipeline's flow run."""
    from refinery.modeling.manifest import git_commit

    # "warm": the stage process was forked from the pipeline's warm server (refinery/ops/warm_start.py)
    tags = {"git_commit": git_commit() or "none", "process_start": os.environ.get("REFINERY_PROCESS_START", "cold")}
    try:
        from prefect.context import FlowRunContext
        from prefect.settings import get_current_settings

        ctx = FlowRunContext.get()
        if ctx is not None:
            tags["prefect_flow_run_id"] = str(ctx.flow_run.id)
            ui = get_current_settings().ui_url
            if ui:
                tags["prefect_flow_run_url"] = f"{str(ui).rstrip('/')}/runs/flow-run/{ctx.flow_run.id}"
    except Exception:
        pass
    if os.environ.get("REFINERY_PREFECT_FLOW_RUN_ID"):
        tags["prefect_pipeline_flow_run_id"] = os.environ["REFINERY_PREFECT_FLOW_RUN_ID"]
    return tags


# The tag MLflow 3's UI reads to open an experiment in its "Model training" view instead of the GenAI one
# (values in its JS bundle: custom_model_development | genai_development | finetuning).
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"


def flow_body_elapsed() -> float:
    """Seconds since the current Prefect flow run's function began (its run context's start), 0 outside one."""
    from datetime import datetime, timezone

    try:
        from prefect.context import FlowRunContext

        start = getattr(FlowRunContext.get(), "start_time", None)
        return max(0.0, (datetime.now(timezone.utc) - start).total_seconds()) if start is not None else 0.0
    except Exception:  # timing is a report, never a reason to fail a stage
        return 0.0


class StageRecord:
    """Context manager around one stage's MLflow run (nested under REFINERY_PARENT_RUN_ID when set)."""

    def __init__(self, stage: str, *, experiment: str, params: dict, run_name: str, root: Path = Path("."),
                 on_unreachable: str = "error", tags: dict[str, str] | None = None):
        self.stage, self.experiment, self.run_name, self.root = stage, experiment, run_name, Path(root)
        self.params = {k: redact(k, v) for k, v in flatten(params).items()}
        self.on_unreachable = on_unreachable
        self.tags = tags or {}
        self.run_id: str | None = None
        self.uri: str | None = None
        self._pending: list[tuple[str, tuple, dict]] = []
        self._t_enter = 0.0
        self.mlflow_seconds = 0.0  # time spent in MLflow calls: the tracking share of the pipeline's overhead

    # -- lifecycle --------------------------------------------------------------------------------
    def __enter__(self) -> "StageRecord":
        import mlflow

        t0 = time.perf_counter()
        # the body is the flow's whole work: what it did before opening this record (reading and checking its
        # inputs, loading models, base_model's ~20 s GGUF import) is the stage's compute, not orchestration
        self._t_enter = t0 - flow_body_elapsed()
        self.uri = configure_mlflow(Path("."), self.on_unreachable)  # one store per project, wherever files go
        experiment = mlflow.set_experiment(self.experiment)
        if experiment.tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:  # MLflow 3's UI: the model-training view
            mlflow.MlflowClient().set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        parent = os.environ.get("REFINERY_PARENT_RUN_ID") or None
        run = mlflow.start_run(run_name=self.run_name, parent_run_id=parent, log_system_metrics=True,
                               tags={"stage": self.stage, **lineage_tags(), **self.tags})
        self.run_id = run.info.run_id
        for chunk in _chunks(list(self.params.items()), 90):
            mlflow.log_params({k: str(v)[:6000] for k, v in chunk})
        self.mlflow_seconds += time.perf_counter() - t0
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        import mlflow

        t0 = time.perf_counter()
        # the stage's body (compute + tracking) against its process's whole life: the pipeline derives the
        # orchestration overhead (process start, imports, Prefect, DVC) from these
        self._call("log_metrics", {"timing.body_seconds": t0 - self._t_enter,
                                   "timing.mlflow_seconds": self.mlflow_seconds})
        self._flush()  # while the run is still active: a retried call must not open a new run
        try:
            mlflow.end_run(status="FAILED" if exc_type else "FINISHED")
        except Exception as err:  # the server went away: everything is on disk already, the stage succeeded
            log.warning("MLflow run %s could not be closed (%s); it stays RUNNING on the server", self.run_id, err)

    # -- logging that survives a flaky server ------------------------------------------------------
    def _call(self, name: str, *args, **kwargs) -> None:
        import mlflow

        t0 = time.perf_counter()
        try:
            getattr(mlflow, name)(*args, **kwargs)
        except Exception as exc:  # tracking must never kill training
            if not self._pending:
                log.warning("MLflow %s failed (%s); buffering and retrying at the end of the stage", name, exc)
            self._pending.append((name, args, kwargs))
        finally:
            self.mlflow_seconds += time.perf_counter() - t0

    def _flush(self) -> None:
        pending, self._pending = self._pending, []
        for name, args, kwargs in pending:
            self._call(name, *args, **kwargs)
        if self._pending:
            dump = self.root / "metrics" / f"{self.stage}.mlflow-unsent.json"
            atomic_write_json(dump, [{"call": n, "args": a, "kwargs": k} for n, a, k in self._pending])
            log.warning("MLflow unreachable: %d calls written to %s", len(self._pending), dump)

    def log_step(self, step: int, metrics: dict[str, float]) -> None:
        clean = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
        self._call("log_metrics", clean, step=step)

    def log_dataset(self, jsonl: Path, name: str, context: str) -> None:
        """A prepared data set as an MLflow dataset input (its digest is MLflow's content hash), tagged with
        DVC's md5 of the output holding it when dvc.lock has one (a stage's inputs: the data it trained on)."""
        import warnings

        import mlflow
        import pandas as pd

        from refinery.ops.dag import locked_out_hash

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = mlflow.data.from_pandas(pd.read_json(jsonl, lines=True), source=str(jsonl), name=name)
        dvc_md5 = locked_out_hash(jsonl) if context != "prepare" else None  # prepare's own lock entry is stale now
        self._call("log_input", ds, context=context, tags={"dvc_md5": dvc_md5} if dvc_md5 else None)

    def set_tags(self, tags: dict[str, str]) -> None:
        self._call("set_tags", tags)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self._call("log_artifact", str(path), artifact_path=artifact_path)

    def log_table(self, rows: list[dict], artifact_file: str) -> None:
        if rows:
            cols = {k: [r.get(k) for r in rows] for k in rows[0]}
            self._call("log_table", data=cols, artifact_file=artifact_file)

    def log_text(self, text: str, artifact_file: str) -> None:
        self._call("log_text", text, artifact_file)

    # -- the DVC side: metrics json and plots csv ---------------------------------------------------
    def write_metrics(self, metrics: dict) -> Path:
        """The stage's whole evaluation, checked against its contract (refinery/ops/metrics_contract.py; a
        broken contract raises MetricsContractError before anything is written), then recorded three ways:
        the headline keys to metrics/<stage>.json (DVC metrics), the whole dict to
        reports/<stage>/evaluation.json, every number to the MLflow run. Returns the metrics/<stage>.json path."""
        metrics_contract.validate(self.stage, metrics)
        full = metrics_contract.evaluation_path(self.stage, self.root)
        atomic_write_json(full, metrics)
        path = metrics_contract.metrics_path(self.stage, self.root)
        atomic_write_json(path, metrics_contract.headline(self.stage, metrics))
        numeric = {k: float(v) for k, v in flatten(metrics).items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)}
        self._call("log_metrics", numeric)
        self.log_artifact(path)
        self.log_artifact(full)
        return path

    def write_plot(self, rows: list[dict], name: str, x: str = "step", ys: tuple[str, ...] = ("loss",)) -> Path:
        """`plots/<stage>/<name>.csv` for DVC, and a PNG of the same rows for people and MLflow."""
        folder = self.root / "plots" / self.stage
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{name}.csv"
        cols = sorted({k for r in rows for k in r}, key=lambda k: (k != x, k))
        with open(path, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=cols)
            w.writeheader()
            w.writerows(rows)
        png = _plot_png(rows, folder / f"{name}.png", x, ys, title=f"{self.stage}: {name}")
        self.log_artifact(path, "plots")
        if png:
            self.log_artifact(png, "plots")
        return path

    @property
    def run_url(self) -> str:
        uri = self.uri or ""
        if uri.startswith("http"):
            base = URI_CREDENTIALS.sub(r"\1", uri).rstrip("/")
            return f"{base}/#/runs/{self.run_id}"
        return f"run {self.run_id} in {uri} (open with `make ui`, then http://127.0.0.1:5000)"


def _plot_png(rows: list[dict], path: Path, x: str, ys: tuple[str, ...], title: str) -> Path | None:
    series = [y for y in ys if any(r.get(y) not in (None, "") for r in rows)]
    if not rows or not series:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(series), figsize=(4.5 * len(series), 3.2), squeeze=False)
    for ax, y in zip(axes[0], series):
        pts = [(r[x], r[y]) for r in rows if r.get(y) not in (None, "")]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="." if len(pts) < 50 else None)
        ax.set_xlabel(x)
        ax.set_ylabel(y)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _chunks(items: list, n: int):
    for i in range(0, len(items), n):
        yield items[i:i + n]

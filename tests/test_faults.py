"""Servers that fail: an unreachable MLflow server stops a stage before training (or falls back when asked),
an unreachable Prefect API does not stop a CLI stage, and no secret reaches MLflow params."""
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

from refinery.errors import UserError
from refinery.ops.tracking import StageRecord, configure_mlflow, redact

DEAD = "http://127.0.0.1:9"  # discard port: nothing listens


def test_unreachable_mlflow_is_an_error_before_training(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", DEAD)
    with pytest.raises(UserError, match="unreachable"):
        configure_mlflow(tmp_path, "error")


def test_unreachable_mlflow_can_fall_back_to_local(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", DEAD)
    monkeypatch.chdir(tmp_path)
    uri = configure_mlflow(tmp_path, "local")
    assert uri.startswith("sqlite:///") and uri.endswith("mlflow.db")


def test_mlflow_failure_mid_run_is_buffered_not_fatal(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    with StageRecord("t", experiment="faults", params={}, run_name="t") as rec:
        real = mlflow.log_metrics
        monkeypatch.setattr(mlflow, "log_metrics", lambda *a, **k: (_ for _ in ()).throw(ConnectionError("down")))
        rec.log_step(1, {"loss": 1.0})  # server "down": buffered
        monkeypatch.setattr(mlflow, "log_metrics", real)  # back up before the end of the stage
        run_id = rec.run_id
    assert mlflow.get_run(run_id).data.metrics["loss"] == 1.0  # flushed at the end


def test_secrets_never_reach_mlflow_params(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("HF_TOKEN", "hf_supersecret123")
    params = {"hub_token": "hf_supersecret123", "store": "https://user:s3cret@host/x", "lr": 0.1}
    with StageRecord("t", experiment="faults", params=params, run_name="t") as rec:
        run_id = rec.run_id
    logged = mlflow.get_run(run_id).data.params
    assert logged["hub_token"] == "***" and "s3cret" not in logged["store"] and logged["lr"] == "0.1"
    assert not any("supersecret" in v for v in logged.values())
    assert redact("api_key", "x") == "***" and redact("name", "plain") == "plain"


def test_stage_runs_with_an_unreachable_prefect_api(project):
    env = {**os.environ, "PREFECT_API_URL": f"{DEAD}/api", "MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow.db'}",
           "PYTHONPATH": str(Path(__file__).parents[1])}
    proc = subprocess.run([sys.executable, "-m", "flows.base_model"], cwd=project, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Prefect API" in proc.stderr and "unreachable" in proc.stderr
    assert (project / "models" / "base" / "model.safetensors").is_file()

"""Servers that fail, through the real stage CLI (`python -m flows.dapt` in a scratch project on the tiny model):

* an MLflow server that does not answer stops the stage before anything trains (exit 2, one line), or, with
  `tracking.on_server_unreachable: local`, the stage runs and is recorded in the project's local store;
* a real `mlflow server` killed while the stage trains: the stage still finishes with complete metrics, and the
  MLflow calls it could not send are in metrics/<stage>.mlflow-unsent.json (refinery/ops/tracking.py), so no
  step's loss is lost between the server and that file;
* an unreachable Prefect API does not stop a CLI stage, and no secret reaches MLflow params.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import yaml

from refinery.ops.tracking import StageRecord, redact
from tests.conftest import answers, free_port, write_tiny_params

REPO = Path(__file__).resolve().parents[1]
# For the server killed mid-stage: without these the MLflow client retries a refused connection 7 times with
# backoff (~4 minutes per call, dozens of calls per stage); a user whose tracking server can disappear sets the
# same two MLflow settings.
FAST_FAIL = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}




@pytest.fixture(scope="module")
def api_env(prefect_server):
    """The test Prefect server's URL, so each CLI subprocess uses it instead of starting its own."""
    from prefect.settings import get_current_settings

    return {"PREFECT_API_URL": str(get_current_settings().api.url)}


@pytest.fixture
def dapt_project(project, prepared, api_env):
    """A scratch project ready for `python -m flows.dapt`, and the env for it (tracking URI left to the test)."""
    shutil.copytree(prepared, project / "data" / "prepared")
    env = {**os.environ, **api_env, "PYTHONPATH": str(REPO)}
    return project, env


def set_on_unreachable(root: Path, value: str) -> None:
    path = root / "params" / "base.yaml"
    data = yaml.safe_load(path.read_text())
    data["tracking"]["on_server_unreachable"] = value
    path.write_text(yaml.safe_dump(data, sort_keys=False))


def dapt(root: Path, env: dict, *sets: str, timeout: int = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "flows.dapt"] + [a for s in sets for a in ("--set", s)]
    return subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)


def nothing_trained(root: Path) -> list[str]:
    """What a stage that trained would have left behind."""
    written = [root / "models" / "dapt", root / "metrics" / "dapt.json", root / "plots" / "dapt",
               root / "reports" / "dapt"]
    found = [str(p.relative_to(root)) for p in written if p.exists()]
    found += [str(p.relative_to(root)) for p in (root / "checkpoints").rglob("checkpoint-*")]
    return found


def local_runs(root: Path, stage: str):
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    exp = client.get_experiment_by_name("llm-refinery")
    assert exp is not None, "no experiment in the local store"
    assert exp.tags.get("mlflow.experimentKind") == "custom_model_development"  # MLflow 3 UI: model-training view
    return client, client.search_runs([exp.experiment_id], filter_string=f"tags.stage = '{stage}'")


def scratch_project(root: Path, tiny_base: Path, prepared: Path) -> Path:
    """What conftest's `project` fixture builds, plus data/prepared: ready for `python -m flows.dapt`."""
    write_tiny_params(root / "params")
    shutil.copytree(REPO / "data" / "demo", root / "data" / "demo", ignore=shutil.ignore_patterns("*.py", "*.md"))
    shutil.copytree(tiny_base, root / "models" / "base")
    shutil.copytree(prepared, root / "data" / "prepared")
    return root


@pytest.fixture(scope="module")
def refused(tmp_path_factory, tiny_base, prepared, api_env):
    """`python -m flows.dapt` with the default `on_server_unreachable: error` and an MLflow server that does
    not answer, run once for the tests below."""
    root = scratch_project(tmp_path_factory.mktemp("refused"), tiny_base, prepared)
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    env = {**os.environ, **api_env, "PYTHONPATH": str(REPO), "MLFLOW_TRACKING_URI": dead}
    return root, dead, dapt(root, env)


def test_unreachable_mlflow_stops_the_stage_before_training(refused):
    root, dead, proc = refused
    assert proc.returncode != 0
    assert f"MLflow tracking server {dead} is unreachable" in proc.stderr, proc.stderr[-3000:]
    assert nothing_trained(root) == []
    assert not (root / "mlflow.db").exists()  # it did not quietly record somewhere else either


def test_unreachable_mlflow_is_one_line_and_exit_2(refused):
    root, dead, proc = refused
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr[-3000:]
    assert len(errors) == 1 and dead in errors[0] and "unreachable" in errors[0], proc.stderr[-3000:]
    assert proc.returncode == 2


@pytest.mark.slow
def test_unreachable_mlflow_falls_back_to_the_local_store_when_asked(dapt_project):
    root, env = dapt_project
    set_on_unreachable(root, "local")
    dead = f"http://127.0.0.1:{free_port()}"
    proc = dapt(root, {**env, "MLFLOW_TRACKING_URI": dead})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "unreachable" in proc.stderr and "local store" in proc.stderr  # it says so
    metrics = json.loads((root / "metrics" / "dapt.json").read_text())
    client, runs = local_runs(root, "dapt")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    logged = runs[0].data.metrics
    assert logged["after.eval_loss"] == pytest.approx(metrics["after"]["eval_loss"])
    assert len(client.get_metric_history(runs[0].info.run_id, "loss")) == metrics["train"]["steps"]


@pytest.fixture(scope="module")
def server_killed(tmp_path_factory, tiny_base, prepared, api_env):
    """A real `mlflow server` (own process group, sqlite store), `python -m flows.dapt` recording to it, and the
    server SIGKILLed once the stage has written its first checkpoint: the stage's result, run once."""
    root = scratch_project(tmp_path_factory.mktemp("killed"), tiny_base, prepared)
    home = root / "mlflow-server"
    home.mkdir()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with open(home / "server.log", "w") as log:
        server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port",
                                   str(port), "--workers", "1", "--backend-store-uri", f"sqlite:///{home / 'server.db'}",
                                   "--artifacts-destination", str(home / "artifacts")],
                                  cwd=home, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    stage = None
    try:
        end = time.monotonic() + 120
        while not answers(f"{url}/health"):
            assert server.poll() is None, (home / "server.log").read_text()[-3000:]
            assert time.monotonic() < end, "mlflow server did not start in 120 s"
            time.sleep(0.5)
        env = {**os.environ, **api_env, **FAST_FAIL, "PYTHONPATH": str(REPO), "MLFLOW_TRACKING_URI": url}
        cmd = [sys.executable, "-m", "flows.dapt", "--set", f"training.max_steps={KILLED_STEPS}",
               "--set", "training.save_steps=2"]
        with open(root / "stage.out", "w") as out, open(root / "stage.err", "w") as errf:  # no pipe to fill
            stage = subprocess.Popen(cmd, cwd=root, env=env, stdout=out, stderr=errf)
        end = time.monotonic() + 300
        while not list((root / "checkpoints").glob("dapt/*/checkpoint-2/trainer_state.json")):
            assert stage.poll() is None, (root / "stage.err").read_text()[-3000:]
            assert time.monotonic() < end, "no first checkpoint in 300 s"
            time.sleep(0.05)
        assert stage.poll() is None, "the stage finished before the server was killed"
        os.killpg(server.pid, signal.SIGKILL)  # the server and its workers
        server.wait(30)
        assert not answers(f"{url}/health")
        stage.wait(600)
    finally:
        for proc, kill in ((stage, lambda p: p.kill()), (server, lambda p: os.killpg(p.pid, signal.SIGKILL))):
            if proc is not None and proc.poll() is None:
                kill(proc)
                proc.wait(30)
    err = (root / "stage.err").read_text()
    return root, home, stage.returncode, err


KILLED_STEPS = 16


@pytest.mark.slow
def test_mlflow_server_killed_mid_stage_the_stage_succeeds(server_killed):
    root, home, returncode, err = server_killed
    assert returncode == 0, err[-3000:]


@pytest.mark.slow
def test_mlflow_server_killed_mid_stage_metrics_complete_and_no_record_lost(server_killed):
    root, home, returncode, err = server_killed
    metrics = json.loads((root / "metrics" / "dapt.json").read_text())  # complete, as if nothing happened
    assert {"before", "after", "train"} <= set(metrics), err[-3000:]
    assert metrics["train"]["steps"] == KILLED_STEPS and metrics["after"]["eval_loss"] > 0
    assert (root / "models" / "dapt" / "refinery_manifest.json").is_file()

    unsent_file = root / "metrics" / "dapt.mlflow-unsent.json"  # where tracking.py puts what it could not send
    assert unsent_file.is_file(), err[-3000:]
    assert str(unsent_file.relative_to(root)) in err  # and the stage says so
    unsent = json.loads(unsent_file.read_text())
    step_calls = [c for c in unsent if c["call"] == "log_metrics" and "step" in c["kwargs"] and "loss" in c["args"][0]]
    unsent_steps = {c["kwargs"]["step"] for c in step_calls}
    finals = [c["args"][0] for c in unsent if c["call"] == "log_metrics" and "after.eval_loss" in c["args"][0]]
    assert len(finals) == 1 and finals[0]["after.eval_loss"] == pytest.approx(metrics["after"]["eval_loss"])

    # what reached the server before it died, plus what is in the file: every step's loss, none lost
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{home / 'server.db'}")
    runs = client.search_runs([client.get_experiment_by_name("llm-refinery").experiment_id])
    assert len(runs) == 1
    sent_steps = {m.step for m in client.get_metric_history(runs[0].info.run_id, "loss")}
    assert sent_steps and unsent_steps, (sorted(sent_steps), sorted(unsent_steps))
    assert sent_steps | unsent_steps == set(range(1, KILLED_STEPS + 1))


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
    dead = f"http://127.0.0.1:{free_port()}"
    env = {**os.environ, "PREFECT_API_URL": f"{dead}/api", "MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow.db'}",
           "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "flows.base_model"], cwd=project, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Prefect API" in proc.stderr and "unreachable" in proc.stderr
    assert (project / "models" / "base" / "model.safetensors").is_file()

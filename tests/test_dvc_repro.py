"""The real dvc.yaml on the tiny model, in a fresh git repo: the Prefect pipeline flow runs every stage
through DVC, after which dvc.lock is complete, `dvc status` is clean, `dvc repro` does nothing, and a second
pipeline run skips every stage."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, write_tiny_params

pytestmark = pytest.mark.slow


def sh(cmd: str, cwd: Path, env: dict) -> str:
    out = subprocess.run(cmd, shell=True, cwd=cwd, env=env, capture_output=True, text=True, timeout=1800)
    assert out.returncode == 0, f"{cmd} failed:\n{out.stdout[-3000:]}\n{out.stderr[-5000:]}"
    return out.stdout


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    dst = tmp_path_factory.mktemp("clone") / "repo"
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                           text=True, check=True).stdout.split()
    for f in files:
        if (REPO / f).is_file():
            (dst / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / f, dst / f)
    write_tiny_params(dst / "params")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "MLFLOW_TRACKING_URI": f"sqlite:///{dst / 'mlflow.db'}", "PREFECT_LOGGING_LEVEL": "WARNING"}
    env.pop("PREFECT_API_URL", None)
    sh("git init -q && git add -A && git -c user.email=t@localhost -c user.name=t commit -qm init", dst, env)
    return dst, env


def test_pipeline_then_dvc_agree(repo):
    root, env = repo
    first = sh(f"{sys.executable} -m flows.pipeline", root, env)
    assert "report ran" in first and "ppo ran" in first
    lock = (root / "dvc.lock").read_text()
    for stage in ("base_model", "prepare", "dapt", "sft", "compare", "reward", "ppo"):
        assert f"{stage}:" in lock
    dapt = json.loads((root / "metrics" / "dapt.json").read_text())
    assert dapt["after"]["eval_loss"] < dapt["before"]["eval_loss"]
    assert "up to date" in sh("dvc status", root, env)
    again = sh("dvc repro", root, env)
    assert "didn't change, skipping" in again and "Running stage" not in again
    shown = sh("dvc metrics show --json", root, env)
    assert "after.eval_loss" in shown or '"eval_loss"' in shown
    second = sh(f"{sys.executable} -m flows.pipeline", root, env)
    assert second.count("skipped (up to date)") == len(yaml.safe_load((root / "dvc.yaml").read_text())["stages"])
    report = (root / "reports" / "pipeline" / "report.md").read_text()
    assert "## PPO" in report and "## Method comparison" in report

    import mlflow

    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    runs = mlflow.search_runs(experiment_names=["llm-refinery"])
    parent = runs[runs["tags.mlflow.runName"].str.startswith("pipeline")].iloc[-1]
    children = runs[runs["tags.mlflow.parentRunId"] == parent["run_id"]]
    assert {"dapt", "sft", "reward", "ppo"} <= set(children["tags.stage"])
    assert children[children["tags.stage"] == "ppo"]["metrics.eval.win_rate_vs_sft"].notna().all()

    champion = mlflow.pyfunc.load_model("models:/llm-refinery-policy@champion")  # the registered champion
    out = champion.predict(["Which module defines `dumps`?"], params={"max_new_tokens": 4})
    assert len(out) == 1 and isinstance(out[0], str)
    assert "Model registry" in (root / "reports" / "pipeline" / "report.md").read_text()


def test_dvc_experiment_with_a_virtual_token_sft(repo):
    """`dvc exp run -S params/sft.yaml:method=prefix` runs end to end: the non-mergeable SFT is saved as an
    adapter, reward and PPO start from its base weights (and say so), and `dvc exp show` lists the run."""
    root, env = repo
    out = subprocess.run("dvc exp run -S params/sft.yaml:method=prefix", shell=True, cwd=root, env=env,
                         capture_output=True, text=True, timeout=1800)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "not carried" in out.stdout + out.stderr
    assert (root / "models" / "sft" / "adapter_config.json").is_file()
    shown = sh("dvc exp show --json", root, env)
    assert '"prefix"' in shown


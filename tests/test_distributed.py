"""Multi-process training: `sft` on 2 CPU processes (torchrun, DDP over gloo, relaunched by the stage itself
from `training.nproc_per_node: 2`) follows the single-process run with the same global batch, and only rank 0
writes the output, the metrics and the MLflow and Prefect records."""
import csv
import os
import subprocess
import sys

import pytest

from refinery.errors import UserError
from refinery.ops.distributed import launch_command
from tests.conftest import REPO

# Same global batch (4 rows a step), same rows, same seed. The two runs differ only in how the batch is split
# (and summed: float32 all-reduce in another order), so the curves agree to float noise, far below the
# step-to-step change of the loss (~0.1 here).
LOSS_TOLERANCE = 2e-3
STEPS = 4


def run_sft(project, api_url, tag: str, *sets: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PREFECT_API_URL": api_url, "MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow.db'}",
           "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "flows.sft", "--input-dir", "models/base", "--data-dir", str(project / "prepared"),
           "--out-dir", f"out/{tag}", "--record-root", f"records/{tag}", "--set", f"training.max_steps={STEPS}",
           "--set", "training.save_steps=100", "--set", "eval.before=false", *sum((["--set", s] for s in sets), [])]
    proc = subprocess.run(cmd, cwd=project, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


def losses(project, tag: str) -> list[float]:
    with open(project / "records" / tag / "plots" / "sft" / "train.csv") as fh:
        return [float(r["loss"]) for r in csv.DictReader(fh)]


@pytest.mark.slow
def test_two_processes_match_one_and_only_rank0_writes(project, prepared, prefect_server):
    import shutil

    from prefect.settings import get_current_settings

    shutil.copytree(prepared, project / "prepared")
    api = str(get_current_settings().api.url)
    run_sft(project, api, "one", "training.batch_size=4")
    two = run_sft(project, api, "two", "training.batch_size=2", "training.nproc_per_node=2")
    assert "launching 2 processes" in two.stderr

    one_curve, two_curve = losses(project, "one"), losses(project, "two")
    assert len(one_curve) == len(two_curve) == STEPS
    assert max(abs(a - b) for a, b in zip(one_curve, two_curve)) < LOSS_TOLERANCE, (one_curve, two_curve)
    assert two_curve[0] - two_curve[-1] > 10 * LOSS_TOLERANCE  # it trained, by far more than the tolerance

    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(project / "out" / "two")  # rank 0's output loads with plain transformers
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["llm-refinery"])
    assert len(runs) == 2, runs[["tags.mlflow.runName", "tags.stage"]]  # one per invocation: rank 1 logged nothing
    two_run = runs[runs["params.sft.training.nproc_per_node"] == "2"].iloc[0]
    assert two_run["metrics.train.tokens_per_second"] > 0

    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        ours = [r.name for r in client.read_flow_runs(limit=200)
                if str((r.parameters or {}).get("record_root", "")).startswith("records/")]
    assert len(ours) == 2, ours  # one Prefect flow run per invocation, from rank 0


def test_launch_command_choices(monkeypatch, tmp_path):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert launch_command("flows.sft", [], 1, None) is None
    cmd = launch_command("flows.sft", ["--set", "a=1"], 2, None)
    assert cmd[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    assert cmd[-4:] == ["-m", "flows.sft", "--set", "a=1"]
    with pytest.raises(UserError, match="no such file"):
        launch_command("flows.sft", [], 2, str(tmp_path / "missing.yaml"))
    monkeypatch.setenv("WORLD_SIZE", "2")  # already a rank of a launched run: never relaunch
    assert launch_command("flows.sft", [], 2, None) is None


def test_single_process_stages_refuse_several(project, capsys):
    from flows.dpo import main

    os.environ["WORLD_SIZE"], os.environ["RANK"] = "2", "0"
    try:
        with pytest.raises(SystemExit) as exc:
            main([])
    finally:
        del os.environ["WORLD_SIZE"], os.environ["RANK"]
    assert exc.value.code == 2 and "runs in one process" in capsys.readouterr().err


def test_shipped_accelerate_configs_parse():
    """configs/accelerate/*.yaml load with accelerate's own config loader (they are run on GPUs, not here)."""
    from pathlib import Path

    from accelerate.commands.config.config_args import load_config_from_file

    folder = Path(__file__).resolve().parents[1] / "configs" / "accelerate"
    found = {p.stem: load_config_from_file(str(p)) for p in folder.glob("*.yaml")}
    assert {"ddp", "fsdp", "deepspeed_zero2", "deepspeed_zero3", "multi_node"} <= set(found)
    assert found["fsdp"].distributed_type.value == "FSDP"
    assert found["deepspeed_zero3"].deepspeed_config["zero_stage"] == 3
    assert found["multi_node"].num_machines == 2

"""SIGKILL each training stage after its first checkpoint, rerun the same command, and check it resumed from
the last checkpoint, ran every step once, and ended with the metrics of an uninterrupted run (CPU: exactly)."""
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

STAGES = {  # stage -> (extra --set args, checkpoint marker glob, final metric path)
    "dapt": (["training.max_steps=12", "training.save_steps=2"], "checkpoint-*/trainer_state.json",
             ("after", "eval_loss")),
    "sft": (["training.max_steps=12", "training.save_steps=2"], "checkpoint-*/trainer_state.json",
            ("train", "final_loss")),
    "reward": (["training.max_steps=12", "training.save_steps=2"], "checkpoint-*/trainer_state.json",
               ("eval", "margin")),
    "ppo": (["steps=8", "save_steps=2"], "step-*/state.json", ("train", "reward_last")),
}


@pytest.fixture
def stage_project(project, prepared, prefect_server):
    from prefect.settings import get_current_settings

    shutil.copytree(prepared, project / "data" / "prepared")
    for name in ("dapt", "sft"):
        shutil.copytree(project / "models" / "base", project / "models" / name)
    env = {**os.environ, "PREFECT_API_URL": str(get_current_settings().api.url),
           "MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow.db'}", "PYTHONPATH": str(Path(__file__).parents[1])}
    return project, env


def cli(stage, sets):
    return [sys.executable, "-m", f"flows.{stage}"] + [a for s in sets for a in ("--set", s)]


def run(stage, sets, root, env):
    proc = subprocess.run(cli(stage, sets), cwd=root, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((root / "metrics" / f"{stage}.json").read_text())


@pytest.mark.parametrize("stage", list(STAGES))
def test_sigkill_then_resume(stage, stage_project):
    root, env = stage_project
    sets, marker, (block, key) = STAGES[stage]
    if stage == "ppo":
        run("reward", ["training.max_steps=2"], root, env)
    reference = run(stage, sets, root, env)
    shutil.rmtree(root / "checkpoints")

    proc = subprocess.Popen(cli(stage, sets), cwd=root, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while not list((root / "checkpoints" / stage).glob(f"*/{marker}")):
        assert proc.poll() is None, "finished before its first checkpoint"
        assert time.time() < deadline
        time.sleep(0.2)
    time.sleep(random.uniform(0, 1.0))  # a random point after the first checkpoint
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if proc.returncode == 0:
        pytest.skip("the stage finished before the kill landed")

    resumed = run(stage, sets, root, env)
    total = 8 if stage == "ppo" else 12
    assert resumed["train"]["resumed_from_step"] in range(2, total + 1, 2)
    assert resumed["train"]["steps"] == total
    assert resumed[block][key] == pytest.approx(reference[block][key], abs=1e-5)

"""SIGKILL each training stage at a seeded point after one of its checkpoints, rerun the same command, and check
it resumed from the last complete checkpoint, ran every step once, and ended with the metrics of an uninterrupted
run (CPU: exactly). The kill point (which checkpoint, how long after it) comes from KILL_SEED and is in every
assertion message; a kill that lands after the stage finished is a failure, not a skip."""
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
KILL_SEED = 20240611

STAGES = {  # stage -> (extra --set args, checkpoint marker glob, final metric path)
    "dapt": (["training.max_steps=12", "training.save_steps=2"], "checkpoint-*/trainer_state.json",
             ("after", "eval_loss")),
    "sft": (["training.max_steps=12", "training.save_steps=2"], "checkpoint-*/trainer_state.json",
            ("train", "final_loss")),
    "reward": (["training.max_steps=12", "training.save_steps=2"], "checkpoint-*/trainer_state.json",
               ("eval", "margin")),
    "ppo": (["steps=8", "save_steps=2"], "step-*/state.json", ("train", "reward_last")),
    "dpo": (["training.max_steps=12", "training.save_steps=2"], "checkpoint-*/trainer_state.json",
            ("train", "final_loss")),
    "grpo": (["training.max_steps=12", "training.save_steps=2"], "checkpoint-*/trainer_state.json",
             ("train", "reward_last")),
}
NEEDS_REWARD = ("ppo", "dpo", "grpo")  # trained against models/reward, or judged by it


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


def kill_point(stage: str, total: int, save_steps: int) -> tuple[int, float]:
    """(checkpoint step to wait for, seconds to wait after it), from KILL_SEED: at least two checkpoints' worth of
    steps are left after it, so the kill lands while the stage is still training."""
    rng = random.Random(f"{KILL_SEED}:{stage}")
    return rng.choice(range(save_steps, total - 2 * save_steps + 1, save_steps)), round(rng.uniform(0.0, 0.3), 3)


def complete_steps(root: Path, stage: str, marker: str) -> list[int]:
    """Steps of the checkpoints on disk that are complete (their last-written file exists)."""
    return sorted(int(re.search(r"-(\d+)$", p.parent.name).group(1))
                  for p in (root / "checkpoints" / stage).glob(f"*/{marker}"))


@pytest.mark.parametrize("stage", list(STAGES))
def test_sigkill_then_resume(stage, stage_project):
    root, env = stage_project
    sets, marker, (block, key) = STAGES[stage]
    total = 8 if stage == "ppo" else 12
    wait_step, delay = kill_point(stage, total, 2)
    where = f"kill point (seed {KILL_SEED}): {delay} s after checkpoint {wait_step} of {total} steps"
    if stage in NEEDS_REWARD:
        run("reward", ["training.max_steps=2"], root, env)
    reference = run(stage, sets, root, env)
    shutil.rmtree(root / "checkpoints")
    (root / "metrics" / f"{stage}.json").unlink()

    proc = subprocess.Popen(cli(stage, sets), cwd=root, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    try:
        while not any(s >= wait_step for s in complete_steps(root, stage, marker)):
            assert proc.poll() is None, f"stage exited ({proc.returncode}) before checkpoint {wait_step}; {where}"
            assert time.monotonic() < deadline, f"no checkpoint {wait_step} after 600 s; {where}"
            time.sleep(0.05)
        time.sleep(delay)
        assert proc.poll() is None, f"stage finished before the kill landed; {where}"
        proc.send_signal(signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"exit code {proc.returncode}, not killed; {where}"
    on_disk = complete_steps(root, stage, marker)
    assert on_disk and max(on_disk) < total, f"checkpoints {on_disk} at the kill; {where}"
    assert not (root / "metrics" / f"{stage}.json").exists(), f"the killed run wrote its metrics; {where}"

    resumed = run(stage, sets, root, env)
    assert resumed["train"]["resumed_from_step"] == max(on_disk), f"checkpoints {on_disk}; {where}"
    assert resumed["train"]["steps"] == total, where
    assert resumed[block][key] == pytest.approx(reference[block][key], abs=1e-5), where

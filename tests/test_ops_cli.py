"""The operational CLIs a user runs, through the real commands on the tiny model:

* `python -m flows.pipeline --from/--to/--force`: a slice runs exactly its stages through DVC, a rerun skips
  what is up to date, --force reruns; a bad slice is one line and exit 2;
* `python -m flows.sweep --grid ...`: a malformed grid is one line and exit 2, before anything trains;
* checkpoints are keyed by params and inputs: a different lr trains in a fresh folder and does not resume the
  old run, the same params resume their own;
* the bundled SmolLM2 GGUF imports into a plain transformers model that works.
"""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, write_tiny_params


@pytest.fixture(scope="module")
def api_env(prefect_server):
    """The test Prefect server's URL, so each CLI subprocess uses it instead of starting its own."""
    from prefect.settings import get_current_settings

    return {"PREFECT_API_URL": str(get_current_settings().api.url)}


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr[-3000:]
    return errors[0]


# ---- the pipeline: --from / --to / --force -------------------------------------------------------------------
@pytest.fixture(scope="module")
def repo(tmp_path_factory, api_env):
    """The project's files (dvc.yaml, flows, refinery, params with tiny sizes, demo data) in a fresh git repo,
    as tests/test_dvc_repro.py builds it; MLflow in the repo's own sqlite store."""
    dst = tmp_path_factory.mktemp("pipeline") / "repo"
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                           text=True, check=True).stdout.split()
    for f in files:
        if (REPO / f).is_file() and not f.startswith(("tests/", "bench/", "docs/")):
            (dst / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / f, dst / f)
    write_tiny_params(dst / "params")
    env = {**os.environ, **api_env, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "PWD": str(dst),
           "MLFLOW_TRACKING_URI": f"sqlite:///{dst / 'mlflow.db'}", "PYTHONPATH": str(dst)}
    subprocess.run("git init -q && git add -A && git -c user.email=t@localhost -c user.name=t commit -qm init",
                   shell=True, cwd=dst, env=env, check=True, capture_output=True)
    return dst, env


def pipeline(root: Path, env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.pipeline", *args], cwd=root, env=env, capture_output=True,
                          text=True, timeout=1200)


def results(proc: subprocess.CompletedProcess) -> dict[str, str]:
    """{stage: "ran" | "skipped (up to date)"} from the `pipeline: ...` line the run prints."""
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("pipeline: "))
    return dict(re.match(r"(\S+) (.+)", part.strip()).groups() for part in line[len("pipeline: "):].split(","))


def verify(folder: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "refinery.modeling.manifest", "verify", str(folder)],
                          capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(REPO)})


def stage_runs(root: Path, stage: str) -> int:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    exp = client.get_experiment_by_name("llm-refinery")
    return len(client.search_runs([exp.experiment_id], filter_string=f"tags.stage = '{stage}'")) if exp else 0


@pytest.fixture(scope="module")
def ran_to_dapt(repo):
    """`python -m flows.pipeline --to dapt` in the fresh repo, once: (its results, metrics/sft.json before)."""
    root, env = repo
    sft_metrics = root / "metrics" / "sft.json"  # tracked in git: must be left as it is
    sft_before = sft_metrics.read_text() if sft_metrics.exists() else None
    return results(pipeline(root, env, "--to", "dapt")), sft_before


@pytest.mark.slow
def test_pipeline_slice_runs_its_stages_then_skips_them(repo, ran_to_dapt):
    root, env = repo
    first, sft_before = ran_to_dapt
    assert first == {"base_model": "ran", "prepare": "ran", "dapt": "ran"}  # the slice, in DVC's order
    assert list(first) == ["base_model", "prepare", "dapt"]
    assert not (root / "models" / "sft").exists() and stage_runs(root, "sft") == 0  # nothing past --to
    sft_metrics = root / "metrics" / "sft.json"
    assert (sft_metrics.read_text() if sft_metrics.exists() else None) == sft_before
    # DVC recorded the slice: its entries are new, every other entry is still the committed demo run's
    committed = yaml.safe_load((REPO / "dvc.lock").read_text())["stages"] if (REPO / "dvc.lock").is_file() else {}
    now = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    assert {s for s in now if now[s] != committed.get(s)} == set(first)
    for out in ("models/base", "models/dapt"):  # real stage outputs verify against their manifests
        proc = verify(root / out)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    dapt_manifest = (root / "models" / "dapt" / "refinery_manifest.json").read_text()
    runs = stage_runs(root, "dapt")

    pipeline_runs = stage_runs(root, "pipeline")
    proc = pipeline(root, env, "--from", "prepare", "--to", "dapt")
    again = results(proc)
    assert again == {"prepare": "skipped (up to date)", "dapt": "skipped (up to date)"}
    # nothing stale: ended before Prefect and MLflow started, as `dvc repro` does (flows/pipeline.nothing_to_do)
    assert "nothing to run" in proc.stdout and stage_runs(root, "pipeline") == pipeline_runs
    named = results(pipeline(root, env, "--from", "prepare", "--to", "dapt", "--name", "recorded"))
    assert named == again and stage_runs(root, "pipeline") == pipeline_runs + 1  # --name: a recorded run
    assert (root / "models" / "dapt" / "refinery_manifest.json").read_text() == dapt_manifest
    assert stage_runs(root, "dapt") == runs  # no new stage run
    status = subprocess.run(["dvc", "status"], cwd=root, env=env, capture_output=True, text=True, timeout=300)
    for stage in first:
        assert f"{stage}:" not in status.stdout, status.stdout  # DVC agrees: the slice is up to date


@pytest.mark.slow
def test_pipeline_force_reruns_an_up_to_date_stage(repo, ran_to_dapt):
    root, env = repo
    runs, base_runs = stage_runs(root, "dapt"), stage_runs(root, "base_model")
    proc = pipeline(root, env, "--from", "dapt", "--to", "dapt", "--force")
    assert results(proc) == {"dapt": "ran"}
    assert stage_runs(root, "base_model") == base_runs  # outside the slice: untouched
    assert "didn't change, skipping" not in proc.stdout + proc.stderr
    assert stage_runs(root, "dapt") == runs + 1  # a new dapt run was recorded
    assert verify(root / "models" / "dapt").returncode == 0


@pytest.mark.bad_input
@pytest.mark.parametrize("args,expected", [
    (["--from", "ppo", "--to", "dapt"], "--from ppo comes after --to dapt in dvc.yaml"),
    (["--from", "nope"], "unknown stage 'nope' (dvc.yaml has: base_model, "),
    (["--set", "sft.method"], "--set sft.method: expected STAGE.KEY=VALUE"),
    (["--set", "sft.method=loraa"], "unknown method 'loraa'"),
])
def test_pipeline_bad_arguments_are_one_line(repo, args, expected):
    root, env = repo

    def state():  # what a refused run must leave as it was: the params files and dvc.lock
        return {p.name: p.read_text() for p in [*(root / "params").glob("*.yaml"), root / "dvc.lock"] if p.exists()}

    before = state()
    assert expected in one_error_line(pipeline(root, env, *args))
    assert state() == before


# ---- sweep grid errors --------------------------------------------------------------------------------------
@pytest.fixture
def sweep_project(project, api_env):
    env = {**os.environ, **api_env, "MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow.db'}",
           "PYTHONPATH": str(REPO)}
    return project, env


@pytest.mark.bad_input
@pytest.mark.parametrize("grid,expected", [
    ("training.lr", "--grid training.lr: expected KEY=V1,V2,..."),
    ("training.lr=", "--grid training.lr=: expected KEY=V1,V2,..."),
    ("training.lr=0.001,fast", "training.lr"),
    ("method=lora,loraa", "unknown method 'loraa'"),
])
def test_sweep_malformed_grid_is_one_line(sweep_project, grid, expected):
    root, env = sweep_project
    proc = subprocess.run([sys.executable, "-m", "flows.sweep", "--name", "bad", "--grid", grid], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)
    assert expected in one_error_line(proc)
    assert not list((root / "experiments").glob("bad/*/model"))  # no point trained
    assert not (root / "checkpoints").exists()


# ---- checkpoints keyed by params ----------------------------------------------------------------------------
def test_checkpoint_folder_follows_params_and_inputs(tmp_path, tiny_base, prepared):
    """The folder dapt resumes from (its inputs' `checkpoint`): the same for the same params and inputs, another
    one when a param, the seed, the input model or the data changes."""
    from flows.dapt import load_inputs

    write_tiny_params(tmp_path / "params")

    def key(overrides=None, params_dir=tmp_path / "params", base=tiny_base, data=prepared) -> Path:
        return load_inputs(str(params_dir), str(base), str(data), overrides).checkpoint

    first = key()
    assert first == key() and first.parent == Path("checkpoints") / "dapt"
    assert key({"training.lr": 0.001}) != first
    assert key({"training.lr": 0.003}) == first  # the tiny params' own lr, given explicitly
    write_tiny_params(tmp_path / "seed")
    (tmp_path / "seed" / "base.yaml").write_text((tmp_path / "seed" / "base.yaml").read_text().replace(
        "seed: 42", "seed: 43"))
    assert key(params_dir=tmp_path / "seed") != first
    other_base = Path(shutil.copytree(tiny_base, tmp_path / "other"))
    (other_base / "config.json").write_text((other_base / "config.json").read_text() + "\n")
    assert key(base=other_base) != first
    other_data = Path(shutil.copytree(prepared, tmp_path / "data"))
    with open(other_data / "corpus" / "train.jsonl", "a") as fh:
        fh.write(json.dumps({"id": "extra", "text": "one more document"}) + "\n")
    assert key(data=other_data) != first


@pytest.fixture
def dapt_project(project, prepared, api_env):
    shutil.copytree(prepared, project / "data" / "prepared")
    env = {**os.environ, **api_env, "MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow.db'}",
           "PYTHONPATH": str(REPO)}
    return project, env


def dapt(root: Path, env: dict, *sets: str) -> dict:
    cmd = [sys.executable, "-m", "flows.dapt"] + [a for s in sets for a in ("--set", s)]
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((root / "metrics" / "dapt.json").read_text())


def folders(root: Path) -> set[str]:
    return {p.name for p in (root / "checkpoints" / "dapt").iterdir()}


@pytest.mark.slow
def test_changed_params_start_a_fresh_checkpoint_folder(dapt_project):
    root, env = dapt_project
    first = dapt(root, env)
    assert first["train"]["resumed_from_step"] is None
    (key_a,) = folders(root)

    changed = dapt(root, env, "training.lr=0.001")  # the old run's checkpoints are all there: not resumed
    assert changed["train"]["resumed_from_step"] is None and changed["train"]["steps"] == first["train"]["steps"]
    assert changed["train"]["final_loss"] != first["train"]["final_loss"]
    assert len(folders(root)) == 2 and key_a in folders(root)
    # --set wrote models/dapt, so it recorded its value in params/dapt.yaml (what dvc.lock will describe)
    assert yaml.safe_load((root / "params" / "dapt.yaml").read_text())["training"]["lr"] == 0.001

    same = dapt(root, env, "training.lr=0.003")  # the first params again: their own folder, every step done
    assert same["train"]["resumed_from_step"] == first["train"]["steps"]
    assert same["after"]["eval_loss"] == pytest.approx(first["after"]["eval_loss"], abs=1e-6)
    assert len(folders(root)) == 2


# ---- the bundled SmolLM2 ---------------------------------------------------------------------------------
@pytest.mark.slow
def test_smollm2_gguf_imports_as_a_plain_transformers_model(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from refinery.config import BaseModelParams
    from refinery.modeling.base_import import import_base

    model, tok = import_base(BaseModelParams(source="smollm2"), seed=0, trust_remote_code=False)
    model.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    del model

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "base", use_safetensors=True).eval()
    tok = AutoTokenizer.from_pretrained(tmp_path / "base")
    assert getattr(loaded.config, "quantization_config", None) is None  # de-quantized: every method can train it
    assert 130e6 < sum(p.numel() for p in loaded.parameters()) < 140e6  # SmolLM2-135M: 134,515,008
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        assert torch.isfinite(loaded(**ids).logits).all()
        out = loaded.generate(**ids, max_new_tokens=12, do_sample=False, pad_token_id=tok.eos_token_id)
    assert "Paris" in tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)  # it still knows


@pytest.mark.slow
def test_set_with_out_dir_leaves_the_params_file_alone(dapt_project):
    root, env = dapt_project
    before = (root / "params" / "dapt.yaml").read_text()
    cmd = [sys.executable, "-m", "flows.dapt", "--set", "training.max_steps=2", "--out-dir", "elsewhere/dapt"]
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (root / "params" / "dapt.yaml").read_text() == before
    assert (root / "elsewhere" / "dapt" / "config.json").is_file() and not (root / "models" / "dapt").exists()


def test_refinery_console_command_runs_a_stage_like_python_m(project, api_env):
    """`pip install -e .` installs `refinery`; `refinery stage prepare` is `python -m flows.prepare`."""
    exe = Path(sys.executable).parent / "refinery"
    assert exe.is_file(), "the console entry point is not installed: run `make install` (pip install -e .)"
    env = {**os.environ, **api_env}
    bad = subprocess.run([str(exe), "stage", "bogus"], capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "expected one of base_model" in bad.stderr
    ok = subprocess.run([str(exe), "stage", "prepare"], capture_output=True, text=True, env=env, timeout=300)
    assert ok.returncode == 0, ok.stderr[-3000:]
    report = json.loads((project / "data" / "prepared" / "report.json").read_text())
    assert report["sets"]["sft/summarize"]["kept"] > 0


def test_the_gpu_extra_installs_and_declares_bitsandbytes():
    """`pip install -e '.[gpu]'` (the README's GPU install) builds: setuptools is told its packages (it once
    refused, finding several top-level folders), and the extra brings bitsandbytes. Offline: --no-deps
    --no-index checks the build and the metadata, not the download."""
    from importlib.metadata import metadata

    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--no-deps", "--no-build-isolation",
                           "--no-index", "-e", ".[gpu]"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "Would install llm-refinery" in proc.stdout, proc.stderr[-2000:]
    md = metadata("llm-refinery")
    assert "gpu" in md.get_all("Provides-Extra")
    assert any(r.startswith("bitsandbytes") and 'extra == "gpu"' in r for r in md.get_all("Requires-Dist"))
    assert any(r.startswith("liger-kernel") and 'extra == "gpu"' in r for r in md.get_all("Requires-Dist"))


@pytest.mark.slow
def test_two_runs_on_one_repository_fail_in_one_line_or_queue(repo, ran_to_dapt):
    """Run A holds the repository; B started meanwhile fails at once in one line naming A; C with --wait
    queues and runs after A (finding dapt up to date), and both A and C succeed."""
    import time

    from refinery.ops.repo_lock import holder

    root, env = repo
    lock = root / ".dvc" / "tmp" / "refinery-pipeline.lock"
    a = subprocess.Popen([sys.executable, "-m", "flows.pipeline", "--from", "dapt", "--to", "dapt", "--force",
                          "--name", "run-a"], cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    end = time.monotonic() + 120
    while holder(lock).get("pid") != a.pid and time.monotonic() < end and a.poll() is None:
        time.sleep(0.5)
    assert holder(lock).get("pid") == a.pid, "run A never took the repository"
    b = pipeline(root, env, "--to", "base_model")
    line = one_error_line(b)
    assert "another pipeline run holds this repository" in line and f"pid {a.pid}" in line
    c = subprocess.Popen([sys.executable, "-m", "flows.pipeline", "--from", "dapt", "--to", "dapt", "--wait"],
                         cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out_a, err_a = a.communicate(timeout=1200)
    assert a.returncode == 0, err_a[-3000:]
    out_c, err_c = c.communicate(timeout=1200)
    assert c.returncode == 0, err_c[-3000:]
    assert "pipeline: dapt skipped (up to date)" in out_c  # it ran after A, which had rebuilt dapt

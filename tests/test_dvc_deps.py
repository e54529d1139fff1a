"""DVC tracks what a stage reads: every project module a stage imports (its import closure) is a dep unless it
cannot change the stage's outputs, and the data/model paths named in params/ are deps (refinery/ops/dvc_deps.py)."""
import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from refinery.config import ALIGNMENT_STAGES
from refinery.errors import UserError
from refinery.ops import dvc_deps
from refinery.ops.dvc_alignment import stage_block

REPO = Path(__file__).resolve().parents[1]

# Imported by stages, but nothing they compute reaches an output DVC tracks: each with the reason.
NOT_OUTPUT_AFFECTING = {
    "refinery/errors.py": "the text of error messages (bad input stops a stage before it writes anything)",
    "refinery/ops/__init__.py": "empty package marker",
    "refinery/ops/dag.py": "reads dvc.yaml for the stage order and dvc.lock hashes; computes nothing a stage writes",
    "refinery/ops/distributed.py": "process launch (torchrun/accelerate); results equal the 1-process run "
                                   "(tests/test_distributed.py)",
    "refinery/ops/dvc_deps.py": "checks dvc.yaml before a stage runs",
    "refinery/ops/dvc_alignment.py": "writes dvc.yaml's alignment blocks (read by dvc_deps); no stage output",
    "refinery/ops/health.py": "probes whether MLflow/Prefect servers answer",
    "refinery/ops/host_memory.py": "allocator and kernel-cache settings; nothing computed changes "
                                   "(tests/test_host_memory.py; the demo's PPO run identical with and without)",
    "refinery/ops/prefect_artifacts.py": "Prefect UI artifacts (summaries, tables)",
    "refinery/ops/prefect_link.py": "links between the Prefect UI and MLflow",
    "refinery/ops/prefect_tasks.py": "Prefect task wrappers (caching off, retries, names)",
    "refinery/ops/stage_cli.py": "CLI plumbing: argument parsing, exit codes, opening the MLflow record",
    "refinery/ops/tracking.py": "MLflow recording (a failed call is kept in metrics/<stage>.mlflow-unsent.json)",
}


def _module_file(name: str) -> Path | None:
    p = REPO / Path(*name.split("."))
    if p.with_suffix(".py").is_file():
        return p.with_suffix(".py")
    if (p / "__init__.py").is_file():
        return p / "__init__.py"
    return None


def _imports(path: Path) -> set[str]:
    """Project modules a file imports, at any depth in the file (function-level imports included)."""
    package = path.relative_to(REPO).with_suffix("").parts[:-1]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            parts = list(package[:len(package) - node.level + 1]) if node.level else []
            base = ".".join(parts + ([node.module] if node.module else []))
            out |= {base} | {f"{base}.{a.name}" for a in node.names}
    return {m for m in out if m.split(".")[0] in ("refinery", "flows")}


def import_closure(module: str) -> set[str]:
    seen: set[Path] = set()
    todo = [_module_file(module)]
    while todo:
        f = todo.pop()
        if f in seen:
            continue
        seen.add(f)
        todo += [mf for mf in map(_module_file, _imports(f)) if mf and mf not in seen]
    return {f.relative_to(REPO).as_posix() for f in seen}


def _covered(path: str, deps: list[str]) -> bool:
    return any(path == d or path.startswith(d.rstrip("/") + "/") for d in deps)


# the stages in dvc.yaml, and every alignment stage params/pipeline.yaml could select (as sync would write it)
STAGES = {**yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"],
          **{s: stage_block(s) for s in ALIGNMENT_STAGES if (REPO / "flows" / f"{s}.py").is_file()}}


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_every_imported_module_that_can_change_outputs_is_a_dep(stage):
    spec = STAGES[stage]
    closure = import_closure(spec["cmd"].split()[-1])
    deps = [str(d) for d in spec["deps"]]
    missed = sorted(p for p in closure if p not in NOT_OUTPUT_AFFECTING and not _covered(p, deps))
    assert not missed, f"dvc.yaml stage {stage} imports but does not depend on {missed}"


def test_the_exclusions_are_still_imported_somewhere():
    everything = set().union(*(import_closure(s["cmd"].split()[-1]) for s in STAGES.values()))
    assert set(NOT_OUTPUT_AFFECTING) <= everything, set(NOT_OUTPUT_AFFECTING) - everything


def test_repo_dvc_yaml_lists_every_data_path_params_name():
    assert dvc_deps.missing(REPO) == []
    assert dvc_deps.expected_deps(REPO)["prepare"] == sorted(
        d for d in dvc_deps.declared_deps(REPO)["prepare"] if d.startswith("data/"))


@pytest.fixture
def scratch(tmp_path, monkeypatch):
    """dvc.yaml and params/ of the repo in a scratch folder (cwd), with the demo data."""
    shutil.copy(REPO / "dvc.yaml", tmp_path / "dvc.yaml")
    shutil.copytree(REPO / "params", tmp_path / "params")
    shutil.copytree(REPO / "data" / "demo", tmp_path / "data" / "demo")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _point_task_at(root: Path, path: str) -> None:
    p = root / "params" / "prepare.yaml"
    data = yaml.safe_load(p.read_text())
    data["datasets"]["sft"]["mine"] = {"path": path, "format": "messages"}
    p.write_text(yaml.safe_dump(data, sort_keys=False))


@pytest.mark.bad_input
def test_a_new_data_path_is_refused_until_dvc_yaml_lists_it(scratch):
    _point_task_at(scratch, "data/mine.parquet")
    assert dvc_deps.missing(".") == [("prepare", "data/mine.parquet")]
    with pytest.raises(UserError, match=r"dvc.yaml: stage prepare does not depend on data/mine.parquet"):
        dvc_deps.check_stage("prepare")
    assert dvc_deps.sync(".") and dvc_deps.missing(".") == []
    assert "data/mine.parquet" in yaml.safe_load((scratch / "dvc.yaml").read_text())["stages"]["prepare"]["deps"]
    assert dvc_deps.sync(".") == []  # idempotent
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    check = subprocess.run([sys.executable, "-m", "refinery.ops.dvc_deps", "--check"], env=env,
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stderr


def test_a_local_base_model_folder_is_a_dep_of_base_model(scratch):
    p = scratch / "params" / "base_model.yaml"
    p.write_text(p.read_text().replace("source: smollm2", "source: local").replace("path: null", "path: weights/my-model"))
    assert dvc_deps.missing(".") == [("base_model", "weights/my-model")]
    dvc_deps.sync(".")
    assert "weights/my-model" in yaml.safe_load((scratch / "dvc.yaml").read_text())["stages"]["base_model"]["deps"]


@pytest.mark.bad_input
def test_prepare_refuses_a_path_dvc_does_not_track_in_one_line_and_writes_nothing(project):
    shutil.copy(REPO / "dvc.yaml", project / "dvc.yaml")
    _point_task_at(project, "data/mine.jsonl")
    (project / "data" / "mine.jsonl").write_text('{"messages": [{"role": "user", "content": "hi"}, '
                                                 '{"role": "assistant", "content": "hello"}]}\n')
    proc = subprocess.run([sys.executable, "-m", "flows.prepare"], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "data/mine.jsonl" in errors[0] and "refinery.ops.dvc_deps" in errors[0]
    assert not (project / "data" / "prepared").exists()


def test_the_alignment_stages_follow_params_pipeline_yaml(scratch):
    """Selecting dpo and grpo instead of ppo writes their blocks (before report) and the report's deps; going back
    restores dvc.yaml byte for byte; `--check` names the drift in between."""
    original = (scratch / "dvc.yaml").read_text()
    p = scratch / "params" / "pipeline.yaml"
    p.write_text(p.read_text().replace("alignment: [ppo]", "alignment: [dpo, grpo]"))
    assert any("dpo: added" in c for c in dvc_deps.alignment_drift("."))
    dvc_deps.sync(".")
    stages = yaml.safe_load((scratch / "dvc.yaml").read_text())["stages"]
    assert list(stages)[-3:] == ["dpo", "grpo", "report"] and "ppo" not in stages
    assert stages["grpo"] == stage_block("grpo")
    assert {"models/dpo", "models/grpo", "reports/grpo/evaluation.json"} <= set(stages["report"]["deps"])
    assert "models/ppo" not in stages["report"]["deps"]
    assert dvc_deps.alignment_drift(".") == []
    p.write_text(p.read_text().replace("alignment: [dpo, grpo]", "alignment: [ppo]"))
    dvc_deps.sync(".")
    assert (scratch / "dvc.yaml").read_text() == original

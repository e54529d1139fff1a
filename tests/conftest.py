"""Shared fixtures: a tiny random model with the real tokenizer, a scratch project, one Prefect test server."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")

import pytest  # noqa: E402
import yaml  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

# Small enough to train in seconds on 2 CPU cores, large enough that the loss visibly drops.
TINY_OVERRIDES = {
    # fp32 everywhere in the tiny tests: golden values and "resumed == uninterrupted" are exact there;
    # bf16 has its own tests (tests/test_precision.py)
    "base.yaml": {"precision": "fp32"},
    "base_model.yaml": {"source": "tiny"},
    # validation monitoring off unless a test turns it on (it moves the save steps to the eval steps)
    "dapt.yaml": {"block_size": 64, "training": {"max_steps": 6, "batch_size": 4, "lr": 0.003, "save_steps": 2,
                                                 "warmup_ratio": 0.0, "scheduler": "constant", "eval_steps": 0,
                                                 "early_stopping_patience": 0},
                  "eval": {"max_batches": 4, "batch_size": 4, "num_samples": 1, "max_new_tokens": 8},
                  "lora": {"r": 8, "alpha": 16, "dropout": 0.0}},
    # the plain hash split: the golden values (tests/golden/) were recorded on it
    "prepare.yaml": {"max_length": 512, "min_validation": 0},
    "sft.yaml": {"block_size": 256, "training": {"max_steps": 4, "batch_size": 2, "lr": 0.003, "save_steps": 2,
                                                 "eval_steps": 0, "early_stopping_patience": 0},
                 "eval": {"max_examples_per_task": 2, "max_new_tokens": 4},
                 "tasks": {t: {"max_new_tokens": 4, "weight": 1.0} for t in ("summarize", "which_module", "explain_topic")}},
    "compare.yaml": {"max_steps": 2, "sft_overrides": {"eval.max_examples_per_task": 1, "eval.max_new_tokens": 2,
                                                       "block_size": 128}},
    "reward.yaml": {"max_length": 128, "training": {"max_steps": 4, "batch_size": 4, "lr": 0.003, "save_steps": 2,
                                                    "eval_steps": 0, "early_stopping_patience": 0},
                    "eval": {"max_pairs": 8}},
    "dpo.yaml": {"max_length": 128, "training": {"max_steps": 4, "batch_size": 4, "lr": 0.003, "save_steps": 2,
                                                 "eval_steps": 0, "early_stopping_patience": 0},
                 "eval": {"eval_prompts": 4, "eval_max_new_tokens": 6, "eval_samples": 2, "temperature": 1.0}},
    "grpo.yaml": {"num_generations": 2, "max_new_tokens": 6,
                  "training": {"max_steps": 3, "batch_size": 2, "lr": 0.003, "save_steps": 2, "warmup_ratio": 0.0},
                  "eval": {"eval_prompts": 4, "eval_max_new_tokens": 6, "eval_samples": 2, "temperature": 1.0}},
    "ppo.yaml": {"steps": 2, "batch_size": 4, "mini_batch_size": 2, "max_new_tokens": 6, "eval_prompts": 4,
                 "eval_max_new_tokens": 6, "save_steps": 1, "lr": 0.0001, "ppo_epochs": 1, "init_kl_coef": 0.05,
                 "temperature": 1.0, "target_kl": 1.0, "kl_horizon": 100},
}


def deep_update(d: dict, u: dict) -> dict:
    for k, v in u.items():
        d[k] = deep_update(d.get(k, {}) or {}, v) if isinstance(v, dict) else v
    return d


def write_tiny_params(dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for f in (REPO / "params").glob("*.yaml"):
        data = yaml.safe_load(f.read_text()) or {}
        deep_update(data, TINY_OVERRIDES.get(f.name, {}))
        (dst / f.name).write_text(yaml.safe_dump(data, sort_keys=False))


def tiny_repo(dst: Path) -> dict:
    """The working tree (tracked and new files, not ignored ones) copied to `dst` with the tiny params, and the
    environment a CLI subprocess there needs (local MLflow store, no outside Prefect API). No git init."""
    import subprocess
    import sys

    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                           text=True, check=True).stdout.split()
    for f in files:
        if (REPO / f).is_file():
            (dst / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / f, dst / f)
    write_tiny_params(dst / "params")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "PWD": str(dst),
           "MLFLOW_TRACKING_URI": f"sqlite:///{dst / 'mlflow.db'}", "PREFECT_LOGGING_LEVEL": "WARNING"}
    env.pop("PREFECT_API_URL", None)
    return env


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    """models/base for source `tiny`: 2 layers, hidden 64, SmolLM2's real tokenizer and chat template."""
    from refinery.config import BaseModelParams
    from refinery.modeling.base_import import import_base

    out = tmp_path_factory.mktemp("tiny") / "base"
    model, tok = import_base(BaseModelParams(source="tiny"), seed=0, trust_remote_code=False)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def prefect_server():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture
def project(tmp_path, monkeypatch, tiny_base) -> Path:
    """A scratch project folder (cwd): tiny params, the demo data, models/base = the tiny model."""
    write_tiny_params(tmp_path / "params")
    shutil.copytree(REPO / "data" / "demo", tmp_path / "data" / "demo",
                    ignore=shutil.ignore_patterns("*.py", "*.md"))
    shutil.copytree(tiny_base, tmp_path / "models" / "base")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    return tmp_path


@pytest.fixture(scope="session")
def prepared(tmp_path_factory, tiny_base) -> Path:
    """data/prepared from the demo data, built once per session (prepare is deterministic)."""
    from refinery.config import load_params
    from refinery.data.prepare import prepare_all
    from refinery.modeling.loading import load_tokenizer

    root = tmp_path_factory.mktemp("prepared")
    write_tiny_params(root / "params")
    cwd = os.getcwd()
    os.chdir(REPO)  # dataset paths in params are relative to the project root
    try:
        prepare_all(load_params("prepare", root / "params"), load_tokenizer(tiny_base), 2048, 42, root / "out")
    finally:
        os.chdir(cwd)
    return root / "out"


# ---- the reliability numbers (issue: "the suite prints how many crash points, bad inputs, faults") -----
# Which tests count: a file (`test_x.py`), one test function (`test_x.py::name`, all its parameters), or a marker.
# Only tests that really crash a run, feed bad input, or break a server count; a params file that loads fine
# is not a bad input. Files owned by others are selected by test name, so a rename drops a test from the count
# (the summary then names the entry that matched nothing).
RELIABILITY = {
    "crash points": ("test_crash_resume.py", "test_resume.py",
                     "test_ppo.py::test_resume_continues_without_repeating_steps"),
    "bad inputs": ("test_bad_inputs.py",
                   "test_records.py::test_bad_record_error_names_file_line_field",
                   "test_records.py::test_skip_mode_drops_and_reports",
                   "test_records.py::test_empty_and_missing_files",
                   "test_records.py::test_preference_pair_must_differ",
                   "test_records.py::test_too_long_is_reported_with_field",
                   "test_config.py::test_typo_key_names_file_and_key",
                   "test_config.py::test_wrong_type_and_negative_lr",
                   "test_config.py::test_unknown_method_lists_known_ones",
                   "test_config.py::test_missing_file_and_bad_yaml",
                   "test_config.py::test_overrides_are_validated",
                   "test_config.py::test_qlora_refused_without_cuda",
                   "test_prepare.py::test_bad_record_stops_and_writes_nothing",
                   "@bad_input"),
    "fault cases": ("test_faults.py::test_unreachable_mlflow_stops_the_stage_before_training",
                    "test_faults.py::test_unreachable_mlflow_is_one_line_and_exit_2",
                    "test_faults.py::test_unreachable_mlflow_falls_back_to_the_local_store_when_asked",
                    "test_faults.py::test_mlflow_server_killed_mid_stage_the_stage_succeeds",
                    "test_faults.py::test_mlflow_server_killed_mid_stage_metrics_complete_and_no_record_lost",
                    "test_faults.py::test_stage_runs_with_an_unreachable_prefect_api"),
}


def pytest_configure(config):
    config.addinivalue_line("markers", "bad_input: the test feeds bad input (data, params, paths, CLI arguments); "
                                       "counted as a bad input in the reliability summary")


def reliability_match(entry: str, nodeid: str, keywords) -> bool:
    if entry.startswith("@"):
        return entry[1:] in keywords
    path, _, func = nodeid.split("[")[0].partition("::")
    file, sep, name = entry.partition("::")
    return path.rsplit("/", 1)[-1] == file and (not sep or func == name)


def pytest_terminal_summary(terminalreporter):
    """`reliability: crash points a/b passed, ...`; a known bug (a strict xfail) counts as not passed."""
    counts = {k: [0, 0] for k in RELIABILITY}
    seen: set[str] = set()
    for outcome in ("passed", "failed", "error", "xfailed", "skipped"):
        for rep in terminalreporter.stats.get(outcome, []):
            if outcome == "passed" and getattr(rep, "when", "call") != "call":
                continue
            for kind, entries in RELIABILITY.items():
                hits = [e for e in entries if reliability_match(e, rep.nodeid, getattr(rep, "keywords", {}))]
                seen.update(hits)
                if hits and outcome != "skipped":
                    counts[kind][0] += 1
                    counts[kind][1] += outcome == "passed"
    if any(total for total, _ in counts.values()):
        terminalreporter.write_line("reliability: " + ", ".join(f"{kind} {ok}/{total} passed"
                                                                for kind, (total, ok) in counts.items()))
        ran = {rep.nodeid.split("::")[0].rsplit("/", 1)[-1] for reps in terminalreporter.stats.values()
               for rep in reps if hasattr(rep, "nodeid")}
        missing = [e for entries in RELIABILITY.values() for e in entries
                   if "::" in e and e.split("::")[0] in ran and e not in seen]
        if missing and not terminalreporter.config.option.keyword and not terminalreporter.config.option.markexpr:
            terminalreporter.write_line("reliability: no test ran for " + ", ".join(missing))


def free_port() -> int:
    """A port nothing listens on (yet) on 127.0.0.1."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def answers(url: str, timeout: float = 5) -> bool:
    """The URL answers 200 (a server's health endpoint)."""
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status == 200
    except Exception:
        return False

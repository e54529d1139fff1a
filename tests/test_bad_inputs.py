"""Every bad input from tests/bad_inputs/ through the real CLI: a one-line `error:` naming the file, line and
field, exit code 2, no traceback, and nothing written."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent / "bad_inputs"


@pytest.fixture(scope="module")
def api_env(prefect_server):
    """The test Prefect server's URL, so each CLI subprocess uses it instead of starting its own."""
    from prefect.settings import get_current_settings

    return {"PREFECT_API_URL": str(get_current_settings().api.url)}


def data_case(kind: str, bad: str):
    """Point one data set of params/prepare.yaml at a bad file."""
    def setup(root: Path):
        text = (root / "params" / "prepare.yaml").read_text()
        target = {"corpus": "data/demo/corpus.jsonl", "sft": "data/demo/sft/summarize.jsonl",
                  "preferences": "data/demo/preferences.jsonl", "prompts": "data/demo/prompts.jsonl"}[kind]
        shutil.copy(HERE / bad, root / "data" / bad)
        (root / "params" / "prepare.yaml").write_text(text.replace(target, f"data/{bad}"))
    return setup


def params_case(stage: str, bad: str):
    def setup(root: Path):
        shutil.copy(HERE / bad, root / "params" / f"{stage}.yaml")
    return setup


def base_case(path_of):
    def setup(root: Path):
        (root / "params" / "base_model.yaml").write_text(f"source: local\npath: {path_of(root)}\n")
        shutil.rmtree(root / "models" / "base")
    return setup


def no_template(root: Path) -> str:
    folder = root / "no_template"
    shutil.copytree(root / "models" / "base", folder)
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    return str(folder)


def truncate_base_weights(root: Path) -> None:
    weights = root / "models" / "base" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])  # an interrupted copy or download


CASES = {
    "malformed_json": ("prepare", data_case("corpus", "malformed_json.jsonl"),
                       "data/malformed_json.jsonl:2: malformed JSON", "data/prepared"),
    "missing_field": ("prepare", data_case("sft", "missing_field.jsonl"),
                      "data/missing_field.jsonl:1: field 'response': missing", "data/prepared"),
    "wrong_type": ("prepare", data_case("sft", "wrong_type.jsonl"),
                   "data/wrong_type.jsonl:1: field 'response': expected a string, got int", "data/prepared"),
    "empty_file": ("prepare", data_case("corpus", "empty.jsonl"), "data/empty.jsonl: empty data set", "data/prepared"),
    "non_utf8": ("prepare", data_case("corpus", "non_utf8.jsonl"), "data/non_utf8.jsonl:1: not valid UTF-8",
                 "data/prepared"),
    "chosen_equals_rejected": ("prepare", data_case("preferences", "same_pair.jsonl"),
                               "data/same_pair.jsonl:1: field 'rejected': identical to 'chosen'", "data/prepared"),
    "prompt_longer_than_context": ("prepare", data_case("prompts", "too_long_prompt.jsonl"),
                                   "data/too_long_prompt.jsonl:1: field 'prompt'", "data/prepared"),
    "missing_data_file": ("prepare", lambda r: (r / "data" / "demo" / "prompts.jsonl").unlink(),
                          "data/demo/prompts.jsonl: data file not found", "data/prepared"),
    "unknown_method": ("dapt", params_case("dapt", "unknown_method.yaml"), "unknown method 'loraa'", "models/dapt"),
    "negative_lr": ("dapt", params_case("dapt", "negative_lr.yaml"), "key 'training.lr'", "models/dapt"),
    "duplicate_key": ("dapt", params_case("dapt", "duplicate_key.yaml"),
                      "dapt.yaml:2: not valid YAML (duplicate key 'method' (first on line 1))", "models/dapt"),
    "truncated_weights": ("dapt", truncate_base_weights,
                          "models/base/model.safetensors: not a complete safetensors file", "models/dapt"),
    "liger_without_cuda": ("dapt", params_case("dapt", "liger_on_cpu.yaml"),
                           "dapt.yaml: training.use_liger_kernel: Liger's kernels need a CUDA GPU", "models/dapt"),
    "padding_free_virtual_tokens": ("dapt", params_case("dapt", "padding_free_virtual_tokens.yaml"),
                                    "dapt.yaml: padding_free: method prompt trains on padded examples", "models/dapt"),
    "typo_key": ("dapt", params_case("dapt", "typo_key.yaml"), "key 'training.max_stepz': unknown key",
                 "models/dapt"),
    "base_without_weights": ("base_model", base_case(lambda r: HERE / "no_weights"),
                             "no *.safetensors weights (found only pickle weights", "models/base"),
    "base_path_missing": ("base_model", base_case(lambda r: r / "nowhere"), "folder does not exist", "models/base"),
    "tokenizer_without_chat_template": ("base_model", base_case(no_template), "tokenizer has no chat template",
                                        "models/base"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_clear_line(case, project, api_env):
    stage, setup, expected, output = CASES[case]
    setup(project)
    env = {**os.environ, **api_env, "MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow.db'}",
           "PYTHONPATH": str(Path(__file__).parents[1])}
    proc = subprocess.run([sys.executable, "-m", f"flows.{stage}"], cwd=project, env=env, capture_output=True,
                          text=True, timeout=300)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(errors) == 1 and expected in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not (project / output).exists()
    leftovers = [p for p in (project / output).parent.glob(f".{Path(output).name}*")]
    assert not leftovers

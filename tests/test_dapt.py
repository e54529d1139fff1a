"""Stage dapt end to end on the tiny model: loss goes down, the output loads with plain transformers/peft,
metrics follow the contract, and the MLflow run holds the same numbers."""
import json
import shutil

import mlflow
import pytest
import torch
from transformers import AutoModelForCausalLM

from flows.dapt import dapt_flow


@pytest.fixture
def dapt_project(project, prepared):
    shutil.copytree(prepared, project / "data" / "prepared")
    return project


def run_dapt(method: str, **overrides):
    return dapt_flow(params_dir="params", overrides={"method": method, **overrides})


@pytest.mark.parametrize("method", ["full", "lora"])
def test_dapt_lowers_validation_loss(dapt_project, prefect_server, method):
    metrics = run_dapt(method, **({"training.lr": 0.02} if method == "lora" else {}))
    from refinery.ops import metrics_contract

    on_disk = json.loads((dapt_project / "reports" / "dapt" / "evaluation.json").read_text())  # the whole dict
    assert on_disk == json.loads(json.dumps(metrics))
    metrics_contract.validate("dapt", on_disk)
    headline = json.loads((dapt_project / "metrics" / "dapt.json").read_text())
    assert headline == metrics_contract.headline("dapt", on_disk)
    assert on_disk["after"]["eval_loss"] < on_disk["before"]["eval_loss"] - 0.05
    assert on_disk["train"]["steps"] == 6 and on_disk["train"]["method"] == method
    assert 0 < on_disk["train"]["trainable_percent"] <= 100
    if method == "lora":
        assert on_disk["train"]["trainable_percent"] < 10

    out = dapt_project / "models" / "dapt"
    model = AutoModelForCausalLM.from_pretrained(out)  # plain transformers, no project code
    assert not any(out.glob("*.bin")) and any(out.glob("*.safetensors"))
    assert json.loads((out / "refinery_manifest.json").read_text())["stage"] == "dapt"
    ids = torch.tensor([[1, 2, 3]])
    assert torch.isfinite(model(ids).logits).all()
    if method == "lora":
        from peft import PeftModel

        base = AutoModelForCausalLM.from_pretrained(dapt_project / "models" / "base")
        peft_model = PeftModel.from_pretrained(base, out / "adapter")
        assert torch.allclose(peft_model(ids).logits, model(ids).logits, atol=1e-4)  # merge is faithful

    assert (dapt_project / "plots" / "dapt" / "train.csv").read_text().startswith("step,")
    run = mlflow.search_runs(experiment_names=["llm-refinery"], order_by=["start_time DESC"]).iloc[0]
    assert run["metrics.after.eval_loss"] == pytest.approx(on_disk["after"]["eval_loss"])
    assert run["tags.method"] == method and run["params.dapt.method"] == method


def test_prompt_learning_method_trains(dapt_project, prefect_server):
    """A virtual-token method runs unpacked and saves a peft adapter that plain peft loads."""
    metrics = run_dapt("ptuning_v2", **{"training.lr": 0.03})
    assert metrics["after"]["eval_loss"] < metrics["before"]["eval_loss"]
    from peft import AutoPeftModelForCausalLM

    model = AutoPeftModelForCausalLM.from_pretrained(dapt_project / "models" / "dapt")
    assert model.peft_config["default"].num_virtual_tokens == 16


def test_failed_stage_keeps_previous_output(dapt_project, prefect_server):
    run_dapt("lora")
    out = dapt_project / "models" / "dapt"
    before = sorted(p.name for p in out.iterdir())
    state = dapt_flow(params_dir="params", overrides={"method": "lora", "training.max_steps": 2},
                      data_dir="does/not/exist", return_state=True)
    assert state.is_failed() and "does/not/exist" in state.message
    assert sorted(p.name for p in out.iterdir()) == before
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".dapt")]


def test_dapt_trains_padding_free(dapt_project, prefect_server):
    """`padding_free: true`: the packed rows of a batch joined into one row (refinery/data/packing.py FlatCollator);
    the evaluation keeps one row per block (its per-row losses feed the paired CI)."""
    run_dapt("lora", **{"training.lr": 0.02, "padding_free": True})
    on_disk = json.loads((dapt_project / "reports" / "dapt" / "evaluation.json").read_text())
    assert on_disk["after"]["eval_loss"] < on_disk["before"]["eval_loss"] - 0.05
    assert on_disk["train"]["steps"] == 6

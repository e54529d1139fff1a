"""The metrics contract (refinery/ops/metrics_contract.py): a stage that leaves out a required key fails its
write naming the stage and the dotted key; metrics/<stage>.json keeps only the headline and stays small; the
whole evaluation goes to reports/<stage>/evaluation.json and every number to MLflow.

The real stage outputs are checked where the stages run: `StageRecord.write_metrics` validates every write, so
tests/test_dapt.py, test_sft.py, test_reward.py (reward and ppo) and test_faults.py (base_model) fail on a
contract break; the prepare report is checked here."""
import json
import re
from pathlib import Path

import mlflow
import pytest

from refinery.config import load_params
from refinery.ops import metrics_contract as mc
from refinery.ops.metrics_contract import MetricsContractError
from refinery.ops.tracking import StageRecord

REPO = Path(__file__).resolve().parents[1]
HEADLINE_MAX = 30  # numbers per metrics/<stage>.json: a `dvc metrics show` a terminal can hold


@pytest.fixture
def record_root(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    return tmp_path


def test_every_stage_that_writes_metrics_has_a_contract():
    found = set()
    for flow in (REPO / "flows").glob("*.py"):
        source = flow.read_text()
        if "write_metrics(" in source:
            found |= set(re.findall(r'(?:StageRecord|open_stage_record)\(\s*"(\w+)"', source))
    assert {"base_model", "prepare", "dapt", "reward", "ppo", "compare"} <= found  # sft: its `stage` argument
    for stage in found:
        mc.contract_for(stage)
    assert mc.contract_for("compare-ptuning-v2") is mc.CONTRACTS["sft"]  # one method of the comparison
    with pytest.raises(MetricsContractError, match="'nope' has no metrics contract"):
        mc.contract_for("nope")


@pytest.mark.parametrize("stage", list(mc.CONTRACTS))
def test_smallest_valid_record_passes(stage):
    mc.validate(stage, mc.example(stage))


def test_missing_key_fails_the_write_naming_stage_and_dotted_key(record_root):
    dapt = mc.example("dapt")
    del dapt["after"]["perplexity"]
    with StageRecord("dapt", experiment="contract", params={}, run_name="t") as rec:
        with pytest.raises(MetricsContractError, match=r"stage 'dapt'.*'after\.perplexity' missing"):
            rec.write_metrics(dapt)
    assert not (record_root / "metrics" / "dapt.json").exists()  # nothing half-written
    assert not mc.evaluation_path("dapt", record_root).exists()


def test_wildcards_name_the_concrete_key_and_types_are_checked():
    sft = mc.example("sft", name="summarize")
    sft["after"]["tasks"]["which_module"] = {"loss": 1.0}
    with pytest.raises(MetricsContractError, match=r"'after\.tasks\.which_module\.score' missing"):
        mc.validate("sft", sft)
    sft["after"]["tasks"] = {}
    with pytest.raises(MetricsContractError, match=r"'after\.tasks\.\*' missing"):
        mc.validate("sft", sft)
    ppo = mc.example("ppo")
    ppo["eval"]["win_rate_vs_sft"] = "0.7"
    with pytest.raises(MetricsContractError, match=r"'eval\.win_rate_vs_sft' is '0\.7', expected a number"):
        mc.validate("ppo", ppo)
    ppo["eval"]["win_rate_vs_sft"], ppo["train"]["steps"] = 0.7, True
    with pytest.raises(MetricsContractError, match=r"'train\.steps' is True, expected an integer"):
        mc.validate("ppo", ppo)


def test_write_splits_headline_and_full_evaluation(record_root):
    reward = mc.example("reward")
    reward["eval"]["calibration"] = [{"bucket": 0, "accuracy": 1.0}]
    reward["eval"]["accuracy_by_task"] = {"which_module": 0.75}
    reward["train"]["final_loss"], reward["train"]["resumed_from_step"] = 0.6, None
    with StageRecord("reward", experiment="contract", params={}, run_name="t") as rec:
        path = rec.write_metrics(reward)
        run_id = rec.run_id
    assert path.resolve() == mc.metrics_path("reward", record_root)
    on_disk = json.loads(path.read_text())
    assert on_disk == mc.headline("reward", reward)
    assert on_disk["eval"]["accuracy"] == 0.5 and on_disk["train"]["resumed_from_step"] is None
    assert "calibration" not in on_disk["eval"] and "accuracy_by_task" not in on_disk["eval"]
    assert json.loads(mc.evaluation_path("reward", record_root).read_text()) == reward
    assert mc.read_evaluation("reward", record_root) == reward
    logged = mlflow.get_run(run_id).data.metrics
    assert logged["eval.accuracy_by_task.which_module"] == 0.75  # MLflow still gets every number
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run_id)}
    assert {"reward.json", "evaluation.json"} <= artifacts


def test_read_evaluation_falls_back_to_a_pre_split_metrics_file(tmp_path):
    assert mc.read_evaluation("sft", tmp_path) is None
    mc.metrics_path("sft", tmp_path).parent.mkdir()
    mc.metrics_path("sft", tmp_path).write_text(json.dumps({"after": {"mean_score": 0.2}}))
    assert mc.read_evaluation("sft", tmp_path) == {"after": {"mean_score": 0.2}}


def wide_record(stage: str, names: list[str]) -> dict:
    """A record with every required and headline key, each `*` expanded to all of `names`."""
    c = mc.contract_for(stage)
    out: dict = {}
    for dotted in (*c.required, *c.headline):
        for name in names if "*" in dotted else [None]:
            *parents, leaf = [name if p == "*" else p for p in dotted.split(".")]
            node = out
            for p in parents:
                node = node.setdefault(p, {})
            node[leaf] = {str: "text", list: [], int: 2}.get(c.required.get(dotted), 1.5)
    return out


def test_each_headline_stays_small():
    """Counted on the real demo's shape: its SFT tasks, prepared sets and compared methods."""
    tasks = list(load_params("sft", REPO / "params").tasks)
    datasets = load_params("prepare", REPO / "params").datasets
    sets = ["corpus", "preferences", "prompts", *(f"sft/{t}" for t in datasets.sft)]
    methods = list(load_params("compare", REPO / "params").methods)
    names = {"sft": tasks, "prepare": sets, "compare": methods}
    for stage in mc.CONTRACTS:
        full = wide_record(stage, names.get(stage, ["x"]))
        mc.validate(stage, full)
        count = mc.numeric_leaves(mc.headline(stage, full))
        assert 0 < count <= HEADLINE_MAX, f"{stage}: {count} numbers in metrics/{stage}.json"


def test_real_prepare_report_passes(tiny_base, tmp_path, monkeypatch):
    from refinery.data.prepare import prepare_all
    from refinery.modeling.loading import load_tokenizer

    monkeypatch.chdir(REPO)  # dataset paths in params are relative to the project root
    report = prepare_all(load_params("prepare", "params"), load_tokenizer(tiny_base), 2048, 42, tmp_path / "out")
    mc.validate("prepare", report)
    head = mc.headline("prepare", report)
    assert head["total"] == {k: report["total"][k] for k in ("kept", "train", "validation", "dropped")}
    assert "dropped_records" not in head["sets"]["corpus"] and mc.numeric_leaves(head) <= HEADLINE_MAX


def test_get_reads_a_dotted_key():
    m = {"after": {"eval_loss": 2.0}}
    assert mc.get(m, "after.eval_loss") == 2.0
    with pytest.raises(KeyError, match="after.perplexity"):
        mc.get(m, "after.perplexity")


# Code that reads a headline file (not the evaluation) and the keys it reads there: they must stay headline.
HEADLINE_READERS = {
    "sft": {  # flows/compare_methods.py (compare-<method>.json), flows/sweep.py, bench/bench.py, test_crash_resume
        "train.trainable_params", "train.trainable_percent", "train.peak_memory_mb", "train.seconds_per_step",
        "train.tokens_per_second", "train.final_loss", "train.seconds", "train.steps", "train.resumed_from_step",
        "after.mean_score", "before.mean_score"},  # per-task losses: compare reads the evaluation file
    "dapt": {"after.eval_loss", "before.eval_loss", "train.steps", "train.resumed_from_step", "train.seconds"},
    "reward": {"eval.margin", "train.steps", "train.resumed_from_step", "train.pairs_per_second"},
    "ppo": {"train.reward_last", "train.steps", "train.resumed_from_step", "eval.win_rate_vs_sft"},
}


@pytest.mark.parametrize("stage", list(HEADLINE_READERS))
def test_keys_read_from_metrics_files_are_headline(stage):
    assert HEADLINE_READERS[stage] <= set(mc.contract_for(stage).headline)

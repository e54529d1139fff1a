"""The pipeline flow and dvc.yaml agree: one order, defined in dvc.yaml; overrides and slices are checked."""
from pathlib import Path

import pytest
import yaml

from flows.pipeline import select
from flows.report import build_report
from refinery.config import apply_overrides
from refinery.errors import UserError
from refinery.ops import metrics_contract
from refinery.ops.dag import stage_order

REPO = Path(__file__).resolve().parents[1]


def test_order_is_dvc_yaml_and_the_design():
    order = stage_order(REPO)
    assert set(order) == set(yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"])
    assert order == ["base_model", "prepare", "dapt", "sft", "reward", "ppo", "report"]  # docs/DESIGN.md's stage map
    # the method comparison is its own command (`make compare`, experiments/compare/), not a stage
    assert "compare" not in order


def test_every_stage_cmd_is_its_flow():
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    for name, spec in stages.items():
        module = spec["cmd"].split()[-1]
        assert (REPO / (module.replace(".", "/") + ".py")).is_file(), name
        assert f"{module.replace('.', '/')}.py" in spec["deps"], f"{name}: its flow file is not a dep"


def test_each_stage_links_to_its_own_flow_name():
    """The pipeline creates each stage's flow run (so it shows as a subflow) under the stage flow's name."""
    import re

    from refinery.ops.dag import flow_name

    for name, spec in yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"].items():
        source = (REPO / (spec["cmd"].split()[-1].replace(".", "/") + ".py")).read_text()
        assert re.search(r'@flow\(name="([^"]+)"', source).group(1) == flow_name(name), name


def test_locked_stage_hash_follows_deps_and_params_not_outs(tmp_path):
    from refinery.ops.dag import locked_stage_hash

    entry = {"cmd": "python -m flows.sft", "deps": [{"path": "data", "md5": "a"}],
             "params": {"params/sft.yaml": {"lr": 1}}, "outs": [{"path": "models/sft", "md5": "x"}]}
    lock = tmp_path / "dvc.lock"
    assert locked_stage_hash("sft", tmp_path) is None
    lock.write_text(yaml.safe_dump({"schema": "2.0", "stages": {"sft": entry}}))
    first = locked_stage_hash("sft", tmp_path)
    entry["outs"][0]["md5"] = "y"
    lock.write_text(yaml.safe_dump({"schema": "2.0", "stages": {"sft": entry}}))
    assert locked_stage_hash("sft", tmp_path) == first
    entry["params"]["params/sft.yaml"]["lr"] = 2
    lock.write_text(yaml.safe_dump({"schema": "2.0", "stages": {"sft": entry}}))
    assert locked_stage_hash("sft", tmp_path) != first


def test_select_slices_and_refuses_unknown():
    order = ["a", "b", "c", "d"]
    assert select(order, "b", "c") == ["b", "c"] and select(order, None, None) == order
    with pytest.raises(UserError, match="unknown stage 'x'"):
        select(order, "x", None)
    with pytest.raises(UserError, match="comes after"):
        select(order, "d", "a")


def test_overrides_keep_comments_and_are_validated(tmp_path, monkeypatch):
    (tmp_path / "sft.yaml").write_text((REPO / "params" / "sft.yaml").read_text())
    monkeypatch.chdir(tmp_path)
    apply_overrides({"sft": {"method": "ia3", "training.lr": 0.01}}, params_dir=str(tmp_path))
    text = (tmp_path / "sft.yaml").read_text()
    assert "method: ia3" in text and "# " in text and "lr: 0.01" in text
    with pytest.raises(UserError, match="unknown method"):
        apply_overrides({"sft": {"method": "nope"}}, params_dir=str(tmp_path))
    assert "method: ia3" in (tmp_path / "sft.yaml").read_text()  # a refused override writes nothing


def test_report_flags_over_optimisation():
    ppo = metrics_contract.example("ppo")
    ppo["train"].update({"reward_first": 0.1, "reward_last": 0.9, "kl_last": 1.0, "target_kl": 1.0, "steps": 3})
    ppo["eval"].update({"reward_policy": 2.0, "reward_sft": 1.0, "reference_score_policy": 0.1,
                        "reference_score_sft": 0.5, "win_rate_vs_sft": 0.9, "kl": 2.0})
    ppo["eval"]["reference_score_change"] = {"estimate": -0.4, "ci_low": -0.5, "ci_high": -0.3, "n": 50,
                                             "null": 0.0, "verdict": "worse"}
    metrics_contract.validate("ppo", ppo)
    text, _ = build_report({"ppo": ppo})
    assert "Warning: reward over-optimisation" in text and "0.9000" in text
    # a fall inside the noise is reported with its CI, not as over-optimisation
    ppo["eval"]["reference_score_change"].update({"ci_high": 0.05, "verdict": "no significant change"})
    text = build_report({"ppo": ppo})[0]
    assert "Warning" not in text and "no sign of reward over-optimisation" in text
    ppo["eval"]["reference_score_policy"] = 0.6
    assert "over-optimisation" not in build_report({"ppo": ppo})[0]


def test_report_reads_only_what_the_contract_promises():
    """The report builds from the smallest record each stage's contract allows (sft without `before`)."""
    text, _ = build_report({stage: metrics_contract.example(stage) for stage in metrics_contract.CONTRACTS})
    for section in ("## DAPT", "## SFT", "## Reward model", "## PPO"):
        assert section in text
    assert "## Method comparison" not in text and "`make compare`" in text  # a command, not a stage


def test_dvc_yaml_records_what_the_contract_says():
    """metrics/<stage>.json is a DVC metric of a stage with a contract; its whole evaluation is a `cache: false`
    out of that stage, and the report depends on those files."""
    def entries(items):  # dvc.yaml's `- path` or `- path: {options}` -> {path: options}
        return dict(next(iter(i.items())) if isinstance(i, dict) else (i, None) for i in items or [])

    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    for name, spec in stages.items():
        metrics = list(entries(spec.get("metrics")))
        if name == "report":
            assert not metrics
            continue
        assert metrics == [str(metrics_contract.metrics_path(name))], name
        metrics_contract.contract_for(name)
        outs = {k: v or {} for k, v in entries(spec["outs"]).items()}
        assert outs[str(metrics_contract.evaluation_path(name))].get("cache") is False, name
    report_deps = stages["report"]["deps"]
    for name in ("dapt", "sft", "reward", "ppo"):
        assert str(metrics_contract.evaluation_path(name)) in report_deps, name
    assert not [d for d in report_deps if "compare" in d]  # experiments/compare/ is not DVC-tracked


def test_code_cites_only_the_repository_design():
    """docs/DESIGN.md is the design; nothing cites a design document outside the repository."""
    import re

    assert (REPO / "docs/DESIGN.md").is_file()
    for folder in ("refinery", "flows", "tests"):
        for path in (REPO / folder).rglob("*.py"):
            for m in re.finditer(r"([\w./-]*)DESIGN\.md", path.read_text()):
                assert m.group(1) == "docs/", f"{path.relative_to(REPO)} cites {m.group(0)}, not docs/DESIGN.md"


def test_champion_rule():
    """Only a significant win becomes champion; a no-better policy stays challenger."""
    from refinery.config import RegistryArgs
    from refinery.ops.registry import decide

    args = RegistryArgs(min_win_rate=0.5, max_reference_drop=0.02)

    def ev(win, low, high, ref=0.40, ref_sft=0.40, ref_high=0.02):
        return {"win_rate_vs_sft": win, "reference_score_policy": ref, "reference_score_sft": ref_sft,
                "win_rate": {"estimate": win, "ci_low": low, "ci_high": high, "n": 60},
                "reference_score_change": {"estimate": ref - ref_sft, "ci_low": -0.05, "ci_high": ref_high}}

    assert decide(ev(0.70, 0.58, 0.81), None, args)[0] == "champion"
    verdict, why = decide(ev(0.60, 0.47, 0.72), None, args)  # a point estimate above 0.5 is not enough
    assert verdict == "challenger" and "CI lower bound" in why and "n=60" in why
    assert decide(ev(0.50, 0.38, 0.62), None, args)[0] == "challenger"  # no better than SFT
    champ = {"win_rate_vs_sft": "0.80", "reference_score_policy": "0.45"}
    assert decide(ev(0.65, 0.55, 0.76), champ, args)[0] == "challenger"  # significantly below the champion's 0.80
    assert decide(ev(0.70, 0.58, 0.81, ref_high=0.05), champ, args)[0] == "champion"  # within noise of the champion
    # reference agreement: CI upper bound 0.40 + 0.0 < 0.45 - 0.02 -> significantly worse
    assert decide(ev(0.70, 0.58, 0.81, ref_high=0.0), champ, args)[0] == "challenger"
    # a significant win on the reward model with a significant fall in reference agreement vs SFT: over-optimised
    fell = ev(0.66, 0.55, 0.77, ref=0.195, ref_sft=0.28, ref_high=-0.025)
    verdict, why = decide(fell, None, args)
    assert verdict == "challenger" and "reward over-optimisation" in why
    assert decide(fell, None, RegistryArgs(reference_must_hold=False))[0] == "champion"
    # a record from before CIs: the point estimates stand in
    assert decide({"win_rate_vs_sft": 0.7, "reference_score_policy": 0.4}, None, args)[0] == "champion"


def test_prefect_yaml_deployments_point_at_real_flows():
    import re

    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    for dep in spec["deployments"]:
        path, func = dep["entrypoint"].split(":")
        assert re.search(rf"^def {func}\(", (REPO / path).read_text(), re.M), dep["name"]
    pools = {d["name"]: d["work_pool"]["name"] for d in spec["deployments"]}
    assert pools["pipeline-weekly"] == "local-process" and pools["pipeline-k8s-gpu"] == "k8s-gpu"
    weekly = next(d for d in spec["deployments"] if d["name"] == "pipeline-weekly")
    assert weekly["schedules"][0]["cron"] == "0 3 * * 1"


def test_report_shows_reference_agreement_per_task():
    """A gain on one task can hide a loss on another: the report lists each task's change with its verdict."""
    ppo = metrics_contract.example("ppo")
    ppo["eval"]["reference_score_change_by_task"] = {
        "summarize": {"estimate": 0.02, "ci_low": -0.01, "ci_high": 0.05, "n": 24, "null": 0.0,
                      "verdict": "no significant change"},
        "which_module": {"estimate": -0.2, "ci_low": -0.3, "ci_high": -0.1, "n": 26, "null": 0.0, "verdict": "worse"}}
    text = build_report({"ppo": ppo})[0]
    row = next(line for line in text.splitlines() if "which_module prompts" in line)
    assert "| 26 |" in row and "-0.2000 [-0.3000, -0.1000]" in row and row.endswith("| worse |")

"""The alignment stages' dvc.yaml blocks and the report's deps, written from params/pipeline.yaml `alignment`.

Which of ppo, dpo and grpo the pipeline runs is a params choice, and `dvc repro` must run the same set: DVC has
no switch to leave a stage out of `repro`, so a stage that is not selected is not in dvc.yaml at all. Every
alignment stage has the same shape (a flow, the shared code, its inputs, models/<stage>, its evaluation, its
metrics and a training plot), so the blocks are generated here, once, from that shape; `sync` adds the selected
ones (before `report`), removes the others, and points the report's deps at what the selected stages write.
A hand edit inside a selected block is kept only if it matches the generated one: `sync` rewrites it, and
tests/test_dvc_deps.py checks every stage's import closure against the generated deps.
"""
from __future__ import annotations

from refinery.config import ALIGNMENT_STAGES

# what every alignment stage imports that can change its outputs (the import-closure test keeps this honest)
SHARED_CODE = ["refinery/rlhf", "refinery/config.py", "refinery/atomic.py", "refinery/ops/metrics_contract.py",
               "refinery/modeling", "refinery/data", "refinery/train", "refinery/evaluation"]
INPUTS = {  # models/reward: ppo and grpo train against it; all three are judged by it. ppo and grpo read
    # data/prepared/preferences when params `prompt_sources` lists it (a dep whatever the params say: dvc.yaml is static)
    "ppo": ["models/sft", "models/reward", "data/prepared/prompts", "data/prepared/preferences", "data/prepared/general"],
    "dpo": ["models/sft", "models/reward", "data/prepared/preferences", "data/prepared/prompts",
            "data/prepared/general"],
    "grpo": ["models/sft", "models/reward", "data/prepared/prompts", "data/prepared/preferences",
             "data/prepared/general"],
}
PLOT_Y = {"ppo": "reward_mean", "dpo": "loss", "grpo": "reward"}  # the training curve dvc plots shows
REPORT_CODE = ["flows/report.py", "refinery/config.py", "refinery/atomic.py", "refinery/data", "refinery/modeling",
               "refinery/evaluation", "refinery/ops/registry.py", "refinery/ops/metrics_contract.py",
               "refinery/ops/policy_pyfunc.py", "refinery/ops/report_figures.py"]
REPORT_FIXED = ["reports/dapt/evaluation.json", "reports/sft/evaluation.json", "reports/reward/evaluation.json"]


def _uncached() -> dict:
    return {"cache": False}


def stage_block(stage: str) -> dict:
    """The dvc.yaml block of one alignment stage (plain dicts and lists, in dvc.yaml's key order)."""
    return {"cmd": f"python -m flows.{stage}",
            "deps": [f"flows/{stage}.py", *SHARED_CODE, *INPUTS[stage]],
            "params": [{"params/base.yaml": None}, {f"params/{stage}.yaml": None}],
            "outs": [{f"models/{stage}": {"cache": False, "persist": True}},
                     {f"reports/{stage}/evaluation.json": _uncached()}],
            "metrics": [{f"metrics/{stage}.json": _uncached()}],
            "plots": [{f"plots/{stage}/train.csv": {"cache": False, "x": "step", "y": PLOT_Y[stage]}}]}


def report_deps(selected: list[str]) -> list[str]:
    """The report reads every earlier stage's evaluation and, per selected alignment stage, its policy (the
    registry registers it), its evaluation and its training curve."""
    return [*REPORT_CODE, *(f"models/{s}" for s in selected), *(f"plots/{s}/train.csv" for s in selected),
            *REPORT_FIXED, *(f"reports/{s}/evaluation.json" for s in selected)]


def report_params() -> list:
    return [{"params/report.yaml": None}, {"params/pipeline.yaml": ["alignment"]}]


def _plain(node):
    """A ruamel node as plain Python (for comparing a block in dvc.yaml with the generated one)."""
    if isinstance(node, dict):
        return {str(k): _plain(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_plain(v) for v in node]
    return node


def sync_stages(stages, selected: list[str]) -> list[str]:
    """Make the `stages` mapping of dvc.yaml (a ruamel CommentedMap, edited in place) hold exactly the selected
    alignment stages, each as generated, before `report`; returns what changed."""
    from ruamel.yaml.comments import CommentedMap

    changes = []
    for stage in ALIGNMENT_STAGES:
        if stage not in selected and stage in stages:
            del stages[stage]
            changes.append(f"{stage}: removed (not in params/pipeline.yaml alignment)")
    for stage in selected:
        want = stage_block(stage)
        if stage in stages and _plain(stages[stage]) == want:
            continue
        changes.append(f"{stage}: {'rewritten' if stage in stages else 'added'} (params/pipeline.yaml alignment)")
        if stage in stages:
            del stages[stage]
        at = list(stages).index("report") if "report" in stages else len(stages)
        stages.insert(at, stage, CommentedMap(want))
    for key in [*selected, "report"]:  # a blank line before each block (dvc_deps collapses doubled ones)
        if changes and key in stages:
            stages.yaml_set_comment_before_after_key(key, before="\n", indent=2)
    if "report" in stages:
        report = stages["report"]
        for key, want in (("deps", report_deps(selected)), ("params", report_params())):
            if _plain(report.get(key)) != want:
                report[key] = want
                changes.append(f"report: {key} follow the alignment stages {selected}")
    return changes

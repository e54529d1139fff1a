"""The metrics contract: what every stage records, as code (docs/DESIGN.md explains it; this file decides it).

A stage hands `StageRecord.write_metrics` one dict, its whole evaluation. That dict must hold the stage's
`required` keys (a missing one is a bug in our code: `MetricsContractError`, naming the stage and the dotted
key); extra keys are welcome. From it come three views of the same numbers:

    metrics/<stage>.json              the stage's `headline` keys only: what `dvc metrics show/diff` prints
    reports/<stage>/evaluation.json   the whole dict (per-task tables, calibration, mixture...): what the
                                      report, the registry and people read (a DVC out, `cache: false`)
    the stage's MLflow run            every number of the whole dict, flattened with dots

Keys are dotted paths into the nested dict; `*` stands for every key of a mapping (a task, a data set, a
method), e.g. `after.tasks.*.score`. Users script against these names: add keys freely, rename none.
The method comparison runs the `sft` flow once per method under the stage name `compare-<method>`, so those
records follow the `sft` contract.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

CONTRACT_FILE = "refinery/ops/metrics_contract.py"


class MetricsContractError(ValueError):
    """A stage wrote metrics that break its contract: a bug in the stage's code, not in the user's input."""


@dataclass(frozen=True)
class StageMetrics:
    """`required`: dotted key -> type its value must have (`float` = any number, `int` = a whole number).
    `headline`: the dotted keys copied (where present) to metrics/<stage>.json; kept to ~25 numbers."""

    required: dict[str, type]
    headline: tuple[str, ...]
    about: str = ""


# -- names other code reads ------------------------------------------------------------------------------
# The PPO `eval` block: the registry's champion rule and model-version tags, the report's PPO table.
PPO_EVAL = "eval"
WIN_RATE_VS_SFT = "win_rate_vs_sft"
REFERENCE_SCORE_POLICY = "reference_score_policy"
REFERENCE_SCORE_SFT = "reference_score_sft"
REWARD_POLICY = "reward_policy"
REWARD_SFT = "reward_sft"
KL = "kl"

# The `train` block every causal-LM / reward training stage writes (refinery/train/stage_io.py `train_block`).
_TRAIN_REQUIRED: dict[str, type] = {
    "train.method": str, "train.steps": int, "train.tokens_per_second": float, "train.peak_memory_mb": float,
    "train.trainable_params": int, "train.trainable_percent": float, "train.seconds": float,
    "train.seconds_per_step": float,
}
_TRAIN_HEADLINE = (*_TRAIN_REQUIRED, "train.final_loss", "train.resumed_from_step")

def _ci(block: str) -> dict[str, type]:
    """A comparison block written by refinery/evaluation/stats.py: n, estimate, 95% CI and verdict."""
    return {f"{block}.n": int, f"{block}.estimate": float, f"{block}.ci_low": float, f"{block}.ci_high": float,
            f"{block}.verdict": str}


def _ci_headline(block: str) -> tuple[str, ...]:
    return (f"{block}.estimate", f"{block}.ci_low", f"{block}.ci_high", f"{block}.verdict")


# the policy against its SFT policy on held-out prompts (refinery/rlhf/policy_eval.py): every alignment stage
_POLICY_EVAL_REQUIRED: dict[str, type] = {
    **{f"{PPO_EVAL}.{k}": float for k in (REWARD_POLICY, REWARD_SFT, WIN_RATE_VS_SFT, REFERENCE_SCORE_POLICY,
                                          REFERENCE_SCORE_SFT, KL)},
    f"{PPO_EVAL}.n": int, **_ci(f"{PPO_EVAL}.win_rate"), **_ci(f"{PPO_EVAL}.reference_score_change")}
_POLICY_EVAL_HEADLINE = (
    *(f"{PPO_EVAL}.{k}" for k in (REWARD_POLICY, REWARD_SFT, WIN_RATE_VS_SFT, REFERENCE_SCORE_POLICY,
                                  REFERENCE_SCORE_SFT, KL, "n")),
    f"{PPO_EVAL}.win_rate.ci_low", f"{PPO_EVAL}.win_rate.ci_high",
    f"{PPO_EVAL}.win_rate_greedy.estimate", f"{PPO_EVAL}.win_rate_greedy.verdict",
    *_ci_headline(f"{PPO_EVAL}.reference_score_change"))

# general-domain perplexity before/after the stage (refinery/evaluation/forgetting.py), when prepare has a
# general set: optional, so its keys are headline-only
_RETENTION_HEADLINE = ("general_retention.perplexity_change", "general_retention.verdict")


CONTRACTS: dict[str, StageMetrics] = {
    "base_model": StageMetrics(
        about="the imported base model",
        required={"source": str, "parameters": int, "tokenizer_hash": str},
        headline=("source", "parameters", "layers", "hidden_size", "context", "tokenizer_hash")),
    "prepare": StageMetrics(
        about="records kept and dropped per data set (the why of each drop: the evaluation file)",
        required={"sets.*.kept": int, "sets.*.dropped": int, "total.kept": int, "total.train": int,
                  "total.validation": int, "total.dropped": int},
        headline=("max_length", "total.kept", "total.train", "total.validation", "total.dropped",
                  "sets.*.kept", "sets.*.dropped")),
    "dapt": StageMetrics(
        about="held-out causal-LM loss before/after domain-adaptive pretraining",
        required={"before.eval_loss": float, "before.perplexity": float, "after.eval_loss": float,
                  "after.perplexity": float, **_ci("comparison.eval_loss_change"), **_TRAIN_REQUIRED},
        headline=("before.eval_loss", "before.perplexity", "after.eval_loss", "after.perplexity",
                  *_ci_headline("comparison.eval_loss_change"), "early_stopping.best_step", *_TRAIN_HEADLINE,
                  *_RETENTION_HEADLINE)),
    "sft": StageMetrics(
        about="per-task held-out loss and score before/after SFT (`before` only with eval.before: true)",
        required={"after.mean_score": float, "after.tasks.*.loss": float, "after.tasks.*.score": float,
                  **_TRAIN_REQUIRED},
        headline=("before.mean_score", "after.mean_score", "after.tasks.*.score",
                  *_ci_headline("comparison.*.score_change"), "early_stopping.best_step", *_TRAIN_HEADLINE,
                  *_RETENTION_HEADLINE)),
    "compare": StageMetrics(
        about="one SFT per method: quality against cost (the full rows: the evaluation file)",
        required={"methods.*.status": str},
        headline=("methods.*.score", "methods.*.trainable_percent", "methods.*.peak_memory_mb")),
    "reward": StageMetrics(
        about="reward-model pairwise accuracy and margin on held-out pairs, before/after training",
        required={"eval.accuracy": float, "eval.margin": float, "eval.n": int, "eval.calibration": list,
                  "before.accuracy": float, "before.margin": float, **_TRAIN_REQUIRED,
                  "train.pairs_per_second": float, **_ci("comparison.accuracy"), **_ci("comparison.accuracy_change")},
        headline=("before.accuracy", "eval.accuracy", "eval.margin", "eval.n", "comparison.accuracy.ci_low",
                  "comparison.accuracy.ci_high", *_ci_headline("comparison.accuracy_change"), *_TRAIN_HEADLINE,
                  "train.pairs_per_second")),
    "ppo": StageMetrics(
        about="PPO training reward and KL; the policy against SFT on held-out prompts",
        required={"train.method": str, "train.steps": int, "train.reward_first": float, "train.reward_last": float,
                  "train.kl_last": float, "train.episodes_per_second": float, "train.peak_memory_mb": float,
                  **_POLICY_EVAL_REQUIRED},
        headline=("train.method", "train.steps", "train.reward_first", "train.reward_last", "train.kl_last",
                  "train.target_kl", "train.episodes_per_second", "train.tokens_per_second", "train.peak_memory_mb",
                  "train.trainable_percent", "train.resumed_from_step", *_POLICY_EVAL_HEADLINE,
                  *_ci_headline("train.reward_slope"), *_RETENTION_HEADLINE)),
    "dpo": StageMetrics(
        about="DPO on the preference pairs; the policy against SFT on held-out prompts (the evaluation ppo gets)",
        required={**_TRAIN_REQUIRED, "train.pairs_per_second": float, **_POLICY_EVAL_REQUIRED},
        headline=("train.method", "train.steps", "train.pairs_per_second", "train.peak_memory_mb",
                  "train.trainable_percent", "train.final_loss", "train.resumed_from_step", "train.beta",
                  "train.reward_accuracy_last", "early_stopping.best_step", *_POLICY_EVAL_HEADLINE,
                  *_RETENTION_HEADLINE)),
    "grpo": StageMetrics(
        about="GRPO on the prompts, rewarded by the reward model; the policy against SFT on held-out prompts",
        required={**_TRAIN_REQUIRED, "train.episodes_per_second": float, "train.reward_first": float,
                  "train.reward_last": float, **_POLICY_EVAL_REQUIRED},
        headline=("train.method", "train.steps", "train.episodes_per_second", "train.peak_memory_mb",
                  "train.trainable_percent", "train.reward_first", "train.reward_last", "train.kl_last",
                  "train.resumed_from_step", "train.num_generations", *_ci_headline("train.reward_slope"),
                  *_POLICY_EVAL_HEADLINE, *_RETENTION_HEADLINE)),
}


def contract_for(stage: str) -> StageMetrics:
    """The contract of `stage`; `compare-<method>` (one method of the comparison) is an `sft` run."""
    if stage in CONTRACTS:
        return CONTRACTS[stage]
    if stage.startswith("compare-"):
        return CONTRACTS["sft"]
    raise MetricsContractError(f"stage {stage!r} has no metrics contract: add it to CONTRACTS in {CONTRACT_FILE}")


# -- paths --------------------------------------------------------------------------------------------------
def metrics_path(stage: str, root: str | Path = ".") -> Path:
    """metrics/<stage>.json: the headline (DVC metrics)."""
    return Path(root) / "metrics" / f"{stage}.json"


def evaluation_path(stage: str, root: str | Path = ".") -> Path:
    """reports/<stage>/evaluation.json: everything the stage measured."""
    return Path(root) / "reports" / stage / "evaluation.json"


def read_evaluation(stage: str, root: str | Path = ".") -> dict | None:
    """The stage's whole evaluation; a record written before the split (metrics/<stage>.json held everything)
    is read from metrics/<stage>.json. None when the stage has not run."""
    for path in (evaluation_path(stage, root), metrics_path(stage, root)):
        if path.is_file():
            return json.loads(path.read_text())
    return None


# -- dotted keys --------------------------------------------------------------------------------------------
def _matches(d: Any, parts: list[str], path: tuple = ()) -> Iterator[tuple[tuple, Any, bool]]:
    """(path of the dict's own keys, value, found) for every path the dotted `parts` name in `d`; a path that
    stops early yields (the path up to the missing part, None, False)."""
    if not parts:
        yield path, d, True
        return
    head, rest = parts[0], parts[1:]
    if not isinstance(d, dict) or (head != "*" and head not in d):
        yield (*path, head), None, False
    elif head == "*" and not d:
        yield (*path, "*"), None, False
    else:
        for k in (list(d) if head == "*" else [head]):
            yield from _matches(d[k], rest, (*path, k))


def _dotted(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def get(metrics: dict, dotted: str) -> Any:
    """`get(m, "after.eval_loss")` is m["after"]["eval_loss"] (a KeyError naming the dotted key if absent)."""
    (_, value, found), = _matches(metrics, dotted.split("."))
    if not found:
        raise KeyError(dotted)
    return value


def _type_ok(value: Any, want: type) -> bool:
    if isinstance(value, bool):
        return want is bool
    if want is float:
        return isinstance(value, (int, float))
    return isinstance(value, want)


def validate(stage: str, metrics: dict) -> None:
    """Raise MetricsContractError naming the stage and every missing (or mistyped) required dotted key."""
    problems = []
    for dotted, want in contract_for(stage).required.items():
        for path, value, found in _matches(metrics, dotted.split(".")):
            if not found:
                problems.append(f"'{_dotted(path)}' missing")
            elif not _type_ok(value, want):
                kind = {float: "a number", int: "an integer", str: "a string"}.get(want, f"a {want.__name__}")
                problems.append(f"'{_dotted(path)}' is {repr(value)[:60]}, expected {kind}")
    if problems:
        raise MetricsContractError(f"stage {stage!r} broke its metrics contract ({CONTRACT_FILE}): "
                                   + "; ".join(problems))


def headline(stage: str, metrics: dict) -> dict:
    """The headline subset of `metrics` (same nesting), as written to metrics/<stage>.json; headline keys
    the dict does not hold (e.g. sft's `before` with eval.before: false) are left out."""
    out: dict = {}
    for dotted in contract_for(stage).headline:
        for path, value, found in _matches(metrics, dotted.split(".")):
            if found and not isinstance(value, (dict, list)):
                node = out
                for p in path[:-1]:
                    node = node.setdefault(p, {})
                node[path[-1]] = value
    return out


def numeric_leaves(d: dict) -> int:
    """How many numbers a (headline) dict holds: what `dvc metrics show` gives a column each."""
    count = 0
    for v in d.values():
        if isinstance(v, dict):
            count += numeric_leaves(v)
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            count += 1
    return count


def example(stage: str, name: str = "x") -> dict:
    """The smallest dict that passes `stage`'s contract (`*` filled with `name`): for tests, and a way to see
    a contract's shape at a glance (`python -m refinery.ops.metrics_contract`)."""
    filler = {str: "text", int: 1, float: 0.5, list: [], dict: {}}
    out: dict = {}
    for dotted, want in contract_for(stage).required.items():
        *parents, leaf = [name if p == "*" else p for p in dotted.split(".")]
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = filler[want]
    return out


if __name__ == "__main__":
    for _stage, _c in CONTRACTS.items():
        print(f"{_stage}: {_c.about}\n  required: {', '.join(_c.required)}\n  headline: {', '.join(_c.headline)}\n")

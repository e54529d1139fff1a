"""Register the final policy in the MLflow model registry and move the `champion` alias only when its
evaluation shows a significant win and is not significantly worse than the current champion's (aliases,
not the deprecated registry stages). The decision and its numbers are tags on the model version. With more
than one alignment stage in the pipeline, `choose_across` picks which policy is registered, by the same gate.

    mlflow.pyfunc.load_model("models:/llm-refinery-policy@champion").predict(["a prompt"])  # -> answers
"""
from __future__ import annotations

from pathlib import Path

from refinery.config import RegistryArgs
from refinery.ops.metrics_contract import KL, REFERENCE_SCORE_POLICY, REWARD_POLICY, WIN_RATE_VS_SFT

TAGGED = (WIN_RATE_VS_SFT, REFERENCE_SCORE_POLICY, REWARD_POLICY, KL)  # model-version tags: the champion's record


def _interval(evaluation: dict, key: str, point: float) -> tuple[float, float, int | None]:
    """(ci_low, ci_high, n) of a CI block in the eval (refinery/evaluation/stats.py), or the point itself for
    a record made before CIs were reported."""
    block = evaluation.get(key)
    if isinstance(block, dict):
        return float(block["ci_low"]), float(block["ci_high"]), block.get("n")
    return point, point, None


def decide(candidate: dict, champion: dict | None, args: RegistryArgs) -> tuple[str, str]:
    """('champion' | 'challenger', why), trusting only a significant win:
    - the 95% CI of the candidate's RM-judged win rate over its SFT policy must lie above `min_win_rate`;
    - against the current champion (its model-version tags), the candidate must not be significantly worse:
      its win-rate CI reaches the champion's win rate, and its reference agreement's CI upper bound is at
      most `max_reference_drop` below the champion's reference agreement;
    - with `reference_must_hold`, its agreement with the reference answers must not be significantly below its
      SFT policy's (the CI of the change must reach 0): a significant fall is reward over-optimisation."""
    win, ref = float(candidate[WIN_RATE_VS_SFT]), float(candidate[REFERENCE_SCORE_POLICY])
    w_low, w_high, n = _interval(candidate, "win_rate", win)
    change = candidate.get("reference_score_change")
    ref_high = float(candidate.get("reference_score_sft", ref)) + float(change["ci_high"]) if isinstance(change, dict) else ref
    shown = f"win rate {win:.3f} [95% CI {w_low:.3f}, {w_high:.3f}]" + (f", n={n}" if n else "")
    if not w_low > args.min_win_rate:
        return "challenger", f"{shown}: CI lower bound not above min_win_rate {args.min_win_rate}"
    if args.reference_must_hold and isinstance(change, dict) and float(change["ci_high"]) < 0:
        return "challenger", (f"{shown}, but agreement with the reference answers fell significantly below the SFT "
                              f"policy's ({float(change['estimate']):+.3f} [95% CI {float(change['ci_low']):+.3f}, "
                              f"{float(change['ci_high']):+.3f}]): reward over-optimisation")
    if champion is None:
        return "champion", f"first policy; {shown}: CI lower bound above {args.min_win_rate}"
    c_win, c_ref = float(champion[WIN_RATE_VS_SFT]), float(champion[REFERENCE_SCORE_POLICY])
    if w_high < c_win:
        return "challenger", f"{shown}: significantly below the champion's {c_win:.3f}"
    if ref_high < c_ref - args.max_reference_drop:
        return "challenger", (f"reference agreement {ref:.3f} (CI upper bound {ref_high:.3f}) significantly more than "
                              f"{args.max_reference_drop} below the champion's {c_ref:.3f}")
    return "champion", (f"{shown}: above {args.min_win_rate} and not significantly below the champion's {c_win:.3f}; "
                        f"reference agreement {ref:.3f} vs {c_ref:.3f}")


def choose_across(evals: dict[str, dict], args: RegistryArgs) -> tuple[str, dict[str, str]]:
    """Which alignment stage's policy goes to the registry: of those that pass the gate on their own (the
    win-rate CI above `min_win_rate`, reference agreement held), the highest win rate over SFT; when none passes,
    the highest win rate (registered, and left `challenger` by `decide`). Returns (stage, why for every stage)."""
    if not evals:
        raise ValueError("choose_across: no alignment stage evaluated")
    gate = {stage: decide(e, None, args) for stage, e in evals.items()}
    passing = [s for s, (alias, _) in gate.items() if alias == "champion"]
    best = max(passing or list(evals), key=lambda s: float(evals[s][WIN_RATE_VS_SFT]))
    why = {s: ("chosen: " if s == best else "not chosen: ")
              + (gate[s][1] if s not in passing else f"passes the gate; win rate {float(evals[s][WIN_RATE_VS_SFT]):.3f}"
                 + ("" if s == best else f" below {best}'s {float(evals[best][WIN_RATE_VS_SFT]):.3f}"))
           for s in evals}
    return best, why


def register_policy(model_dir: str | Path, ppo_eval: dict, args: RegistryArgs, stage: str = "ppo") -> dict:
    """Log the policy (transformers flavour) in the active MLflow run, register it, set the alias."""
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient()
    try:
        current = client.get_model_version_by_alias(args.model_name, "champion")
        champion = current.tags
    except MlflowException:
        current, champion = None, None
    alias, why = decide(ppo_eval, champion if champion and WIN_RATE_VS_SFT in champion else None, args)
    code = Path(__file__).with_name("policy_pyfunc.py")
    info = mlflow.pyfunc.log_model(name="policy", python_model=str(code), artifacts={"policy": str(model_dir)},
                                   registered_model_name=args.model_name, input_example=["a prompt"])
    version = str(info.registered_model_version)
    for key in TAGGED:
        client.set_model_version_tag(args.model_name, version, key, str(ppo_eval[key]))
    w_low, w_high, n = _interval(ppo_eval, "win_rate", float(ppo_eval[WIN_RATE_VS_SFT]))
    for key, value in (("win_rate_ci_low", w_low), ("win_rate_ci_high", w_high), ("eval_prompts", n)):
        client.set_model_version_tag(args.model_name, version, key, str(value))
    client.set_model_version_tag(args.model_name, version, "alias_decision", why)
    client.set_model_version_tag(args.model_name, version, "stage", stage)
    client.set_registered_model_alias(args.model_name, alias, version)
    return {"model_name": args.model_name, "version": version, "alias": alias, "why": why, "stage": stage,
            "previous_champion": current.version if current else None}

"""Register the final policy in the MLflow model registry and move the `champion` alias only when its
evaluation beats the current champion's (aliases, not the deprecated registry stages).

    mlflow.pyfunc.load_model("models:/llm-refinery-policy@champion").predict(["a prompt"])  # -> answers
"""
from __future__ import annotations

from pathlib import Path

from refinery.config import RegistryArgs


def decide(candidate: dict, champion: dict | None, args: RegistryArgs) -> tuple[str, str]:
    """('champion' | 'challenger', why) from the PPO eval metrics of the candidate and the current champion."""
    win, ref = candidate["win_rate_vs_sft"], candidate["reference_score_policy"]
    if win < args.min_win_rate:
        return "challenger", f"win rate {win:.3f} < min_win_rate {args.min_win_rate}"
    if champion is None:
        return "champion", f"first policy with win rate {win:.3f} >= {args.min_win_rate}"
    c_win, c_ref = float(champion["win_rate_vs_sft"]), float(champion["reference_score_policy"])
    if win < c_win:
        return "challenger", f"win rate {win:.3f} < champion's {c_win:.3f}"
    if ref < c_ref - args.max_reference_drop:
        return "challenger", f"reference agreement {ref:.3f} dropped more than {args.max_reference_drop} below {c_ref:.3f}"
    return "champion", f"win rate {win:.3f} >= {c_win:.3f}, reference agreement {ref:.3f} vs {c_ref:.3f}"


def register_policy(model_dir: str | Path, ppo_eval: dict, args: RegistryArgs) -> dict:
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
    alias, why = decide(ppo_eval, champion if champion and "win_rate_vs_sft" in champion else None, args)
    code = Path(__file__).with_name("policy_pyfunc.py")
    info = mlflow.pyfunc.log_model(name="policy", python_model=str(code), artifacts={"policy": str(model_dir)},
                                   registered_model_name=args.model_name, input_example=["a prompt"])
    version = str(info.registered_model_version)
    for key in ("win_rate_vs_sft", "reference_score_policy", "reward_policy", "kl"):
        client.set_model_version_tag(args.model_name, version, key, str(ppo_eval[key]))
    client.set_model_version_tag(args.model_name, version, "alias_decision", why)
    client.set_registered_model_alias(args.model_name, alias, version)
    return {"model_name": args.model_name, "version": version, "alias": alias, "why": why,
            "previous_champion": current.version if current else None}

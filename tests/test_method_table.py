"""The method comparison's table: a CI per quality cell, the paired difference to the best method (within noise
or not), and the seed articles' claims against what the run measured, with the reason where they disagree."""
import numpy as np

from flows.compare_methods import add_evidence
from refinery.evaluation.method_claims import judge, level


def row(method, pct, sec, mem, scores):
    per = {"t1": list(scores[0]), "t2": list(scores[1])}
    return {"method": method, "trainable_percent": pct, "seconds_per_step": sec, "peak_memory_mb": mem,
            "score": float(np.mean([np.mean(v) for v in per.values()])), "per_example": per, "status": "ok"}


def test_table_says_which_differences_are_within_noise():
    rng = np.random.default_rng(0)
    base = [rng.uniform(0, 1, 64), rng.uniform(0, 1, 64)]
    rows = [row("full", 100.0, 3.4, 3500.0, [b + 0.2 for b in base]),
            row("lora", 3.5, 1.6, 2800.0, [b + 0.2 + rng.normal(0, 0.05, 64) for b in base]),
            row("prompt", 0.007, 0.9, 1900.0, base),
            {"method": "ia3", "status": "failed: boom"}]
    out = {r["method"]: r for r in add_evidence(rows, seed=0)}
    assert out["full"]["vs_best"] == "best" or out["lora"]["vs_best"] == "best"
    other = "lora" if out["full"]["vs_best"] == "best" else "full"
    assert out[other]["vs_best"].endswith("within noise")
    assert out["prompt"]["vs_best"].endswith(": worse") and "n=128" in out["prompt"]["score_ci"]
    assert "vs_best" not in out["ia3"]  # a failed method has no numbers to judge
    few = [row("full", 100.0, 3.4, 3500.0, [b[:2] + 0.2 for b in base]), row("prompt", 0.007, 0.9, 1900.0,
                                                                          [b[:2] for b in base])]
    out = {r["method"]: r for r in add_evidence(few, seed=0)}
    assert "too few examples to rank (n=4, needs >= 50)" in out["prompt"]["vs_best"]


def test_seed_claims_are_checked_with_reasons():
    full = {"trainable_percent": 100.0, "seconds_per_step": 3.4, "peak_memory_mb": 3562.0}
    lora = judge("lora", {"trainable_percent": 3.5, "seconds_per_step": 1.58, "peak_memory_mb": 2777.0}, full)
    assert "params ~0.1-1% vs 3.5%: no" in lora["claim"] and "2r/d" in lora["why"]
    assert "compute low vs low (0.46x full): yes" in lora["claim"]
    assert "memory low vs medium (0.78x full): no" in lora["claim"] and lora["agrees"] == "1/3"
    assert judge("ia3", {"trainable_percent": 0.04}, full)["claim"] == "not in the seeds' table"
    assert (level(0.3), level(0.6), level(0.9)) == ("low", "medium", "high")

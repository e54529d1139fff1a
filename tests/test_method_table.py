"""The method comparison's table: a CI per quality cell, the paired difference to the best method (within noise
or not), and the seed articles' claims against what the run measured, with the reason where they disagree; across
random seeds, whether each verdict is stable and how well the seeds' rankings agree (Kendall tau); and the
command's refusal to start without the pipeline's outputs."""
import numpy as np
import pytest

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


# ---- two seeds: stability of the verdicts and the rank correlation (flows/compare_methods.py `stability`) ----
def judged(method, score, vs_best, status="ok"):
    return {"method": method, "score": score, "vs_best": vs_best, "status": status}


def test_stability_across_seeds():
    from flows.compare_methods import stability

    seed1 = [judged("full", 0.50, "best"), judged("lora", 0.48, "-0.020 [-0.050, +0.010]: within noise"),
             judged("ia3", 0.30, "-0.200 [-0.250, -0.150]: worse"), judged("prompt", 0.10, "-0.400 [-0.5, -0.3]: worse"),
             judged("adapter", 0.2, "-0.300: too few examples to rank (n=6, needs >= 50)")]
    seed2 = [judged("full", 0.47, "-0.030 [-0.060, +0.004]: within noise"), judged("lora", 0.50, "best"),
             judged("ia3", 0.31, "-0.190 [-0.240, -0.140]: worse"), judged("prompt", 0.0, "", status="failed: boom"),
             judged("adapter", 0.25, "-0.250: too few examples to rank (n=6, needs >= 50)")]
    rows, summary, line = stability({42: seed1, 43: seed2})
    by = {r["method"]: r for r in rows}
    assert [r["method"] for r in rows] == ["full", "lora", "ia3", "prompt", "adapter"]  # the first seed's order
    assert by["full"]["score"] == 0.50 and by["full"]["vs_best"] == "best"  # the first seed's columns are kept
    assert (by["full"]["score_seed42"], by["full"]["score_seed43"]) == (0.50, 0.47)
    assert "vs_best_seed42" not in by["full"] and by["full"]["vs_best_seed43"] == "within noise"
    assert by["full"]["stable"] == "no" and by["lora"]["stable"] == "no"  # best <-> within noise swapped
    assert by["ia3"]["stable"] == "yes" and by["ia3"]["vs_best_seed43"] == "worse"
    assert by["prompt"]["stable"] == "n/a" and by["prompt"]["vs_best_seed43"] == "failed"
    assert by["adapter"]["stable"] == "n/a" and by["adapter"]["vs_best_seed43"] == "unranked"
    # Kendall tau over the 4 methods ok in both seeds: full/lora swap, the rest keep their order -> (5-1)/6
    tau = summary["kendall_tau"]["seed42_vs_seed43"]
    assert tau == {"tau": round(4 / 6, 4), "n": 4}
    assert summary["stable_verdicts"] == {"stable": 1, "judged": 3, "methods": 5}
    assert "Kendall tau" in line and "seed 42 vs 43: +0.667 (n=4 methods)" in line and "1 of 3 judged" in line

    few = [dict(judged("full", 0.5, "best"), score_ci="[0.4, 0.6] n=6"), judged("lora", 0.4, seed1[4]["vs_best"])]
    rows, _, _ = stability({42: few, 43: few})
    assert [r["stable"] for r in rows] == ["n/a", "n/a"]  # the best of 6 examples is no verdict either

    rows, summary, line = stability({42: seed1})
    assert line == "one seed: stability not checked." and "stable" not in rows[0] and summary == {"seeds": [42]}


def test_kendall_tau_matches_scipy_with_ties():
    from flows.compare_methods import kendall_tau

    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(1)
    for _ in range(20):
        x, y = rng.integers(0, 4, 8).astype(float), rng.integers(0, 4, 8).astype(float)  # many ties
        want = stats.kendalltau(x, y).statistic
        got = kendall_tau(list(x), list(y))
        assert (got is None and np.isnan(want)) or got == pytest.approx(want)
    assert kendall_tau([1.0], [2.0]) is None and kendall_tau([1.0, 1.0], [1.0, 2.0]) is None
    assert kendall_tau([1.0, 2.0, 3.0], [3.0, 2.0, 1.0]) == -1.0


def test_seed_params_copy_changes_only_the_seed(tmp_path):
    import yaml

    from flows.compare_methods import seed_params
    from tests.conftest import REPO

    out = seed_params(str(REPO / "params"), 7, tmp_path / "params-seed7")
    assert yaml.safe_load((out / "base.yaml").read_text())["seed"] == 7
    base = yaml.safe_load((REPO / "params" / "base.yaml").read_text())
    assert {**base, "seed": 7} == yaml.safe_load((out / "base.yaml").read_text())
    for f in (REPO / "params").glob("*.yaml"):
        if f.name != "base.yaml":
            assert (out / f.name).read_text() == f.read_text(), f.name


@pytest.mark.bad_input
@pytest.mark.parametrize("missing", ["models/dapt", "data/prepared/sft"])
def test_refuses_before_training_without_the_pipeline_outputs(tmp_path, monkeypatch, capsys, missing):
    """No models/dapt or no data/prepared/sft: one line naming it and how to make it, exit 2, nothing written."""
    from flows.compare_methods import main
    from tests.conftest import write_tiny_params

    write_tiny_params(tmp_path / "params")
    for folder in {"models/dapt", "data/prepared/sft"} - {missing}:
        (tmp_path / folder).mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        main(["--name", "x", "--methods", "lora"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {missing}: not found")
    assert "run the pipeline first (`make demo` or `dvc repro sft`)" in err[0]
    assert not (tmp_path / "experiments").exists() and not (tmp_path / "mlflow.db").exists()
    with pytest.raises(SystemExit) as exc:  # bad arguments: the same one line, before anything else
        main(["--seeds", "42,x"])
    assert exc.value.code == 2 and "--seeds 42,x: expected whole numbers" in capsys.readouterr().err

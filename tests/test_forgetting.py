"""General-domain retention (refinery/evaluation/forgetting.py) and the held-out sizes prepare guarantees
(params/prepare.yaml `min_validation`)."""
import math

import pytest

from refinery.data.prepare import split_records
from refinery.evaluation.forgetting import retention


def test_retention_is_the_geometric_perplexity_change():
    before = [2.0, 2.2, 1.8, 2.4] * 16
    after = [b + 0.1 for b in before]  # every paragraph 0.1 nats worse
    block = retention(before, after, seed=0)
    assert block["n"] == 64
    assert block["perplexity_change"] == pytest.approx(math.exp(0.1) - 1, abs=1e-6)
    assert block["ci_low"] == pytest.approx(math.exp(0.1) - 1, abs=1e-6)  # no spread in the differences
    assert block["verdict"] == "worse" and block["retained"] is False  # +10.5% > the 5% tolerance
    assert block["perplexity_after"] > block["perplexity_before"]


def test_retention_within_tolerance_and_noise():
    before = [2.0 + 0.01 * (i % 7) for i in range(64)]
    after = [b + (0.02 if i % 2 else -0.02) for i, b in enumerate(before)]  # no net change
    block = retention(before, after, seed=0)
    assert block["verdict"] == "no significant change" and block["retained"] is True
    assert block["ci_low"] < 0 < block["ci_high"]


def test_min_validation_tops_up_small_held_out_sets():
    records = [{"id": f"r{i}"} for i in range(164)]
    plain = split_records(records, 42, 0.1)
    assert len(plain["validation"]) < 50
    grown = split_records(records, 42, 0.1, min_validation=64)
    assert len(grown["validation"]) == 64 and len(grown["train"]) == 100
    ids = lambda recs: {r["id"] for r in recs}  # noqa: E731
    assert ids(plain["validation"]) <= ids(grown["validation"])  # the hash split's held-out records stay held out
    assert not ids(grown["validation"]) & ids(grown["train"])
    small = split_records(records[:40], 42, 0.1, min_validation=64)
    assert len(small["validation"]) == 20  # capped at half the set


def test_min_validation_leaves_big_enough_sets_alone():
    records = [{"id": f"r{i}"} for i in range(1000)]
    assert split_records(records, 42, 0.1, min_validation=64) == split_records(records, 42, 0.1)

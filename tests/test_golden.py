"""Golden values: the tiny model's numbers after a fixed number of steps of each stage, chained as the
pipeline chains them (dapt -> sft -> reward -> ppo, lora everywhere).

Direction checks (`after < before`) let a regression through that still moves the right way; these pin the
numbers themselves. Recorded in tests/golden/tiny_model.json (seed 0 tiny base, fp32, torch's CPU kernels);
`REFINERY_UPDATE_GOLDEN=1 pytest tests/test_golden.py` rewrites the file after an *intended* change, which
the commit then has to say. Tolerance: 2e-3 absolute on losses/rewards (CPU kernels are deterministic for a
given torch build; the slack absorbs BLAS-order differences between CPU models)."""
import json
import os
import shutil
from pathlib import Path

import pytest

GOLDEN = Path(__file__).parent / "golden" / "tiny_model.json"
TOL = 2e-3


def pick(metrics: dict, paths: list[str]) -> dict:
    out = {}
    for p in paths:
        v = metrics
        for k in p.split("."):
            v = v[k]
        out[p] = round(float(v), 6)
    return out


def test_golden_values(project, prepared, prefect_server):
    from flows.dapt import dapt_flow
    from flows.ppo import ppo_flow
    from flows.reward import reward_flow
    from flows.sft import sft_flow

    shutil.copytree(prepared, project / "data" / "prepared")
    got = {}
    m = dapt_flow(overrides={"method": "lora", "training.lr": 0.02})
    got["dapt"] = pick(m, ["train.final_loss", "before.eval_loss", "after.eval_loss"])
    m = sft_flow(overrides={"training.max_steps": 4, "training.warmup_ratio": 0.0})
    got["sft"] = pick(m, ["train.final_loss", "after.tasks.summarize.loss", "after.tasks.which_module.loss",
                          "after.tasks.explain_topic.loss"])
    m = reward_flow(overrides={"training.max_steps": 4})
    got["reward"] = pick(m, ["train.final_loss", "eval.margin"])
    m = ppo_flow(overrides={"steps": 2})
    got["ppo"] = pick(m, ["train.reward_first", "train.reward_last", "train.kl_last"])

    if os.environ.get("REFINERY_UPDATE_GOLDEN") or not GOLDEN.exists():
        GOLDEN.write_text(json.dumps(got, indent=2) + "\n")
        pytest.skip(f"golden values written to {GOLDEN}")
    want = json.loads(GOLDEN.read_text())
    for stage, values in want.items():
        for key, v in values.items():
            assert got[stage][key] == pytest.approx(v, abs=TOL), f"{stage} {key}: {got[stage][key]} != golden {v}"

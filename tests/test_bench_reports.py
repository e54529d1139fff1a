"""bench/RESULTS-gpu.md is generated from bench/results-gpu.json by the command it names, not edited by hand: the
report written again from the committed JSON equals the committed file (its first lines name the commands)."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_results_are_the_report_of_their_json(tmp_path):
    subprocess.run([sys.executable, "bench/gpu_bench.py", "--report", "bench/results-gpu.json", "--out", str(tmp_path)],
                   cwd=ROOT, check=True, capture_output=True)
    committed = (ROOT / "bench" / "RESULTS-gpu.md").read_text().splitlines()
    again = (tmp_path / "RESULTS-gpu.md").read_text().splitlines()
    assert len(again) == len(committed) and len(committed) > 40
    # line 3 says which command wrote the file (the committed one was given the device run's inputs)
    assert [i for i, (a, b) in enumerate(zip(committed, again)) if a != b] in ([], [2])
    # the README quotes the GPU ratios of this file, not older ones
    text = "\n".join(committed)
    readme = (ROOT / "README.md").read_text()
    for ours, trl in (("sft-ours", "sft-trl"), ("reward-ours", "reward-trl")):
        ratio = re.search(rf"\(no Liger on either side\), {ours} / {trl}: \*\*([0-9.]+)×\*\*", text).group(1)
        assert f"**{ratio}x**" in readme, (ours, ratio)


def test_padding_free_results_are_the_report_of_their_json(tmp_path):
    """bench/RESULTS-padding-free.md (what `padding_free: auto` rests on) is its JSON's report, and the reward ratio it
    shows is the one params/reward.yaml and the README quote."""
    subprocess.run([sys.executable, "bench/padding_free_bench.py", "--report", "bench/results-padding-free.json", "--md",
                    str(tmp_path / "again.md")], cwd=ROOT, check=True, capture_output=True)
    committed = (ROOT / "bench" / "RESULTS-padding-free.md").read_text()
    assert (tmp_path / "again.md").read_text() == committed
    reward = json.loads((ROOT / "bench" / "results-padding-free.json").read_text())["reward"]
    quoted = f"{reward['flat_speedup']:.2f}x"
    assert f"**{quoted}**" in committed and quoted in (ROOT / "params" / "reward.yaml").read_text()
    assert quoted in (ROOT / "README.md").read_text()


@pytest.mark.slow
def test_gpu_bench_runs_every_case_on_the_tiny_model(tmp_path):
    """The GPU script's smoke mode (`--tiny`: 2-layer models, 128-token rows) on the committed code, so a change
    under refinery/ that breaks the benchmark shows here and not on the next (rare, 15-minute) GPU lease."""
    snap, out = tmp_path / "snap", tmp_path / "out"
    subprocess.run([sys.executable, "bench/gpu_bench.py", "--make-snapshot", str(snap)], cwd=ROOT, check=True,
                   capture_output=True)
    env = {**os.environ, "PYTHONPATH": str(snap)}
    subprocess.run([sys.executable, "bench/gpu_bench.py", "--tiny", "--repeats", "1", "--src", str(snap), "--out",
                    str(out), "--budget-s", "900"], cwd=ROOT, check=True, capture_output=True, env=env, timeout=900)
    res = json.loads((out / "results-gpu.json").read_text())
    for case in ("sft-ours", "sft-trl", "reward-ours", "reward-trl"):
        (run,) = res["runs"][case]
        assert "error" not in run and run["tokens_per_second"] > 0, (case, run.get("error"))
    for name in ("ppo", "ppo-fp32"):
        assert res["ppo_runs"][name]["steps"] == 3, res["ppo_runs"][name]
    assert res["qlora_7b"]["runs"]["fp32"]["steps_run"] == 3 and not res["skipped"]

"""bench/RESULTS-gpu.md is generated from bench/results-gpu.json by the command it names, not edited by hand: the
report written again from the committed JSON equals the committed file (its first lines name the commands)."""
import re
import subprocess
import sys
from pathlib import Path

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

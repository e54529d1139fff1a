"""A user's own data through the real pipeline (tiny model, a fresh git repo): multi-turn `messages` SFT with a
system prompt as Parquet, conversational preference pairs as a `save_to_disk` folder, a CSV corpus. The
pipeline writes their paths into dvc.yaml, trains on them, leaves `dvc status` clean; one byte of the SFT file
changes and DVC reports prepare stale, and `dvc repro` reruns prepare and the stages that read the changed
prepared set, and not dapt (whose prepared corpus is unchanged)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, tiny_repo

pytestmark = pytest.mark.slow
datasets = pytest.importorskip("datasets")
SYSTEM = "You are a terse assistant for Python's standard library."


def sh(cmd: str, cwd: Path, env: dict) -> str:
    out = subprocess.run(cmd, shell=True, cwd=cwd, env=env, capture_output=True, text=True, timeout=1800)
    assert out.returncode == 0, f"{cmd} failed:\n{out.stdout[-3000:]}\n{out.stderr[-5000:]}"
    return out.stdout + out.stderr


def demo_rows(name: str) -> list[dict]:
    return [json.loads(line) for line in (REPO / "data" / "demo" / name).read_text().splitlines() if line.strip()]


def write_user_data(root: Path) -> None:
    """The demo's records, reshaped the way users bring them, at test time."""
    user = root / "data" / "user"
    user.mkdir(parents=True)
    summaries = demo_rows("sft/summarize.jsonl")[:40]
    chats = [{"messages": [{"role": "system", "content": SYSTEM},
                           {"role": "user", "content": "Hello."}, {"role": "assistant", "content": "Hello. Ask away."},
                           {"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["response"]}]}
             for r in summaries]
    datasets.Dataset.from_list(chats).to_parquet(str(user / "chat.parquet"))
    prefs = [{"prompt": [{"role": "user", "content": r["prompt"]}],
              "chosen": [{"role": "assistant", "content": r["chosen"]}],
              "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in demo_rows("preferences.jsonl")[:60]]
    datasets.Dataset.from_list(prefs).save_to_disk(str(user / "prefs"))
    corpus = [{"text": r["text"]} for r in demo_rows("corpus.jsonl")[:120]]
    datasets.Dataset.from_list(corpus).to_csv(str(user / "corpus.csv"), index=False)


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    dst = tmp_path_factory.mktemp("user-data") / "repo"
    env = tiny_repo(dst)
    write_user_data(dst)
    prep = yaml.safe_load((dst / "params" / "prepare.yaml").read_text())
    prep["datasets"].update({"corpus": "data/user/corpus.csv", "preferences": "data/user/prefs",
                             "sft": {"chat": {"path": "data/user/chat.parquet", "format": "messages"}}})
    (dst / "params" / "prepare.yaml").write_text(yaml.safe_dump(prep, sort_keys=False))
    sft = yaml.safe_load((dst / "params" / "sft.yaml").read_text())
    sft["tasks"] = {"chat": {"weight": 1.0, "metric": "rouge_l", "max_new_tokens": 4}}
    (dst / "params" / "sft.yaml").write_text(yaml.safe_dump(sft, sort_keys=False))
    sh("git init -q && git add -A && git -c user.email=t@localhost -c user.name=t commit -qm init", dst, env)
    return dst, env


def test_user_shaped_data_is_trained_on_and_tracked_by_dvc(repo):
    root, env = repo
    sh(f"{sys.executable} -m flows.pipeline --to reward", root, env)
    deps = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]["prepare"]["deps"]
    assert {"data/user/chat.parquet", "data/user/prefs", "data/user/corpus.csv"} <= set(deps)
    report = json.loads((root / "data" / "prepared" / "report.json").read_text())
    assert report["sets"]["sft/chat"]["kept"] == 40 and report["sets"]["preferences"]["kept"] == 60
    first = json.loads((root / "data" / "prepared" / "sft" / "chat" / "train.jsonl").read_text().splitlines()[0])
    assert first["prompt"][0] == {"role": "system", "content": SYSTEM} and len(first["prompt"]) == 4
    sft = json.loads((root / "metrics" / "sft.json").read_text())
    assert "chat" in json.dumps(sft)
    assert "up to date" in sh("dvc status prepare dapt sft reward", root, env)

    # one byte of the user's SFT file changes: DVC sees it, and reruns what reads it
    rows = datasets.Dataset.from_parquet(str(root / "data" / "user" / "chat.parquet")).to_list()
    rows[0]["messages"][-1]["content"] = rows[0]["messages"][-1]["content"][:-1] + "!"
    datasets.Dataset.from_list(rows).to_parquet(str(root / "data" / "user" / "chat.parquet"))
    status = sh("dvc status prepare", root, env)
    assert "data/user/chat.parquet" in status and "modified" in status
    out = sh("dvc repro reward", root, env)
    ran = {line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage")}
    assert ran == {"prepare", "sft", "reward"}, out[-3000:]
    assert "up to date" in sh("dvc status prepare dapt sft reward", root, env)

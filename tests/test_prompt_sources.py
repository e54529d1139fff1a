"""PPO/GRPO training prompts from several prepared splits (refinery/data/prompt_sources.py)."""
import json
from pathlib import Path

import pytest

from refinery.data.prompt_sources import source_dirs, training_prompts
from refinery.data.records import read_jsonl


def _write(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_demo_prompts_alone_are_the_prompt_split(prepared):
    val = [r for _, r in read_jsonl(prepared / "prompts" / "validation.jsonl")]
    train = [r for _, r in read_jsonl(prepared / "prompts" / "train.jsonl")]
    got = training_prompts(prepared, ["prompts"], val)
    assert [{k: v for k, v in r.items() if k != "source"} for r in got] == train
    assert {r["source"] for r in got} == {"prompts"}


def test_demo_preference_prompts_added_once_and_never_a_held_out_prompt(prepared):
    val = [r for _, r in read_jsonl(prepared / "prompts" / "validation.jsonl")]
    prefs = [r for _, r in read_jsonl(prepared / "preferences" / "train.jsonl")]
    got = training_prompts(prepared, ["prompts", "preferences"], val)
    texts = [r["prompt"] for r in got]
    assert len(texts) == len(set(texts))
    assert not set(texts) & {r["prompt"] for r in val}
    from_prefs = [r for r in got if r["source"] == "preferences"]
    assert len(from_prefs) == len({r["prompt"] for r in prefs}) > 100  # the demo: 336 pairs, each its own prompt
    assert all(set(r) == {"id", "prompt", "task", "source"} for r in from_prefs)  # no answers carried along
    assert {r["task"] for r in from_prefs} == {"which_module", "summarize"}


def test_duplicates_and_held_out_prompts_are_left_out_in_source_order(tmp_path):
    chat = [{"role": "user", "content": "Which module defines `dumps`?"}]
    _write(tmp_path / "prompts" / "train.jsonl", [{"id": "p1", "prompt": "a"}, {"id": "p2", "prompt": chat}])
    _write(tmp_path / "preferences" / "train.jsonl", [
        {"id": "q1", "prompt": "a", "chosen": "x", "rejected": "y"},              # already a prompt
        {"id": "q2", "prompt": [dict(m) for m in chat], "chosen": "x", "rejected": "y"},  # the same conversation
        {"id": "q3", "prompt": "held", "chosen": "x", "rejected": "y"},           # a validation prompt
        {"id": "q4", "prompt": "b", "chosen": "x", "rejected": "y", "task": "t"},
    ])
    got = training_prompts(tmp_path, ["prompts", "preferences"], [{"prompt": "held"}])
    assert [(r["id"], r["source"]) for r in got] == [("p1", "prompts"), ("p2", "prompts"), ("q4", "preferences")]
    assert got[2] == {"id": "q4", "prompt": "b", "task": "t", "source": "preferences"}
    # the order of the sources decides which copy is kept
    assert [r["id"] for r in training_prompts(tmp_path, ["preferences", "prompts"], [])] == ["q1", "q2", "q3", "q4"]
    assert source_dirs(tmp_path, ["preferences"]) == {"preferences": str(tmp_path / "preferences")}


def test_unknown_source_is_refused_naming_the_field():
    from refinery.config import load_params
    from refinery.errors import UserError

    params = Path(__file__).resolve().parents[1] / "params"
    with pytest.raises(UserError, match=r"ppo.yaml: key 'prompt_sources.0'"):
        load_params("ppo", params, {"prompt_sources": ["sft"]})
    with pytest.raises(UserError, match="prompt_sources"):
        load_params("grpo", params, {"prompt_sources": []})

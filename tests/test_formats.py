"""The data formats users bring (refinery/data/formats.py): each format and file type becomes the record the
stages read, errors name the file and the line (or row) and field, and multi-turn SFT learns the assistant turns."""
import json

import pytest

from refinery.data.chat import chat_ids, render_example
from refinery.data.formats import Source, content_id
from refinery.data.packing import IGNORE
from refinery.data.records import load_valid
from refinery.errors import UserError

datasets = pytest.importorskip("datasets")

SYSTEM = {"role": "system", "content": "You answer about Python."}
TURNS = [SYSTEM, {"role": "user", "content": "Which module has dumps?"}, {"role": "assistant", "content": "json"},
         {"role": "user", "content": "And loads?"}, {"role": "assistant", "content": "json as well"}]
CONTEXT = TURNS[:-1]


def jsonl(tmp_path, rows, name="d.jsonl"):
    p = tmp_path / name
    p.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return p


@pytest.mark.parametrize("row,expect", [
    ({"id": "a", "prompt": "p", "response": "r"}, {"id": "a", "prompt": "p", "response": "r"}),
    ({"id": "a", "messages": TURNS}, {"id": "a", "prompt": CONTEXT, "response": "json as well"}),
    ({"id": "a", "messages": TURNS[1:3]}, {"id": "a", "prompt": "Which module has dumps?", "response": "json"}),
    ({"id": "a", "conversations": [{"from": "system", "value": SYSTEM["content"]},
                                   {"from": "human", "value": "Which module has dumps?"}, {"from": "gpt", "value": "json"},
                                   {"from": "human", "value": "And loads?"}, {"from": "gpt", "value": "json as well"}]},
     {"id": "a", "prompt": CONTEXT, "response": "json as well"}),
    ({"id": "a", "instruction": "Name the module.", "input": "dumps", "output": "json"},
     {"id": "a", "prompt": "Name the module.\n\ndumps", "response": "json"}),
    ({"id": "a", "instruction": "Name the module of dumps.", "input": "", "output": "json"},
     {"id": "a", "prompt": "Name the module of dumps.", "response": "json"}),
])
def test_sft_formats_become_one_record_shape(tmp_path, row, expect):
    kept, _ = load_valid(jsonl(tmp_path, [row]), "sft", "error")
    assert kept == [expect]


PAIR = {"prompt": "Which module has dumps?", "chosen": "json", "rejected": "pickle"}


@pytest.mark.parametrize("row", [
    PAIR,
    {"prompt": [{"role": "user", "content": PAIR["prompt"]}], "chosen": [{"role": "assistant", "content": "json"}],
     "rejected": [{"role": "assistant", "content": "pickle"}]},
    {"chosen": [{"role": "user", "content": PAIR["prompt"]}, {"role": "assistant", "content": "json"}],
     "rejected": [{"role": "user", "content": PAIR["prompt"]}, {"role": "assistant", "content": "pickle"}]},
])
def test_preference_formats_string_conversational_and_implicit(tmp_path, row):
    kept, _ = load_valid(jsonl(tmp_path, [row]), "preferences", "error")
    assert kept == [{"id": content_id("preferences", PAIR), **PAIR}]  # no id: a hash of the content


def test_prompts_from_messages_take_the_last_answer_as_reference(tmp_path):
    kept, _ = load_valid(jsonl(tmp_path, [{"id": "q", "messages": TURNS, "task": "which_module"}]), "prompts", "error")
    assert kept == [{"id": "q", "task": "which_module", "prompt": CONTEXT, "reference": "json as well"}]


def _write_all_types(tmp_path, rows):
    ds = datasets.Dataset.from_list(rows)
    paths = {"jsonl": jsonl(tmp_path, rows), "json": tmp_path / "d.json", "parquet": tmp_path / "d.parquet",
             "csv": tmp_path / "d.csv", "folder": tmp_path / "saved"}
    paths["json"].write_text(json.dumps(rows), encoding="utf-8")
    ds.to_parquet(str(paths["parquet"]))
    ds.to_csv(str(paths["csv"]), index=False)
    ds.save_to_disk(str(paths["folder"]))
    return paths


def test_every_file_type_reads_to_the_same_records(tmp_path):
    rows = [{"instruction": f"Name module {i}.", "input": "", "output": f"mod{i}"} for i in range(3)]
    paths = _write_all_types(tmp_path, rows)
    got = {kind: load_valid(p, "sft", "error")[0] for kind, p in paths.items()}
    assert len(got["jsonl"]) == 3 and all(v == got["jsonl"] for v in got.values()), got


@pytest.mark.bad_input
def test_errors_name_the_line_or_the_row_and_the_field(tmp_path):
    rows = [{"id": "a", "prompt": "p", "response": "r"}, {"id": "b", "prompt": "q", "response": " "}]
    paths = _write_all_types(tmp_path, rows)
    with pytest.raises(UserError, match=r"d\.jsonl:2: field 'response': empty"):
        load_valid(paths["jsonl"], "sft", "error")
    with pytest.raises(UserError, match=r"d\.parquet: row 2: field 'response': empty"):
        load_valid(paths["parquet"], "sft", "error")
    bad_turn = {"id": "c", "messages": [TURNS[1], {"role": "robot", "content": "x"}]}
    with pytest.raises(UserError, match=r":1: field 'messages\[1\]\.role': unknown role 'robot'"):
        load_valid(jsonl(tmp_path, [bad_turn], "m.jsonl"), "sft", "error")
    twice = {"id": "e", "messages": [TURNS[1], TURNS[1], TURNS[2]]}
    with pytest.raises(UserError, match=r":1: field 'messages\[1\]\.role': expected an assistant turn"):
        load_valid(jsonl(tmp_path, [twice], "t.jsonl"), "sft", "error")
    ends_with_user = {"id": "d", "messages": TURNS[:2]}
    with pytest.raises(UserError, match=r":1: field 'messages\[1\]': the last message must be the assistant's answer"):
        load_valid(jsonl(tmp_path, [ends_with_user], "u.jsonl"), "sft", "error")


@pytest.mark.bad_input
def test_malformed_jsonl_line_is_named_and_skippable(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"id": "a", "prompt": "p", "response": "r"}\n{"id": "b", "prompt": \n'
                 '{"id": "c", "prompt": "q", "response": "s"}\n', encoding="utf-8")
    with pytest.raises(UserError, match=r"d\.jsonl:2: malformed JSON"):
        load_valid(p, "sft", "error")
    kept, dropped = load_valid(p, "sft", "skip")
    assert [r["id"] for r in kept] == ["a", "c"] and [d.line for d in dropped] == [2]


@pytest.mark.bad_input
def test_format_is_detected_or_overridden(tmp_path):
    p = jsonl(tmp_path, [{"question": "q", "answer": "a"}])
    with pytest.raises(UserError, match=r"cannot tell the sft format from the columns \['answer', 'question'\]"):
        load_valid(p, "sft", "error")
    with pytest.raises(UserError, match="is not a sft format"):
        load_valid(Source(str(p), format="sharegpt_v9"), "sft", "error")
    forced = jsonl(tmp_path, [{"prompt": "p", "response": "r", "messages": TURNS}], "both.jsonl")
    assert load_valid(Source(str(forced), format="prompt_response"), "sft", "error")[0][0]["response"] == "r"
    assert load_valid(Source(str(forced)), "sft", "error")[0][0]["response"] == "json as well"  # messages first


def test_missing_file_and_offline_hub_name_are_one_line_errors(tmp_path, monkeypatch):
    with pytest.raises(UserError, match="data file not found"):
        load_valid(tmp_path / "nope.parquet", "sft", "error")
    import huggingface_hub.constants
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # what an offline machine gets, without the retries
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserError) as info:
        load_valid(Source("nobody/no-such-dataset", revision="main"), "sft", "error")
    assert str(info.value).startswith("nobody/no-such-dataset: hub dataset could not be read")
    assert "\n" not in str(info.value)


@pytest.fixture(scope="module")
def tok(tiny_base):
    from refinery.modeling.loading import load_tokenizer
    return load_tokenizer(tiny_base)


def test_multi_turn_sft_learns_every_assistant_turn_or_only_the_last(tok):
    ids, labels = render_example(tok, CONTEXT, "json as well", all_turns=True)
    assert ids == chat_ids(tok, TURNS)
    learned = tok.decode([t for t, lab in zip(ids, labels) if lab != IGNORE])
    assert "json" in learned and "json as well" in learned and "dumps" not in learned and "Python" not in learned
    _, last = render_example(tok, CONTEXT, "json as well", all_turns=False)
    only_last = tok.decode([t for t, lab in zip(ids, last) if lab != IGNORE])
    assert only_last.startswith("json as well") and sum(lab != IGNORE for lab in last) < sum(lab != IGNORE for lab in labels)
    # a single turn renders exactly as before: prompt and assistant header masked, answer + end of turn learned
    one_ids, one_labels = render_example(tok, "Which module has dumps?", "json")
    head = chat_ids(tok, [TURNS[1]], add_generation_prompt=True)
    assert one_labels == [IGNORE] * len(head) + one_ids[len(head):]

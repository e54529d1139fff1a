"""Record validation: each bad record is named by file, line and field; property tests on the validators."""
import json

import pytest

from refinery.data.records import SCHEMAS, check_record, load_valid
from refinery.errors import UserError

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


def jsonl(tmp_path, lines, name="d.jsonl"):
    p = tmp_path / name
    p.write_bytes(b"".join((x if isinstance(x, bytes) else x.encode()) + b"\n" for x in lines))
    return p


GOOD = json.dumps({"id": "a", "prompt": "p", "response": "r"})


@pytest.mark.parametrize("line,expect", [
    ('{"id": "b", "prompt": "p"', ":2: malformed JSON"),
    ('{"id": "b", "prompt": "p"}', ":2: field 'response': missing"),
    ('{"id": "b", "prompt": "p", "response": 3}', ":2: field 'response': expected a string, got int"),
    ('{"id": "b", "prompt": "  ", "response": "r"}', ":2: field 'prompt': empty"),
    (b'{"id": "b", "prompt": "\xff", "response": "r"}', ":2: not valid UTF-8"),
    ('["a list"]', ":2: expected a JSON object"),
    ('{"id": "a", "prompt": "q", "response": "r"}', ":2: field 'id': duplicate id (first on line 1)"),
])
def test_bad_record_error_names_file_line_field(tmp_path, line, expect):
    path = jsonl(tmp_path, [GOOD, line])
    with pytest.raises(UserError) as info:
        load_valid(path, "sft", "error")
    assert str(info.value).startswith(str(path)) and expect in str(info.value)


def test_skip_mode_drops_and_reports(tmp_path):
    path = jsonl(tmp_path, [GOOD, '{"id": "b"}', GOOD.replace('"a"', '"c"')])
    kept, dropped = load_valid(path, "sft", "skip")
    assert [r["id"] for r in kept] == ["a"]
    assert [d.line for d in dropped] == [2, 3]  # a missing field, then a content duplicate of line 1


def test_empty_and_missing_files(tmp_path):
    with pytest.raises(UserError, match="empty data set"):
        load_valid(jsonl(tmp_path, []), "sft", "error")
    with pytest.raises(UserError, match="not found"):
        load_valid(tmp_path / "nope.jsonl", "sft", "error")


def test_preference_pair_must_differ():
    assert check_record("preferences", {"id": "1", "prompt": "p", "chosen": "x", "rejected": " x "})[0] == "rejected"


def test_too_long_is_reported_with_field(tmp_path):
    path = jsonl(tmp_path, [GOOD])
    with pytest.raises(UserError, match=r":1: field 'response': 50 tokens, longer than the limit of 10"):
        load_valid(path, "sft", "error", length_of=lambda r: (50, "response"), max_length=10)


values = st.one_of(st.text(max_size=8), st.sampled_from(["", " ", "ok", "\ufffd"]), st.integers(), st.none(),
                   st.booleans())


@settings(suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(kind=st.sampled_from(sorted(SCHEMAS)), rec=st.dictionaries(st.sampled_from(["id", "text", "prompt", "response",
       "chosen", "rejected", "reference", "extra"]), values))
def test_validator_accepts_exactly_complete_string_records(kind, rec):
    problem = check_record(kind, rec)
    fields = SCHEMAS[kind]
    complete = all(isinstance(rec.get(f), str) and rec[f].strip() and "\ufffd" not in rec[f] for f in fields)
    if kind == "preferences" and complete:
        complete = rec["chosen"].strip() != rec["rejected"].strip()
    assert (problem is None) == bool(complete)
    if problem is not None:
        assert problem[0] in fields and problem[1]


@settings(deadline=None, max_examples=40)  # each example is a `datasets` load (~50 ms; the first imports it)
@given(st.text(min_size=1).filter(lambda s: s.strip() and "\ufffd" not in s))
def test_roundtrip_through_jsonl(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("h") / "c.jsonl"
    path.write_text(json.dumps({"id": "x", "text": text}, ensure_ascii=False) + "\n", encoding="utf-8")
    kept, _ = load_valid(path, "corpus", "error")
    assert kept[0]["text"] == text

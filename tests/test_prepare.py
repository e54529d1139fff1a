"""The prepare stage on the real demo data: deterministic split, report, and nothing written on bad input."""
import json

import pytest

from refinery.atomic import atomic_dir
from refinery.config import load_params
from refinery.data.prepare import prepare_all, split_of
from refinery.errors import UserError
from refinery.modeling.loading import load_tokenizer


def test_demo_data_prepared(prepared):
    report_sets = {p.parent.relative_to(prepared).as_posix() for p in prepared.rglob("train.jsonl")}
    assert report_sets == {"corpus", "preferences", "prompts", "sft/summarize", "sft/which_module", "sft/explain_topic"}
    for split in prepared.rglob("*.jsonl"):
        ids = [json.loads(line)["id"] for line in split.read_text().splitlines()]
        assert ids and len(ids) == len(set(ids))
    train = {json.loads(line)["id"] for line in (prepared / "corpus/train.jsonl").read_text().splitlines()}
    val = {json.loads(line)["id"] for line in (prepared / "corpus/validation.jsonl").read_text().splitlines()}
    assert not train & val and len(val) > 0


def test_split_is_deterministic_and_seeded():
    ids = [f"r{i}" for i in range(2000)]
    a = [split_of(i, 42, 0.1) for i in ids]
    assert a == [split_of(i, 42, 0.1) for i in ids]
    assert a != [split_of(i, 7, 0.1) for i in ids]
    assert 150 < a.count("validation") < 250


def _params_with_bad_corpus(project, on_bad):
    bad = project / "data" / "bad.jsonl"
    bad.write_text('{"id": "1", "text": "fine"}\n{"id": "2", "txt": "typo"}\n')
    text = (project / "params" / "prepare.yaml").read_text().replace("data/demo/corpus.jsonl", str(bad))
    (project / "params" / "prepare.yaml").write_text(text.replace("on_bad_record: error", f"on_bad_record: {on_bad}"))
    return load_params("prepare", project / "params"), bad


def test_bad_record_stops_and_writes_nothing(project):
    cfg, bad = _params_with_bad_corpus(project, "error")
    tok = load_tokenizer(project / "models" / "base")
    out = project / "data" / "prepared"
    with pytest.raises(UserError, match=rf"{bad}:2: field 'text': missing"):
        with atomic_dir(out) as tmp:
            prepare_all(cfg, tok, 2048, 42, tmp)
    assert not out.exists() and not list(out.parent.glob(".prepared*"))


def test_skip_mode_reports_dropped(project):
    cfg, bad = _params_with_bad_corpus(project, "skip")
    tok = load_tokenizer(project / "models" / "base")
    report = prepare_all(cfg, tok, 2048, 42, project / "out")
    corpus = report["sets"]["corpus"]
    assert corpus["kept"] == 1 and corpus["dropped"] == 1
    assert corpus["dropped_records"] == [f"{bad}:2: field 'text': missing"]

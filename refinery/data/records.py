"""Validate every record of a data set: schema, types, empty text, encoding, length, duplicates.

Sources are read and converted by formats.py (`datasets`); every problem is reported as
`file:line: field 'x': what is wrong` (`file: row N: ...` for Parquet/CSV/JSON arrays/folders), so a user
can open the file at the record. Validators are pure functions (property-tested in tests/test_records.py).
read_jsonl reads the prepared files (our own JSONL) and locates a malformed line in a user's JSONL file.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from refinery.data.formats import FORMATS, FieldProblem, Source, convert, detect_format, load_rows, to_source
from refinery.errors import UserError, where

# kind -> required fields of a converted record (extra fields are kept and ignored); `prompt` is a string or
# a list of messages (formats.py)
SCHEMAS: dict[str, tuple[str, ...]] = {
    "corpus": ("id", "text"),
    "sft": ("id", "prompt", "response"),
    "preferences": ("id", "prompt", "chosen", "rejected"),
    "prompts": ("id", "prompt", "reference"),
}


@dataclass(frozen=True)
class BadRecord:
    path: str
    line: int
    field: str | None
    reason: str
    row: int | None = None  # for sources without lines (Parquet, CSV, JSON arrays, folders): 1-based row

    def __str__(self) -> str:
        return f"{where(self.path, self.line, self.field, self.row)}: {self.reason}"


def read_jsonl(path: str | Path) -> Iterator[tuple[int, dict | BadRecord]]:
    """Yield (line number, record) or (line number, BadRecord) for undecodable lines; blank lines are skipped."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: data file not found")
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield lineno, BadRecord(str(path), lineno, None, f"not valid UTF-8 (byte {exc.start})")
                continue
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as exc:
                yield lineno, BadRecord(str(path), lineno, None, f"malformed JSON ({exc.msg}, column {exc.colno})")
                continue
            if not isinstance(obj, dict):
                yield lineno, BadRecord(str(path), lineno, None, f"expected a JSON object, got {type(obj).__name__}")
                continue
            yield lineno, obj


def _line_numbers(path: Path) -> list[int]:
    """Line number of each non-blank line: the rows `datasets` reads from a JSONL file, in order."""
    with open(path, "rb") as fh:
        return [n for n, raw in enumerate(fh, start=1) if raw.strip()]


def source_rows(src: Source) -> Iterator[tuple[int | None, int | None, dict | BadRecord]]:
    """(line, row, record) for every row of a source. Read by `datasets`; a JSONL file it cannot parse is
    scanned line by line instead, so the error (or, under `skip`, the dropped record) names the line."""
    path = Path(src.path)
    is_jsonl = path.is_file() and path.suffix.lower() == ".jsonl"
    try:
        rows = load_rows(src)
    except UserError:
        if not is_jsonl:
            raise
        for lineno, rec in read_jsonl(path):
            yield lineno, None, rec
        return
    lines = _line_numbers(path) if is_jsonl else None
    for i, rec in enumerate(rows):
        yield (lines[i], None, rec) if lines else (None, i + 1, rec)


def check_record(kind: str, rec: dict) -> tuple[str | None, str] | None:
    """Return (field, reason) for the first problem in an already converted record, or None if it is valid."""
    for field in SCHEMAS[kind]:
        if field not in rec:
            return field, "missing"
        value = rec[field]
        if field == "prompt" and isinstance(value, list):
            continue  # a conversation: checked message by message when it was converted
        if not isinstance(value, str):
            return field, f"expected a string, got {type(value).__name__}"
        if not value.strip():
            return field, "empty"
    for field in SCHEMAS[kind]:
        if "\ufffd" in json.dumps(rec[field], ensure_ascii=False):
            return field, "contains the Unicode replacement character (text was mis-decoded upstream)"
    if kind == "preferences" and rec["chosen"].strip() == rec["rejected"].strip():
        return "rejected", "identical to 'chosen' (a preference pair needs two different answers)"
    return None


def check_length(n_tokens: int, max_length: int, field: str) -> tuple[str, str] | None:
    if n_tokens > max_length:
        return field, f"{n_tokens} tokens, longer than the limit of {max_length}"
    return None


def load_valid(src: str | Path | Source, kind: str, on_bad: str,
               length_of: Callable[[dict], tuple[int, str]] | None = None,
               max_length: int | None = None) -> tuple[list[dict], list[BadRecord]]:
    """Converted, validated records of one source, deduplicated by content; bad ones raise (on_bad='error')
    or are returned. The format is `src.format`, or detected from the union of the records' columns."""
    src = to_source(src)
    kept: list[dict] = []
    dropped: list[BadRecord] = []
    seen_ids: dict[str, str] = {}
    seen_content: dict[str, str] = {}
    fmt = None if src.format == "auto" else src.format
    if fmt is not None and fmt not in FORMATS[kind]:
        raise UserError(f"{src.path}: format '{fmt}' is not a {kind} format (one of {', '.join(FORMATS[kind])})")

    def bad(b: BadRecord):
        if on_bad == "error":
            raise UserError(str(b))
        dropped.append(b)

    rows = list(source_rows(src))
    if fmt is None:
        columns = set().union(*(set(raw) for _, _, raw in rows if isinstance(raw, dict)))
        if columns:
            try:
                fmt = detect_format(kind, columns)
            except UserError as exc:
                raise UserError(f"{src.path}: {exc}") from None
    for line, row, raw in rows:
        at = f"line {line}" if line is not None else f"row {row}"
        if isinstance(raw, BadRecord):
            bad(raw)
            continue
        try:
            rec = convert(kind, fmt, raw)
        except FieldProblem as p:
            bad(BadRecord(src.path, line, p.field, p.reason, row))
            continue
        problem = check_record(kind, rec)
        if problem is None and length_of is not None and max_length is not None:
            n, field = length_of(rec)
            problem = check_length(n, max_length, field)
        if problem is not None:
            bad(BadRecord(src.path, line, *problem, row))
            continue
        content = " ".join(json.dumps([rec[f] for f in SCHEMAS[kind] if f != "id"], ensure_ascii=False).split())
        if content in seen_content:  # exact duplicates are dropped in both modes: they are not errors
            dropped.append(BadRecord(src.path, line, None, f"duplicate content (same as {seen_content[content]})", row))
            continue
        if rec["id"] in seen_ids:
            bad(BadRecord(src.path, line, "id", f"duplicate id (first on {seen_ids[rec['id']]})", row))
            continue
        seen_ids[rec["id"]] = at
        seen_content[content] = at
        kept.append(rec)
    if not kept:
        raise UserError(f"{src.path}: no valid records ({len(dropped)} dropped)" if dropped
                        else f"{src.path}: empty data set")
    return kept, dropped

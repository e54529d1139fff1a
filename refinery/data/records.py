"""Read JSONL data sets and validate every record: schema, types, empty text, encoding, length.

Every problem is reported as `file:line: field 'x': what is wrong`, so a user can open the file at
the line. Validators are pure functions (property-tested in tests/test_records.py).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from refinery.errors import UserError, where

# kind -> required string fields (extra fields are kept and ignored)
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

    def __str__(self) -> str:
        return f"{where(self.path, self.line, self.field)}: {self.reason}"


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


def check_record(kind: str, rec: dict) -> tuple[str | None, str] | None:
    """Return (field, reason) for the first problem in `rec`, or None if it is valid."""
    for field in SCHEMAS[kind]:
        if field not in rec:
            return field, "missing"
        value = rec[field]
        if not isinstance(value, str):
            return field, f"expected a string, got {type(value).__name__}"
        if not value.strip():
            return field, "empty"
        if "\ufffd" in value:
            return field, "contains the Unicode replacement character (text was mis-decoded upstream)"
    if kind == "preferences" and rec["chosen"].strip() == rec["rejected"].strip():
        return "rejected", "identical to 'chosen' (a preference pair needs two different answers)"
    return None


def check_length(n_tokens: int, max_length: int, field: str) -> tuple[str, str] | None:
    if n_tokens > max_length:
        return field, f"{n_tokens} tokens, longer than the limit of {max_length}"
    return None


def load_valid(path: str | Path, kind: str, on_bad: str,
               length_of: Callable[[dict], tuple[int, str]] | None = None,
               max_length: int | None = None) -> tuple[list[dict], list[BadRecord]]:
    """Validated records of one file, deduplicated by content; bad ones raise (on_bad='error') or are returned."""
    kept: list[dict] = []
    dropped: list[BadRecord] = []
    seen_ids: dict[str, int] = {}
    seen_content: dict[tuple, int] = {}
    fields = SCHEMAS[kind]

    def bad(b: BadRecord):
        if on_bad == "error":
            raise UserError(str(b))
        dropped.append(b)

    for lineno, rec in read_jsonl(path):
        if isinstance(rec, BadRecord):
            bad(rec)
            continue
        problem = check_record(kind, rec)
        if problem is None and length_of is not None and max_length is not None:
            n, field = length_of(rec)
            problem = check_length(n, max_length, field)
        if problem is not None:
            bad(BadRecord(str(path), lineno, *problem))
            continue
        if rec["id"] in seen_ids:
            bad(BadRecord(str(path), lineno, "id", f"duplicate id (first on line {seen_ids[rec['id']]})"))
            continue
        content = tuple(" ".join(rec[f].split()) for f in fields if f != "id")
        if content in seen_content:  # exact duplicates are dropped in both modes: they are not errors
            dropped.append(BadRecord(str(path), lineno, None, f"duplicate content (same as line {seen_content[content]})"))
            continue
        seen_ids[rec["id"]] = lineno
        seen_content[content] = lineno
        kept.append({f: rec[f] for f in rec})
    if not kept:
        raise UserError(f"{path}: no valid records ({len(dropped)} dropped)" if dropped else f"{path}: empty data set")
    return kept, dropped

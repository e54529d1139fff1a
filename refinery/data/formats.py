"""The data formats users bring, read by Hugging Face `datasets` and turned into the one record shape every
stage reads.

Sources (params/prepare.yaml `datasets.*`: a path, or `{path, format, revision, split}`):
    .jsonl / .json / .parquet / .csv files, a folder written by `Dataset.save_to_disk`, or a hub dataset
    name (with `revision` pinned; offline, loading it is the one-line error).
Formats, detected from the columns unless `format:` says which:
    sft          prompt_response (`prompt`, `response`) | messages (`messages`: role/content turns, optional
                 system turn, the last turn the assistant's) | sharegpt (`conversations`: from/value) |
                 alpaca (`instruction`, optional `input`, `output`)
    preferences  preference (`prompt`, `chosen`, `rejected` as strings, or TRL's conversational form: `prompt`
                 a message list, `chosen`/`rejected` one-assistant-message lists) | preference_implicit
                 (`chosen`/`rejected` whole conversations with a shared prefix: TRL's implicit prompt)
    prompts      prompt_reference (`prompt`, `reference`) | messages (the last turn the reference answer)
    corpus       text (`text`)
The record every stage reads: `prompt` is a string (one user turn) or a list of {role, content} messages
ending with a user turn (TRL's conversational convention), plus `response` | `chosen`+`rejected` |
`reference` as strings. `id` is optional in every format: a hash of the content when absent. Other columns
(`task`, `source`...) are kept.

A conversion problem is a `FieldProblem(field, reason)`; records.py turns it into `file:line: field ...`
(`file: row N: ...` for formats without lines).
"""
from __future__ import annotations

import hashlib
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from refinery.errors import UserError

FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
ROLES = {"system", "user", "assistant"}
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "model": "assistant"}
FORMATS = {
    "sft": ("prompt_response", "messages", "sharegpt", "alpaca"),
    "preferences": ("preference", "preference_implicit"),
    "prompts": ("prompt_reference", "messages"),
    "corpus": ("text",),
}


class FieldProblem(Exception):
    """A record that cannot be converted: which field, and why."""

    def __init__(self, field: str | None, reason: str) -> None:
        super().__init__(reason)
        self.field, self.reason = field, reason


@dataclass(frozen=True)
class Source:
    path: str
    format: str = "auto"
    revision: str | None = None
    split: str = "train"


def to_source(src) -> Source:
    """A Source from what names a data set: a Source, a path, or params/prepare.yaml's
    {path, format, revision, split} block (config.DataSourceParams)."""
    if isinstance(src, Source):
        return src
    if isinstance(src, (str, Path)):
        return Source(str(src))
    return Source(src.path, src.format, src.revision, src.split)


# --------------------------------------------------------------------------- reading (datasets)

def is_hub_name(path: str) -> bool:
    """A hub dataset name: not on disk, no file suffix we read, at most one '/' (owner/name)."""
    p = Path(path)
    return not p.exists() and p.suffix.lower() not in FILE_BUILDERS and path.count("/") <= 1 and not path.startswith(".")


def load_rows(src: Source) -> list[dict]:
    """Every row of the source as a dict, through `datasets`. Raises UserError naming the source when it cannot
    be read (records.py locates a malformed JSONL line itself: datasets' JSON reader does not say which)."""
    import datasets

    datasets.utils.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    path = Path(src.path)
    try:
        if path.is_dir():
            loaded = datasets.load_from_disk(str(path))
            if isinstance(loaded, datasets.DatasetDict):
                if src.split not in loaded:
                    raise UserError(f"{path}: no split '{src.split}' (has {', '.join(loaded)}); set `split:`")
                loaded = loaded[src.split]
            return loaded.to_list()
        if path.is_file():
            builder = FILE_BUILDERS.get(path.suffix.lower())
            if builder is None:
                raise UserError(f"{path}: unsupported file type '{path.suffix}' "
                                f"(read: {', '.join(FILE_BUILDERS)}, a save_to_disk folder or a hub dataset name)")
            # a throw-away cache: a stale Arrow cache of an edited file can never be read back
            with tempfile.TemporaryDirectory(prefix="refinery-datasets-") as cache:
                ds = datasets.load_dataset(builder, data_files=str(path), split="train", cache_dir=cache)
                return ds.to_list()
        if not is_hub_name(src.path):
            raise UserError(f"{path}: data file not found")
        ds = datasets.load_dataset(src.path, revision=src.revision, split=src.split)
        return ds.to_list()
    except UserError:
        raise
    except Exception as exc:  # datasets/pyarrow raise many types; the user needs the source and the first line
        what = "hub dataset" if not path.exists() else "data file"
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise UserError(f"{src.path}: {what} could not be read by datasets: {first}") from exc


def hub_revision(src: Source) -> str | None:
    """The commit a hub source resolved to (recorded in the prepare report, so dvc.lock pins it)."""
    if not is_hub_name(src.path):
        return None
    try:
        from huggingface_hub import HfApi

        return HfApi().dataset_info(src.path, revision=src.revision).sha
    except Exception:  # offline after a cached load: the pinned revision is all we know
        return src.revision


# --------------------------------------------------------------------------- format detection

# kind -> (column that marks a format, format), first match wins: one column decides, so a record that lacks
# one of its format's other fields is reported as that field missing, not as an unknown format
SIGNATURES = {
    "corpus": (("text", "text"),),
    "sft": (("messages", "messages"), ("conversations", "sharegpt"), ("instruction", "alpaca"),
            ("prompt", "prompt_response"), ("response", "prompt_response")),
    "preferences": (("prompt", "preference"), ("chosen", "preference_implicit"), ("rejected", "preference_implicit")),
    "prompts": (("prompt", "prompt_reference"), ("reference", "prompt_reference"), ("messages", "messages")),
}


def detect_format(kind: str, columns: set[str]) -> str:
    """The format of a data set from the union of its records' columns."""
    for column, fmt in SIGNATURES[kind]:
        if column in columns:
            return fmt
    raise UserError(f"cannot tell the {kind} format from the columns {sorted(columns)}: expected one of "
                    f"{', '.join(FORMATS[kind])} (see refinery/data/formats.py), or set `format:`")


# --------------------------------------------------------------------------- conversion

def _text(rec: dict, field: str, label: str | None = None) -> str:
    label = label or field
    if field not in rec or rec[field] is None:
        raise FieldProblem(label, "missing")
    value = rec[field]
    if not isinstance(value, str):
        raise FieldProblem(label, f"expected a string, got {type(value).__name__}")
    if not value.strip():
        raise FieldProblem(label, "empty")
    return value


def _messages(value: Any, field: str, role_key: str = "role", content_key: str = "content",
              roles: dict[str, str] | None = None, alternate: bool = True) -> list[dict]:
    if value is None:
        raise FieldProblem(field, "missing")
    if not isinstance(value, list) or not value:
        raise FieldProblem(field, "expected a non-empty list of messages")
    out = []
    for i, m in enumerate(value):
        at = f"{field}[{i}]"
        if not isinstance(m, dict):
            raise FieldProblem(at, f"expected an object with '{role_key}' and '{content_key}'")
        role = m.get(role_key)
        mapped = (roles or {r: r for r in ROLES}).get(role) if isinstance(role, str) else None
        if mapped is None:
            raise FieldProblem(f"{at}.{role_key}", f"unknown role {role!r} (expected one of "
                                                   f"{', '.join(sorted(roles or ROLES))})")
        out.append({"role": mapped, "content": _text(m, content_key, f"{at}.{content_key}")})
    for i, m in enumerate(out):
        if m["role"] == "system" and i > 0:
            raise FieldProblem(f"{field}[{i}].{role_key}", "a system message must come first")
    turns = out[1:] if out[0]["role"] == "system" else out
    for j, m in enumerate(turns if alternate else []):  # chat templates assume user, assistant, user, ...
        expected = "user" if j % 2 == 0 else "assistant"
        if m["role"] != expected:
            article = "an" if expected == "assistant" else "a"
            raise FieldProblem(f"{field}[{j + len(out) - len(turns)}].{role_key}",
                               f"expected {article} {expected} turn (roles alternate, starting with the user), "
                               f"got {m['role']}")
    return out


def _split_last_assistant(msgs: list[dict], field: str) -> tuple[list[dict], str]:
    """(context ending with a user turn, the final assistant answer)."""
    if msgs[-1]["role"] != "assistant":
        raise FieldProblem(f"{field}[{len(msgs) - 1}]", "the last message must be the assistant's answer")
    context = msgs[:-1]
    if not context or context[-1]["role"] != "user":
        raise FieldProblem(field, "the assistant's answer must follow a user message")
    return context, msgs[-1]["content"]


def _prompt(context: list[dict]) -> str | list[dict]:
    """One plain user turn stays a string (as our own format has it); anything else stays a message list."""
    return context[0]["content"] if len(context) == 1 and context[0]["role"] == "user" else context


def _prompt_field(rec: dict) -> str | list[dict]:
    value = rec.get("prompt")
    if isinstance(value, list):
        msgs = _messages(value, "prompt")
        if msgs[-1]["role"] != "user":
            raise FieldProblem(f"prompt[{len(msgs) - 1}]", "a prompt must end with a user message")
        return _prompt(msgs)
    return _text(rec, "prompt")


def _answer(rec: dict, field: str) -> str:
    """A preference answer: a string, or (TRL conversational) a list holding one assistant message."""
    value = rec.get(field)
    if isinstance(value, list):
        msgs = _messages(value, field, alternate=False)
        if len(msgs) != 1 or msgs[0]["role"] != "assistant":
            raise FieldProblem(field, "expected one assistant message (the prompt goes in 'prompt')")
        return msgs[0]["content"]
    return _text(rec, field)


def _sft(rec: dict, fmt: str) -> dict:
    if fmt == "prompt_response":
        return {"prompt": _prompt_field(rec), "response": _text(rec, "response")}
    if fmt == "alpaca":
        instruction = _text(rec, "instruction")
        extra = rec.get("input")
        if extra is not None and not isinstance(extra, str):
            raise FieldProblem("input", f"expected a string, got {type(extra).__name__}")
        user = f"{instruction}\n\n{extra}" if extra and extra.strip() else instruction
        return {"prompt": user, "response": _text(rec, "output")}
    msgs = (_messages(rec.get("messages"), "messages") if fmt == "messages" else
            _messages(rec.get("conversations"), "conversations", "from", "value", SHAREGPT_ROLES))
    context, answer = _split_last_assistant(msgs, "messages" if fmt == "messages" else "conversations")
    return {"prompt": _prompt(context), "response": answer}


def _preference(rec: dict, fmt: str) -> dict:
    if fmt == "preference":
        return {"prompt": _prompt_field(rec), "chosen": _answer(rec, "chosen"), "rejected": _answer(rec, "rejected")}
    chosen, rejected = _messages(rec.get("chosen"), "chosen"), _messages(rec.get("rejected"), "rejected")
    c_ctx, c_ans = _split_last_assistant(chosen, "chosen")
    r_ctx, r_ans = _split_last_assistant(rejected, "rejected")
    if c_ctx != r_ctx:
        raise FieldProblem("rejected", "the conversation before the answer differs from 'chosen' (no shared prompt)")
    return {"prompt": _prompt(c_ctx), "chosen": c_ans, "rejected": r_ans}


def _prompts(rec: dict, fmt: str) -> dict:
    if fmt == "prompt_reference":
        return {"prompt": _prompt_field(rec), "reference": _text(rec, "reference")}
    context, answer = _split_last_assistant(_messages(rec.get("messages"), "messages"), "messages")
    return {"prompt": _prompt(context), "reference": answer}


CONVERTERS: dict[str, Callable[[dict, str], dict]] = {
    "sft": _sft, "preferences": _preference, "prompts": _prompts,
    "corpus": lambda rec, fmt: {"text": _text(rec, "text")},
}
# columns a format consumes; every other column is carried along unchanged
CONSUMED = {"messages", "conversations", "instruction", "input", "output", "prompt", "response", "chosen",
            "rejected", "reference", "text", "id"}


def content_id(kind: str, record: dict) -> str:
    """A stable id for a record without one: a hash of what it says."""
    digest = hashlib.sha256(json.dumps(record, sort_keys=True, ensure_ascii=False).encode()).hexdigest()
    return f"{kind}:{digest[:16]}"


def convert(kind: str, fmt: str, rec: dict) -> dict:
    """One source row -> the record the stages read (raises FieldProblem)."""
    if not isinstance(rec, dict):
        raise FieldProblem(None, f"expected an object, got {type(rec).__name__}")
    out = CONVERTERS[kind](rec, fmt)
    rid = rec.get("id")
    if rid is None:
        rid = content_id(kind, out)
    elif isinstance(rid, (int, str)) and not isinstance(rid, bool) and str(rid).strip():
        rid = str(rid)
    else:
        raise FieldProblem("id", "expected a non-empty string or an integer")
    extra = {k: v for k, v in rec.items() if k not in CONSUMED and v is not None}
    return {"id": rid, **extra, **out}


def prompt_text(prompt: str | list[dict]) -> str:
    """What a person reads as the prompt: the string, or the last user turn of a conversation."""
    if isinstance(prompt, str):
        return prompt
    return next(m["content"] for m in reversed(prompt) if m["role"] == "user")

"""The `prepare` stage's logic: validate, deduplicate and split every raw data set deterministically.

Layout written under data/prepared/:
    corpus/{train,validation}.jsonl
    sft/<task>/{train,validation}.jsonl
    preferences/{train,validation}.jsonl
    prompts/{train,validation}.jsonl
    report.json        counts per set, dropped records and why (also metrics/prepare.json)
The split is by a hash of (seed, record id), so it is stable when records are added or removed.
"""
from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

from refinery.config import PrepareParams
from refinery.data.chat import conversation_ids, prompt_ids
from refinery.data.formats import hub_revision, is_hub_name, to_source
from refinery.data.records import BadRecord, load_valid

SPLITS = ("train", "validation")


def id_position(record_id: str, seed: int) -> float:
    """Where a record's id hashes to in [0, 1): what decides its split."""
    digest = hashlib.sha256(f"{seed}:{record_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_of(record_id: str, seed: int, validation_fraction: float) -> str:
    return "validation" if id_position(record_id, seed) < validation_fraction else "train"


def split_records(records: list[dict], seed: int, fraction: float, min_validation: int = 0) -> dict[str, list[dict]]:
    """A record's side comes from the hash of its id (stable when other records change). With
    `min_validation`, a set whose hash split holds out fewer also holds out the train records with the next
    lowest hashes, up to min(min_validation, half the set)."""
    out: dict[str, list[dict]] = {s: [] for s in SPLITS}
    for rec in records:
        out[split_of(rec["id"], seed, fraction)].append(rec)
    short = min(min_validation, len(records) // 2) - len(out["validation"])
    if short > 0:
        by_hash = sorted(out["train"], key=lambda r: id_position(r["id"], seed))
        moved = {id(r) for r in by_hash[:short]}
        out["validation"] += [r for r in out["train"] if id(r) in moved]
        out["train"] = [r for r in out["train"] if id(r) not in moved]
    # a tiny set could hash entirely to one side: keep at least one record on each side
    for a, b in (("train", "validation"), ("validation", "train")):
        if not out[a] and len(out[b]) > 1:
            out[a].append(out[b].pop())
    return out


def token_length_fns(tokenizer):
    """Length in tokens of what each stage will actually feed the model (chat-rendered where it applies)."""

    def chat_len(prompt: str, answer: str | None) -> int:
        return len(prompt_ids(tokenizer, prompt) if answer is None else conversation_ids(tokenizer, prompt, answer))

    return {
        "sft": lambda r: (chat_len(r["prompt"], r["response"]), "response"),
        "preferences": lambda r: (max(chat_len(r["prompt"], r["chosen"]), chat_len(r["prompt"], r["rejected"])), "chosen"),
        "prompts": lambda r: (chat_len(r["prompt"], None), "prompt"),
    }


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        for rec in records:
            fh.write(json.dumps(rec, ensure_ascii=False, sort_keys=True) + "\n")


def prepare_all(params: PrepareParams, tokenizer, model_max_length: int, seed: int, out: Path) -> dict:
    """Validate everything first (so a bad record stops the stage before anything is written), then write."""
    max_len = min(params.max_length, model_max_length)
    lengths = token_length_fns(tokenizer)
    ds = params.datasets
    sets = {name: (to_source(src), kind) for name, (src, kind) in ds.sources().items()}

    loaded: dict[str, tuple[list[dict], list[BadRecord]]] = {}
    for name, (src, kind) in sets.items():
        # the corpus is chunked into blocks by DAPT, so its documents have no length limit
        fn = None if kind == "corpus" else lengths[kind]
        loaded[name] = load_valid(src, kind, params.on_bad_record, fn, max_len)

    report: dict = {"max_length": max_len, "on_bad_record": params.on_bad_record, "sets": {}}
    for name, (records, dropped) in loaded.items():
        parts = ({"validation": records} if name == "general" else
                 split_records(records, seed, params.validation_fraction, params.min_validation))
        for split, recs in parts.items():
            write_jsonl(out / name / f"{split}.jsonl", recs)
        src = sets[name][0]
        report["sets"][name] = {
            "source": src.path,
            **({"format": src.format} if src.format != "auto" else {}),
            **({"revision": hub_revision(src)} if is_hub_name(src.path) else {}),
            "kept": len(records),
            "train": len(parts.get("train", [])),
            "validation": len(parts["validation"]),
            "dropped": len(dropped),
            "dropped_by_reason": dict(Counter(_reason_kind(b) for b in dropped)),
            "dropped_records": [str(b) for b in dropped[:50]],
        }
    if ds.general is None:  # an empty general set: the stages that depend on data/prepared/general skip retention
        write_jsonl(out / "general" / "validation.jsonl", [])
    report["total"] = {k: sum(s[k] for s in report["sets"].values()) for k in ("kept", "train", "validation", "dropped")}
    return report


def _reason_kind(b: BadRecord) -> str:
    head = b.reason.split(" (")[0]
    return f"{b.field}: {head}" if b.field else head

"""DAPT data: the prepared in-domain corpus, tokenized and packed (or chunked, for virtual-token methods)."""
from __future__ import annotations

from pathlib import Path

from refinery.data.packing import chunk_documents, pack_documents, rows_to_list
from refinery.data.records import read_jsonl


def corpus_rows(path: Path, tokenizer, block_size: int, packed: bool) -> list[dict]:
    texts = [rec["text"] for _, rec in read_jsonl(path)]
    docs = tokenizer(texts, add_special_tokens=False)["input_ids"]
    if packed:
        rows = pack_documents(docs, block_size, tokenizer.eos_token_id, tokenizer.pad_token_id)
    else:
        rows = chunk_documents(docs, block_size, tokenizer.eos_token_id)
    return rows_to_list(rows)


def sample_prompts(path: Path, n: int, words: int = 24) -> list[str]:
    texts = [rec["text"] for _, rec in read_jsonl(path)][:n]
    return [" ".join(t.split()[:words]) for t in texts]

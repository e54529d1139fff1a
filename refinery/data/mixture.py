"""The SFT task mixture: per-task pools of rendered examples, sampled by weight into training rows."""
from __future__ import annotations

import random
from pathlib import Path

from refinery.data.packing import pack_examples
from refinery.data.records import read_jsonl
from refinery.errors import UserError


def load_task(folder: Path, task: str, split: str) -> list[dict]:
    path = folder / task / f"{split}.jsonl"
    if not path.is_file():
        raise UserError(f"{path}: no prepared data for SFT task '{task}' (is it listed in params/prepare.yaml?)")
    return [rec for _, rec in read_jsonl(path)]


def mixture_probs(sizes: dict[str, int], weights: dict[str, float], mixing: str, temperature: float) -> dict[str, float]:
    raw = {t: weights[t] * sizes[t] for t in sizes}
    if mixing == "temperature":
        raw = {t: v ** (1.0 / temperature) for t, v in raw.items()}
    total = sum(raw.values())
    return {t: v / total for t, v in raw.items()}


def sample_mixture(pools: dict[str, list], probs: dict[str, float], seed: int):
    """Endless stream of (task, example): task drawn by `probs`, examples cycled in a seeded shuffled order."""
    rng = random.Random(seed)
    order = {t: rng.sample(range(len(p)), len(p)) for t, p in pools.items()}
    pos = dict.fromkeys(pools, 0)
    names = sorted(pools)
    while True:
        t = rng.choices(names, weights=[probs[n] for n in names])[0]
        if pos[t] == len(order[t]):
            rng.shuffle(order[t])
            pos[t] = 0
        yield t, pools[t][order[t][pos[t]]]
        pos[t] += 1


def build_train_rows(pools: dict[str, list[tuple[list[int], list[int]]]], probs: dict[str, float], n_rows: int,
                     block_size: int, packed: bool, seed: int) -> tuple[list[dict], dict[str, int]]:
    """Exactly n_rows training rows drawn from the mixture, and how many examples of each task they hold.
    Packed rows take whole examples up to `block_size` tokens (an example is never split)."""
    counts = dict.fromkeys(pools, 0)
    stream = sample_mixture(pools, probs, seed)
    rows: list[dict] = []
    pending: tuple[str, tuple[list[int], list[int]]] | None = None
    while len(rows) < n_rows:
        row_examples, size = [], 0
        while True:
            t, ex = pending or next(stream)
            pending = None
            n = min(len(ex[0]), block_size)
            if row_examples and (not packed or size + n > block_size):
                pending = (t, ex)  # starts the next row
                break
            row_examples.append((t, (ex[0][:block_size], ex[1][:block_size])))
            size += n
            if not packed:
                break
        for t, _ in row_examples:
            counts[t] += 1
        rows.extend(pack_examples([ex for _, ex in row_examples], block_size) if packed else
                    [{"input_ids": row_examples[0][1][0], "labels": row_examples[0][1][1]}])
    return rows, counts

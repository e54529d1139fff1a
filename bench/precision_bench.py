"""fp32 against bf16 autocast on this machine, for what the demo spends its time on: a LoRA training step
of the default model on packed 2 x 512-token rows, batched greedy generation, and the held-out loss of the
same weights in both precisions (does bf16 change what the evaluation says?).

    python bench/precision_bench.py [--steps 4] [--out bench/results-precision.json]

This is what `precision: auto` (refinery/modeling/precision.py) rests on: on a CPU with AVX512-BF16 it picks
bf16 only because this measures it faster at an unchanged loss. Interleaved runs, the median reported.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from refinery.config import BaseModelParams, LoraArgs
from refinery.modeling.base_import import import_base
from refinery.modeling.precision import compute_precision, cpu_has_bf16


def lora(model):
    from peft import LoraConfig, get_peft_model

    a = LoraArgs()
    return get_peft_model(model, LoraConfig(r=a.r, lora_alpha=a.alpha, lora_dropout=0.0,
                                            target_modules=list(a.target_modules), task_type="CAUSAL_LM"))


def train_step_seconds(model, opt, ids, precision: str) -> float:
    t0 = time.perf_counter()
    with compute_precision(precision):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    opt.zero_grad()
    return time.perf_counter() - t0


@torch.no_grad()
def generate_seconds(model, ids, precision: str, new_tokens: int) -> float:
    t0 = time.perf_counter()
    with compute_precision(precision):
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                       min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    return time.perf_counter() - t0


@torch.no_grad()
def heldout_loss(model, ids, precision: str) -> float:
    with compute_precision(precision):
        return float(model(input_ids=ids, labels=ids).loss)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=4, help="timed steps per precision (after one warm-up each)")
    ap.add_argument("--out", default="bench/results-precision.json")
    args = ap.parse_args()
    torch.manual_seed(0)
    model, tok = import_base(BaseModelParams(source="smollm2"), seed=0, trust_remote_code=False)
    model = lora(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    g = torch.Generator().manual_seed(0)
    rows = torch.randint(100, 40000, (2, 512), generator=g)
    prompts = torch.randint(100, 40000, (8, 64), generator=g)
    heldout = torch.randint(100, 40000, (4, 256), generator=g)
    text = tok("The quick brown fox jumps over the lazy dog. " * 40, return_tensors="pt").input_ids[:, :256]
    times = {"fp32": {"train": [], "generate": []}, "bf16": {"train": [], "generate": []}}
    for p in times:  # warm-up (oneDNN kernels, allocator)
        train_step_seconds(model, opt, rows, p)
        generate_seconds(model, prompts, p, 4)
    for _ in range(args.steps):
        for p in times:  # interleaved, so drift on a shared VM hits both alike
            times[p]["train"].append(train_step_seconds(model, opt, rows, p))
            times[p]["generate"].append(generate_seconds(model, prompts, p, 32))
    model.eval()
    losses = {p: {"random_tokens": heldout_loss(model, heldout, p), "english": heldout_loss(model, text, p)}
              for p in times}
    med = {p: {k: statistics.median(v) for k, v in t.items()} for p, t in times.items()}
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
                   f"avx512_bf16/amx: {cpu_has_bf16()}",
        "torch": torch.__version__, "steps": args.steps,
        "median_seconds": med, "speedup_bf16": {k: round(med["fp32"][k] / med["bf16"][k], 3) for k in med["fp32"]},
        "loss": losses,
        "loss_difference": {k: round(losses["bf16"][k] - losses["fp32"][k], 5) for k in losses["fp32"]},
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

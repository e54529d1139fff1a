"""Padded against padding-free training batches on this machine, for the two stages whose batches pad: reward (a
batch's chosen and rejected sequences, PairCollator vs FlatPairCollator) and sft (packed 512-token rows, PadCollator
vs FlatCollator). The default model with the stage's LoRA, bf16 autocast where `precision: auto` picks it, the
stage's batch size, the demo's data in the stage's own rows (reward: its task-weighted pairs); a forward + backward per batch.

    dvc repro prepare   # models/base and data/prepared (the bench trains on the stages' own rows)
    python bench/padding_free_bench.py [--batches 12] [--repeats 3]  # -> bench/results-padding-free.json + .md

What `padding_free: auto` in params/reward.yaml (refinery/train/reward_model.padding_free_on) rests on, and why
params/sft.yaml keeps `padding_free: false` on a CPU. Interleaved runs (the order alternates), median reported,
the machine's load average recorded.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from refinery.config import LoraArgs, load_params  # noqa: E402
from refinery.modeling.precision import compute_precision, resolve  # noqa: E402


def with_lora(model, task_type: str):
    from peft import LoraConfig, get_peft_model

    a = LoraArgs()
    return get_peft_model(model, LoraConfig(r=a.r, lora_alpha=a.alpha, lora_dropout=0.0, task_type=task_type,
                                            target_modules=list(a.target_modules)))


def reward_case(batches: int):
    from flows.reward import load_inputs
    from refinery.train.reward_model import FlatPairCollator, PairCollator, bradley_terry_loss, sequence_scores

    # the stage's own training pairs: task_weights applied (the demo's which_module pairs 3x), in a shuffled order
    # as the trainer's sampler draws them (short which_module pairs batched with long summaries)
    job = load_inputs(str(ROOT / "params"), str(ROOT / "models/base"), str(ROOT / "data/prepared"), {})
    rows = list(job.train)
    random.Random(job.base.seed).shuffle(rows)
    size = job.cfg.training.batch_size
    data = [rows[i * size:(i + 1) * size] for i in range(batches)]
    model = with_lora(job.model, "SEQ_CLS")
    model.config.use_cache = False

    def loss(collate, batch):
        return bradley_terry_loss(*sequence_scores(model, collate(batch)).float().chunk(2))

    return model, data, {"padded": PairCollator(job.pad), "flat": FlatPairCollator()}, loss, \
        lambda b: sum(len(p["chosen"]) + len(p["rejected"]) for p in b)


def sft_case(batches: int):
    from flows.sft import load_inputs

    job = load_inputs(str(ROOT / "params"), str(ROOT / "models/base"), str(ROOT / "data/prepared"), {})
    from refinery.data.packing import FlatCollator, PadCollator

    size = job.cfg.training.batch_size
    data = [job.rows[i * size:(i + 1) * size] for i in range(batches)]
    model = with_lora(job.model, "CAUSAL_LM")
    model.config.use_cache = False
    return model, data, {"padded": PadCollator(job.tokenizer.pad_token_id), "flat": FlatCollator()}, \
        lambda collate, batch: model(**collate(batch)).loss, lambda b: sum(len(r["input_ids"]) for r in b)


def measure(name: str, case, batches: int, repeats: int, precision: str) -> dict:
    model, data, collators, loss_of, real_tokens = case(batches)
    real = sum(real_tokens(b) for b in data)
    positions = sum(collators["padded"](b)["input_ids"].numel() for b in data)
    seconds: dict[str, list[float]] = {k: [] for k in collators}
    losses: dict[str, float] = {}
    for rep in range(repeats):
        order = list(collators) if rep % 2 == 0 else list(collators)[::-1]
        for kind in order:
            t0, total = time.perf_counter(), 0.0
            for batch in data:
                with compute_precision(precision):
                    loss = loss_of(collators[kind], batch)
                loss.backward()
                model.zero_grad(set_to_none=True)
                total += float(loss.detach())
            seconds[kind].append(time.perf_counter() - t0)
            losses[kind] = total / len(data)
            print(f"{name} run {rep + 1}/{repeats} {kind}: {seconds[kind][-1]:.1f} s", flush=True)
    med = {k: statistics.median(v) for k, v in seconds.items()}
    return {"batches": batches, "batch_size": len(data[0]), "real_tokens": real, "padded_positions": positions,
            "padding_share": round(1 - real / positions, 4), "seconds": seconds,
            "median_seconds": {k: round(v, 2) for k, v in med.items()},
            "flat_speedup": round(med["padded"] / med["flat"], 3),
            "mean_loss": {k: round(v, 5) for k, v in losses.items()}}


def report(res: dict) -> str:
    lines = [f"# Padded vs padding-free training batches (`python bench/padding_free_bench.py --batches {res['batches']} "
             f"--repeats {res['repeats']}`)", "",
             f"{res['date']}, {res['machine']}, torch {res['torch']}, precision {res['precision']}, load average at "
             f"start {res['load_average_start']}, at end {res['load_average_end']}. SmolLM2-135M-Instruct with the "
             "stages' LoRA; the demo's data in the stages' own rows (reward: its task-weighted pairs, shuffled) and batch "
             "sizes; forward + backward per batch; "
             "runs interleaved (the order alternates), median of the repeats.", "",
             "| stage | batches x size | real tokens | padded positions | padding share | padded s | padding-free s "
             "| padding-free speed-up | mean loss padded / padding-free |", "|---|---|---|---|---|---|---|---|---|"]
    for stage in ("reward", "sft"):
        r = res[stage]
        lines.append(f"| {stage} | {r['batches']} x {r['batch_size']} | {r['real_tokens']:,} | {r['padded_positions']:,} "
                     f"| {r['padding_share']:.1%} | {r['median_seconds']['padded']} | {r['median_seconds']['flat']} "
                     f"| **{r['flat_speedup']:.2f}x** | {r['mean_loss']['padded']} / {r['mean_loss']['flat']} |")
    lines += ["", "The joined row's causal mask is block-diagonal, but under sdpa (the CPU's kernel) attention is computed "
              "over the whole row, so padding-free pays only where the padding it removes outweighs that: reward's "
              "pairs (short which_module answers batched with long summaries) yes, sft's packed rows no. Hence "
              "`padding_free: auto` in params/reward.yaml (on for a CPU) and `false` in params/sft.yaml. The losses agree "
              "to bf16 rounding (fp32 equality of loss and gradients: tests/test_packing.py, "
              "tests/test_reward_padding_free.py)."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", type=int, default=12)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "bench/results-padding-free.json"))
    ap.add_argument("--report", help="only write the report again from this results JSON")
    ap.add_argument("--md", default=str(ROOT / "bench/RESULTS-padding-free.md"), help="where the report goes")
    args = ap.parse_args()
    if args.report:
        res = json.loads(Path(args.report).read_text())
    else:
        for need in ("models/base", "data/prepared/preferences", "data/prepared/sft"):
            if not (ROOT / need).exists():
                sys.exit(f"bench/padding_free_bench.py: {need} is missing: run `dvc repro prepare` first")
        precision = resolve(load_params("base", str(ROOT / "params")).precision)
        res = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
               "torch": torch.__version__, "precision": precision, "batches": args.batches, "repeats": args.repeats,
               "load_average_start": [round(x, 2) for x in os.getloadavg()]}
        res["reward"] = measure("reward", reward_case, args.batches, args.repeats, precision)
        res["sft"] = measure("sft", sft_case, args.batches, args.repeats, precision)
        res["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
        Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    Path(args.md).write_text(report(res))
    print(report(res))


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Training throughput benchmark: our SFT and reward stages against TRL's SFTTrainer and RewardTrainer.

    python bench/bench.py --model tiny --steps 3          # quick check (random tiny model, seconds)
    python bench/bench.py --model both --steps 10         # the numbers in bench/RESULTS.md
    python bench/bench.py --model default --overhead      # + no-op `dvc repro` / skipped pipeline timings

For each model (`tiny`: a randomly initialised 2-layer Llama with the SmolLM2 tokenizer, built in a temp dir;
`default`: models/base, the SmolLM2-135M import made by the pipeline) four cases run, each in a fresh
subprocess of this script (`--only <case>`), so that peak memory (ru_maxrss) is per case and no state leaks:

    sft-ours     our packed rows + PadCollator + refinery.train.trainer.run_trainer (LoRA r16, block 512, batch 2 rows)
    sft-trl      trl.SFTTrainer on the same examples (packing=True, BFD, padding-free), same LoRA and optimiser
    reward-ours  refinery.train.reward_model.BradleyTerryTrainer via run_trainer (LoRA SEQ_CLS r16, batch 4 pairs)
    reward-ours-shared   the same with params/reward.yaml `share_prompts: true` (each pair's prompt computed once)
    reward-trl   trl.RewardTrainer on the same pairs, same model init, same LoRA and optimiser

Results go to <out>/RESULTS.md and <out>/results.json (overwritten by every run; see bench/README.md for how
tokens are counted on each side and what is and is not comparable).
"""
from __future__ import annotations

import argparse
import datetime as dt
import functools
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # `python bench/bench.py` puts bench/ on the path, not the repo root

CASES = ("sft-ours", "sft-trl", "reward-ours", "reward-trl", "reward-ours-shared")
SEED = 42
LORA_R, LORA_ALPHA = 16, 32
# SFT: as params/sft.yaml (block 512, batch 2 packed rows, lr 5e-4, cosine, 10% warmup, LoRA dropout 0.0)
SFT_BLOCK, SFT_BATCH, SFT_LR, SFT_LORA_DROPOUT = 512, 2, 5e-4, 0.0
# reward: as params/reward.yaml (max_length 512, batch 4 pairs, lr 5e-4, LoRA dropout 0.0)
RM_MAX_LEN, RM_BATCH, RM_LR, RM_LORA_DROPOUT = 512, 4, 5e-4, 0.0
WARMUP_RATIO, SCHEDULER, MAX_GRAD_NORM = 0.1, "cosine", 1.0
# bf16 peak dense tensor FLOP/s by GPU name, for model FLOPs utilisation (vendor datasheets, no sparsity)
PEAK_BF16_FLOPS = {"H200": 989.4e12, "H100": 989.4e12, "A100": 312e12, "L40S": 362.05e12, "A10G": 125e12}
PRECISION = "fp32"  # --precision: both sides train in it (bf16 = the Trainer's autocast on a GPU)
CHILD_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
             "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "DO_NOT_TRACK": "1"}


# ---------------------------------------------------------------------------------------------------------------
# measurement helpers (used inside the case subprocesses)
# ---------------------------------------------------------------------------------------------------------------
def rss_mb() -> float:
    """Current resident set size of this process (MiB)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


class Meter:
    """What the trainer actually trained on, counted from the batches `compute_loss` received in training mode:
    input tokens that are not padding, label positions that carry loss, and rows (sequences) per batch."""

    def __init__(self):
        self.tokens = self.loss_tokens = self.rows = self.batches = 0
        self.t_begin: float | None = None
        self.rss_before_train_mb: float | None = None
        self.steps: list[tuple[int, float, int, int]] = []  # (global_step, perf_counter, tokens so far, rows so far)


def metered(trainer_cls, meter: Meter):
    """`trainer_cls` with a compute_loss that counts the batch into `meter` before the usual loss."""

    class Metered(trainer_cls):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            real = inputs.pop("bench_real_tokens", None)  # set by CountingCollator (our padded packed rows)
            if model.training:
                ids = inputs["input_ids"]
                if real is not None:
                    n = int(real.sum())
                elif "pair_tokens" in inputs:  # our joined pairs: their tokens, a prompt shared by a pair counted twice
                    n = int(inputs["pair_tokens"])
                elif "attention_mask" in inputs:
                    n = int(inputs["attention_mask"].sum())
                else:  # TRL padding-free: one flattened row, no padding (pad_to_multiple_of is None off Neuron)
                    n = ids.numel()
                meter.tokens += n
                meter.rows += len(inputs["score_index"]) if "score_index" in inputs else ids.shape[0]  # joined pairs
                meter.batches += 1
                if "labels" in inputs:
                    meter.loss_tokens += int((inputs["labels"] != -100).sum())
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)

    Metered.__name__ = Metered.__qualname__ = f"Metered{trainer_cls.__name__}"
    return Metered


def step_clock(meter: Meter):
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        """Time and cumulative tokens at the end of every optimizer step (before any checkpoint save)."""

        def on_train_begin(self, args, state, control, **kw):
            meter.t_begin = time.perf_counter()
            meter.rss_before_train_mb = rss_mb()

        def on_step_end(self, args, state, control, **kw):
            meter.steps.append((state.global_step, time.perf_counter(), meter.tokens, meter.rows))

    return StepClock()


class CountingCollator:
    """Our PadCollator, plus the number of real (non-padding) tokens of the batch, which the metered trainer
    pops before the forward pass. Packed rows carry no attention mask, so padding cannot be told apart from
    content after collation (the pad id is also the end-of-turn id)."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, features):
        import torch

        out = self.inner(features)
        out["bench_real_tokens"] = torch.tensor([len(f["input_ids"]) for f in features])
        return out


def flops_per_token(model, tokens_per_row: float) -> tuple[float, str]:
    """Model FLOPs per trained token: k·N + 12·L·d·T (PaLM's formula), N = the weights in matrix products
    (embedding lookups excluded, a tied LM head included), T = mean row length, k = 6 when every weight
    trains and 4 when only an adapter does (frozen weights need no weight gradient: forward 2N + input
    gradients 2N). Attention's 12·L·d·T holds for both (it has no weights)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    cfg = inner.config
    n = sum(p.numel() for name, p in inner.named_parameters() if p.dim() == 2 and "embed" not in name
            and "lora_" not in name and "modules_to_save" not in name)
    if getattr(cfg, "tie_word_embeddings", False) and hasattr(inner, "lm_head"):
        n += cfg.vocab_size * cfg.hidden_size
    full = all(p.requires_grad for p in inner.parameters() if p.dim() == 2)
    k = 6 if full else 4
    attn = 12 * cfg.num_hidden_layers * cfg.hidden_size * tokens_per_row
    return k * n + attn, (f"{k}·N + 12·L·d·T, N={n / 1e6:.1f}M, L={cfg.num_hidden_layers}, d={cfg.hidden_size}, "
                          f"T={tokens_per_row:.0f}")


def mfu(tokens_per_second: float | None, fpt: float) -> float | None:
    import torch

    if not tokens_per_second or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(0)
    peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)
    return round(tokens_per_second * fpt / peak, 5) if peak else None


def summarise(case: str, meter: Meter, seconds: float, steps: int, per_step_pairs: int | None,
              trainer, extra: dict) -> dict:
    from refinery.train.trainer import peak_memory_mb

    res = {"case": case, "steps": steps, "seconds": round(seconds, 3), "tokens": meter.tokens,
           "loss_tokens": meter.loss_tokens, "tokens_per_second": round(meter.tokens / max(seconds, 1e-9), 2),
           "pairs": None, "pairs_per_second": None,
           "steady_tokens_per_second": None, "steady_pairs_per_second": None, "steady_seconds": None,
           "peak_memory_mb": round(peak_memory_mb(), 1),
           "rss_before_train_mb": round(meter.rss_before_train_mb or float("nan"), 1),
           "trainer_num_input_tokens_seen": int(trainer.state.num_input_tokens_seen),
           "final_loss": next((h["loss"] for h in reversed(trainer.state.log_history) if "loss" in h), None),
           "trainable_params": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
           "torch_threads": __import__("torch").get_num_threads()}
    marks = [meter.t_begin] + [t for _, t, _, _ in meter.steps] if meter.t_begin is not None else []
    res["step_seconds"] = [round(b - a, 3) for a, b in zip(marks, marks[1:])]
    if per_step_pairs:
        res["pairs"] = meter.rows // 2
        res["pairs_per_second"] = round(res["pairs"] / max(seconds, 1e-9), 3)
    if len(meter.steps) >= 2:  # steady state: end of step 1 -> end of the last step (no warm-up, no final save)
        (_, t1, k1, r1), (_, tn, kn, rn) = meter.steps[0], meter.steps[-1]
        dt_s = max(tn - t1, 1e-9)
        res["steady_seconds"] = round(dt_s, 3)
        res["steady_tokens_per_second"] = round((kn - k1) / dt_s, 2)
        if per_step_pairs:
            res["steady_pairs_per_second"] = round((rn - r1) / 2 / dt_s, 3)
    fpt, formula = flops_per_token(trainer.model, meter.tokens / max(meter.rows, 1))
    res["flops_per_token"], res["flops_formula"] = round(fpt), formula
    res["mfu"] = mfu(res["steady_tokens_per_second"] or res["tokens_per_second"], fpt)
    res.update(extra)
    return res


def training_kwargs(steps: int, batch: int, lr: float, out: Path, count_tokens: str) -> dict:
    """The TrainingArguments our run_trainer sets (refinery.train.trainer.training_arguments), for the TRL configs."""
    import torch

    return dict(output_dir=str(out), max_steps=steps, per_device_train_batch_size=batch,
                gradient_accumulation_steps=1, learning_rate=lr, weight_decay=0.0, warmup_steps=WARMUP_RATIO,
                lr_scheduler_type=SCHEDULER, max_grad_norm=MAX_GRAD_NORM, logging_steps=1,
                save_strategy="steps", save_steps=steps, save_total_limit=1, seed=SEED, data_seed=SEED,
                report_to="none", bf16=PRECISION == "bf16", fp16=False, use_cpu=not torch.cuda.is_available(),
                dataloader_num_workers=0, include_num_input_tokens_seen=count_tokens,
                activation_checkpointing=False, gradient_checkpointing=False, disable_tqdm=False)


def our_targs(steps: int, batch: int, lr: float):
    from refinery.config import TrainingArgs

    # one checkpoint, at the end, as the TRL side (save_steps=steps): both pay one save inside train()
    return TrainingArgs(max_steps=steps, batch_size=batch, grad_accum=1, lr=lr, weight_decay=0.0,
                        warmup_ratio=WARMUP_RATIO, scheduler=SCHEDULER, max_grad_norm=MAX_GRAD_NORM,
                        save_steps=steps, keep_checkpoints=1, precision=PRECISION, gradient_checkpointing=False)


def lora_params(dropout: float):
    from refinery.config import LoraArgs, MethodParams

    return MethodParams(method="lora", lora=LoraArgs(r=LORA_R, alpha=LORA_ALPHA, dropout=dropout))


# ---------------------------------------------------------------------------------------------------------------
# data: the same examples / pairs for both sides
# ---------------------------------------------------------------------------------------------------------------
def sft_data(tokenizer, data_dir: Path, steps: int):
    """Our packed rows (exactly steps*batch, as flows/sft.py builds them) and the raw records they hold, in order."""
    from refinery.config import load_params
    from refinery.data.chat import render_example
    from refinery.data.mixture import build_train_rows, load_task, mixture_probs, sample_mixture

    cfg = load_params("sft")  # the task list and mixture come from params/sft.yaml; hyper-parameters are fixed here
    records = {t: load_task(data_dir / "sft", t, "train") for t in cfg.tasks}
    pools = {t: [render_example(tokenizer, r["prompt"], r["response"]) for r in recs] for t, recs in records.items()}
    probs = mixture_probs({t: len(p) for t, p in pools.items()}, {t: s.weight for t, s in cfg.tasks.items()},
                          cfg.mixing, cfg.temperature)
    rows, counts = build_train_rows(pools, probs, steps * SFT_BATCH, SFT_BLOCK, True, SEED)
    # build_train_rows takes whole examples from the seeded mixture stream in order: the same stream over the
    # raw records (same pool sizes, same seed) yields the records those rows hold
    stream = sample_mixture(records, probs, SEED)
    used = [next(stream)[1] for _ in range(sum(counts.values()))]
    ours = [i for r in rows for i in r["input_ids"]]
    again = [i for rec in used for i in render_example(tokenizer, rec["prompt"], rec["response"])[0][:SFT_BLOCK]]
    if ours != again:
        raise RuntimeError("bench: could not recover the records held by the packed rows (mixture stream changed?)")
    stats = {"examples": len(used), "rows": len(rows), "row_tokens": len(ours),
             "row_loss_tokens": sum(1 for r in rows for x in r["labels"] if x != -100)}
    return rows, used, stats


def reward_data(tokenizer, data_dir: Path, steps: int):
    """The first steps*batch preference pairs whose both sides fit in max_length (ours would left-truncate a longer
    one and TRL would drop it: only pairs both sides keep intact are used)."""
    from refinery.data.records import read_jsonl
    from refinery.train.reward_model import render

    recs = [r for _, r in read_jsonl(data_dir / "preferences" / "train.jsonl")]
    fit = [r for r in recs if max(len(render(tokenizer, r["prompt"], r[k], 10**9)) for k in ("chosen", "rejected"))
           <= RM_MAX_LEN]
    want = steps * RM_BATCH
    used = fit[:want]
    stats = {"pairs_available": len(recs), "pairs_fitting": len(fit), "pairs_used": len(used),
             "epochs": round(want / max(len(used), 1), 2)}
    return used, stats


# ---------------------------------------------------------------------------------------------------------------
# the four cases
# ---------------------------------------------------------------------------------------------------------------
def case_sft_ours(model_dir: Path, data_dir: Path, steps: int, work: Path) -> dict:
    import torch

    from refinery.data.packing import batch_collator
    from refinery.modeling.loading import load_causal_lm, load_tokenizer
    from refinery.modeling.methods import apply_method
    from refinery.train.trainer import run_trainer

    tok = load_tokenizer(model_dir)
    rows, _, stats = sft_data(tok, data_dir, steps)
    model = load_causal_lm(model_dir)
    torch.manual_seed(SEED)
    model = apply_method(model, lora_params(SFT_LORA_DROPOUT), "CAUSAL_LM")
    meter = Meter()
    # the stage's collator (flows/sft.py): padded packed rows, the LM head on answer positions only
    summary, trainer = run_trainer(model, rows, CountingCollator(batch_collator(False, tok.pad_token_id, True)),
                                   our_targs(steps, SFT_BATCH, SFT_LR), work / "ckpt", SEED,
                                   trainer_cls=metered(__import__("transformers").Trainer, meter),
                                   count_tokens="all", callbacks=[step_clock(meter)])
    return summarise("sft-ours", meter, summary.seconds, summary.steps, None, trainer,
                     {"data": stats, "loss_mask": "ours: prompt + assistant header masked (render_example)",
                      "summary_tokens_all": summary.tokens, "summary_tokens_per_second": round(summary.tokens_per_second, 2)})


def case_sft_trl(model_dir: Path, data_dir: Path, steps: int, work: Path) -> dict:
    import torch
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from refinery.modeling.loading import load_causal_lm, load_tokenizer
    from refinery.modeling.methods import peft_config

    _, used, stats = sft_data(load_tokenizer(model_dir), data_dir, steps)
    conv = [{"messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["response"]}]}
            for r in used]
    pc = [{"prompt": [{"role": "user", "content": r["prompt"]}],
           "completion": [{"role": "assistant", "content": r["response"]}]} for r in used]
    # assistant_only_loss needs a template with {% generation %} markers (or one TRL can patch); otherwise the
    # conversational prompt/completion format with completion_only_loss masks exactly what ours masks
    attempts = [("assistant_only_loss (messages)", conv, {"assistant_only_loss": True}),
                ("completion_only_loss (conversational prompt/completion)", pc, {"completion_only_loss": True})]
    notes, meter, trainer, mode = [], Meter(), None, None
    for mode, rows, extra in attempts:
        tok = load_tokenizer(model_dir)
        model = load_causal_lm(model_dir)
        model.config.use_cache = False
        torch.manual_seed(SEED)
        args = SFTConfig(**training_kwargs(steps, SFT_BATCH, SFT_LR, work / "ckpt", "all"), max_length=SFT_BLOCK,
                         packing=True, packing_strategy="bfd", padding_free=True, dataset_num_proc=None, **extra)
        try:
            trainer = metered(SFTTrainer, meter)(model=model, args=args, train_dataset=Dataset.from_list(rows),
                                                 processing_class=tok, callbacks=[step_clock(meter)],
                                                 peft_config=peft_config(lora_params(SFT_LORA_DROPOUT), "CAUSAL_LM"))
        except Exception as exc:  # noqa: BLE001 - the next format is tried, the reason recorded
            notes.append(f"{mode} not usable, next format tried; TRL said: {type(exc).__name__}: "
                         f"{str(exc).strip().splitlines()[0][:300]}")
            continue
        break
    if trainer is None:
        raise RuntimeError("; ".join(notes))
    assert not trainer.args.gradient_checkpointing and trainer.args.bf16 == (PRECISION == "bf16")
    ds = trainer.train_dataset
    stats.update({"trl_bins": len(ds), "trl_bin_tokens": sum(len(x) for x in ds["input_ids"]),
                  "trl_bin_loss_tokens": sum(1 for lab in ds["labels"] for x in lab if x != -100),
                  "trl_padding_free": bool(trainer.padding_free)})
    if stats["trl_bin_loss_tokens"] != stats["row_loss_tokens"] or stats["trl_bin_tokens"] != stats["row_tokens"]:
        notes.append(f"TRL's prepared data differs from ours: {stats['trl_bin_tokens']} tokens / "
                     f"{stats['trl_bin_loss_tokens']} loss tokens vs ours {stats['row_tokens']} / {stats['row_loss_tokens']}")
    if stats["trl_bins"] < steps * SFT_BATCH:
        notes.append(f"BFD packed the {stats['examples']} examples into {stats['trl_bins']} bins (< {steps * SFT_BATCH} "
                     "rows of ours): the Trainer starts another epoch to reach max_steps")
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    return summarise("sft-trl", meter, seconds, trainer.state.global_step, None, trainer,
                     {"data": stats, "loss_mask": mode, "notes": notes})


def case_reward_ours(model_dir: Path, data_dir: Path, steps: int, work: Path, share_prompts: bool = False) -> dict:
    """The stage as it ships (`share_prompts` as params/reward.yaml has it, false), or with `share_prompts: true`."""
    from refinery.config import load_params
    from refinery.modeling.loading import load_tokenizer
    from refinery.modeling.methods import apply_method
    from refinery.train.reward_model import (
        BradleyTerryTrainer,
        init_reward_model,
        pair_collator,
        pair_layout,
        pair_rows,
    )
    from refinery.train.trainer import run_trainer

    tok = load_tokenizer(model_dir)
    used, stats = reward_data(tok, data_dir, steps)
    rows = pair_rows(tok, used, RM_MAX_LEN)
    # as the stage ships: params/reward.yaml's padding_free (auto: joined pairs on a CPU, padded on a GPU under sdpa);
    # share_prompts: the kernel that reads a pair's shared prompt (segment_sdpa), the pairs joined
    flat, attn = pair_layout(share_prompts, load_params("reward", str(ROOT / "params")).padding_free, None)
    model = init_reward_model(model_dir, tok.pad_token_id, SEED, attn_implementation=attn)
    model = apply_method(model, lora_params(RM_LORA_DROPOUT), "SEQ_CLS")
    meter = Meter()
    summary, trainer = run_trainer(model, rows, pair_collator(flat, tok.pad_token_id, share_prompts),
                                   our_targs(steps, RM_BATCH, RM_LR),
                                   work / "ckpt", SEED, trainer_cls=metered(BradleyTerryTrainer, meter),
                                   count_tokens="all" if flat else "non_padding", callbacks=[step_clock(meter)],
                                   margin=0.0)
    return summarise("reward-ours-shared" if share_prompts else "reward-ours", meter, summary.seconds, summary.steps,
                     RM_BATCH, trainer, {"data": stats, "summary_tokens_non_padding": summary.tokens,
                                         "padding_free": flat, "attention": attn or "sdpa"})


def case_reward_trl(model_dir: Path, data_dir: Path, steps: int, work: Path) -> dict:
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer

    from refinery.modeling.loading import load_tokenizer
    from refinery.modeling.methods import peft_config
    from refinery.train.reward_model import init_reward_model, pair_rows

    tok = load_tokenizer(model_dir)
    used, stats = reward_data(tok, data_dir, steps)
    ours = pair_rows(tok, used, RM_MAX_LEN)
    # conversational, explicit prompt: TRL renders prompt + chosen / prompt + rejected with the chat template
    rows = [{"prompt": [{"role": "user", "content": r["prompt"]}],
             "chosen": [{"role": "assistant", "content": r["chosen"]}],
             "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in used]
    model = init_reward_model(model_dir, tok.pad_token_id, SEED)
    meter = Meter()
    args = RewardConfig(**training_kwargs(steps, RM_BATCH, RM_LR, work / "ckpt", "non_padding"),
                        max_length=RM_MAX_LEN, center_rewards_coefficient=None, dataset_num_proc=None)
    trainer = metered(RewardTrainer, meter)(model=model, args=args, train_dataset=Dataset.from_list(rows),
                                            processing_class=tok, callbacks=[step_clock(meter)],
                                            peft_config=peft_config(lora_params(RM_LORA_DROPOUT), "SEQ_CLS"))
    assert not trainer.args.gradient_checkpointing and trainer.args.bf16 == (PRECISION == "bf16")
    ds = trainer.train_dataset
    same = len(ds) == len(ours) and all(list(a) == b["chosen"] and list(c) == b["rejected"]
                                        for a, c, b in zip(ds["chosen_ids"], ds["rejected_ids"], ours))
    stats["same_token_ids_as_ours"] = same
    notes = [] if same else ["TRL's tokenized pairs differ from ours (chat rendering or length filter)"]
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    return summarise("reward-trl", meter, seconds, trainer.state.global_step, RM_BATCH, trainer,
                     {"data": stats, "notes": notes})


CASE_FNS = {"sft-ours": case_sft_ours, "sft-trl": case_sft_trl, "reward-ours": case_reward_ours,
            "reward-trl": case_reward_trl,
            "reward-ours-shared": functools.partial(case_reward_ours, share_prompts=True)}


def run_only(args) -> int:
    """Child process: one case, result (or the error) as JSON in --result."""
    global PRECISION
    PRECISION = args.precision
    os.chdir(ROOT)
    for k, v in CHILD_ENV.items():
        os.environ.setdefault(k, v)
    out = Path(args.result)
    try:
        res = CASE_FNS[args.only](Path(args.model_dir), Path(args.data_dir), args.steps, Path(args.work))
        out.write_text(json.dumps(res, indent=2, default=str))
        return 0
    except Exception as exc:  # noqa: BLE001 - recorded for the table; the parent carries on
        traceback.print_exc()
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        out.write_text(json.dumps({"case": args.only, "error": f"{type(exc).__name__}: {first}"[:500]}))
        return 1


# ---------------------------------------------------------------------------------------------------------------
# parent: models, data, subprocesses, tables
# ---------------------------------------------------------------------------------------------------------------
def machine_info() -> dict:
    import peft
    import torch
    import transformers
    import trl

    cpu = "unknown"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return {"cpu": cpu, "cores": os.cpu_count(), "usable_cores": usable, "torch_threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
            "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
            "python": platform.python_version(), "platform": platform.platform(),
            "torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__,
            "peft": peft.__version__, "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def build_tiny(folder: Path) -> Path:
    from refinery.config import BaseModelParams
    from refinery.modeling.base_import import import_base

    model, tok = import_base(BaseModelParams(source="tiny"), seed=0, trust_remote_code=False)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def ensure_data(model_dir: Path, work: Path) -> tuple[Path, str]:
    prepared = ROOT / "data" / "prepared"
    if (prepared / "sft").is_dir() and (prepared / "preferences" / "train.jsonl").is_file():
        return prepared, "data/prepared (the pipeline's prepare stage)"
    from refinery.config import load_params
    from refinery.data.prepare import prepare_all
    from refinery.modeling.loading import load_tokenizer

    out = work / "prepared"
    prepare_all(load_params("prepare"), load_tokenizer(model_dir), 2048, SEED, out)
    return out, "built by the benchmark from params/prepare.yaml (data/prepared did not exist)"


def run_case(case: str, model_dir: Path, data_dir: Path, steps: int, work: Path, verbose: bool) -> dict:
    cdir = work / case
    cdir.mkdir(parents=True, exist_ok=True)
    result, log = cdir / "result.json", cdir / "log.txt"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--only", case, "--model-dir", str(model_dir),
           "--data-dir", str(data_dir), "--steps", str(steps), "--work", str(cdir), "--result", str(result),
           "--precision", PRECISION]
    env = {**os.environ, **CHILD_ENV}
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=None if verbose else fh,
                              stderr=None if verbose else subprocess.STDOUT)
    wall = time.perf_counter() - t0
    res = None
    if result.is_file():
        try:
            res = json.loads(result.read_text())
        except json.JSONDecodeError:
            res = None
    if res is None:
        tail = log.read_text(errors="replace").strip().splitlines()[-1:] if log.is_file() else []
        res = {"case": case, "error": f"subprocess exit code {proc.returncode}: {' '.join(tail)[:400]}"}
    if "error" in res and not verbose and log.is_file():
        res["log_tail"] = log.read_text(errors="replace").strip().splitlines()[-15:]
    res["process_seconds"] = round(wall, 1)
    return res


def pick_median(runs: list[dict]) -> dict:
    """The run with the median train time (the lower median for an even count), with every run's numbers kept."""
    ok = sorted((r for r in runs if "error" not in r), key=lambda r: r["seconds"])
    if not ok:
        return runs[0]
    chosen = dict(ok[(len(ok) - 1) // 2])
    if len(runs) > 1:
        chosen["repeats"] = [{k: r[k] for k in ("seconds", "tokens_per_second", "steady_tokens_per_second",
                                                 "pairs_per_second", "steady_pairs_per_second", "error") if k in r}
                             for r in runs]
        failed = [r["error"] for r in runs if "error" in r]
        if failed:
            chosen.setdefault("notes", []).append(f"{len(failed)} of {len(runs)} runs failed: {failed[0]}")
    return chosen


def ratio(a, b):
    return round(a / b, 3) if a and b else None


def fmt(v, nd=1, unit=""):
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:,.{nd}f}{unit}"
    return f"{v:,}{unit}" if isinstance(v, int) else str(v)


def model_table(entry: dict) -> list[str]:
    gpu = any(r.get("mfu") is not None for r in entry["cases"].values())
    lines = ["| case | steps | seconds | tokens | tokens/s | steady tokens/s | pairs/s | steady pairs/s | peak memory MB "
             "| RSS at train start MB |" + (" MFU |" if gpu else ""),
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if gpu else "")]
    for case in CASES:
        r = entry["cases"].get(case)
        if r is None:
            continue
        if "error" in r:
            lines.append(f"| {case} | failed: {r['error'].replace('|', '/')} | | | | | | | | |")
            continue
        lines.append(f"| {case} | {r['steps']} | {fmt(r['seconds'], 2)} | {fmt(r['tokens'])} | "
                     f"{fmt(r['tokens_per_second'])} | {fmt(r['steady_tokens_per_second'])} | "
                     f"{fmt(r['pairs_per_second'], 2)} | {fmt(r['steady_pairs_per_second'], 2)} | "
                     f"{fmt(r['peak_memory_mb'], 0)} | {fmt(r.get('rss_before_train_mb'), 0)} |"
                     + (f" {100 * r['mfu']:.2f}% |" if gpu and r.get("mfu") is not None else (" – |" if gpu else "")))
    return lines


def ratios(entry: dict) -> dict:
    c = entry["cases"]

    def get(case, key):
        r = c.get(case) or {}
        return None if "error" in r else r.get(key)

    return {"sft_tokens_per_second_ours_over_trl": ratio(get("sft-ours", "tokens_per_second"),
                                                         get("sft-trl", "tokens_per_second")),
            "sft_steady_tokens_per_second_ours_over_trl": ratio(get("sft-ours", "steady_tokens_per_second"),
                                                                get("sft-trl", "steady_tokens_per_second")),
            "reward_pairs_per_second_ours_over_trl": ratio(get("reward-ours", "pairs_per_second"),
                                                           get("reward-trl", "pairs_per_second")),
            "reward_steady_pairs_per_second_ours_over_trl": ratio(get("reward-ours", "steady_pairs_per_second"),
                                                                  get("reward-trl", "steady_pairs_per_second")),
            "reward_shared_pairs_per_second_ours_over_trl": ratio(get("reward-ours-shared", "pairs_per_second"),
                                                                  get("reward-trl", "pairs_per_second")),
            "reward_shared_steady_pairs_per_second_ours_over_trl": ratio(
                get("reward-ours-shared", "steady_pairs_per_second"), get("reward-trl", "steady_pairs_per_second"))}


def ratio_lines(rat: dict) -> list[str]:
    def show(v):
        return f"**{v:.2f}×**" if v is not None else "n/a (a case failed)"

    return [f"- SFT tokens/s, ours / TRL: {show(rat['sft_tokens_per_second_ours_over_trl'])} "
            f"(steady state, steps 2..N: {show(rat['sft_steady_tokens_per_second_ours_over_trl'])})",
            f"- reward pairs/s, ours / TRL: {show(rat['reward_pairs_per_second_ours_over_trl'])} "
            f"(steady state: {show(rat['reward_steady_pairs_per_second_ours_over_trl'])})"] + (
        [f"- reward pairs/s with `share_prompts: true` (opt-in), ours / TRL: "
         f"{show(rat['reward_shared_pairs_per_second_ours_over_trl'])} (steady state: "
         f"{show(rat['reward_shared_steady_pairs_per_second_ours_over_trl'])})"]
        if rat.get("reward_shared_pairs_per_second_ours_over_trl") is not None else [])


def detail_lines(entry: dict) -> list[str]:
    c, out = entry["cases"], []
    so, st = c.get("sft-ours", {}), c.get("sft-trl", {})
    if "data" in so:
        d = so["data"]
        out.append(f"- SFT data: {d['examples']} examples in {d['rows']} packed rows of ≤{SFT_BLOCK} tokens "
                   f"({d['row_tokens']:,} tokens, {d['row_loss_tokens']:,} with loss).")
        if so.get("summary_tokens_all") and so.get("tokens"):
            pad = so["summary_tokens_all"] - so["tokens"]
            out.append(f"- sft-ours also computed {pad:,} padding positions ({100 * pad / so['summary_tokens_all']:.1f}% "
                       "of its batches: a batch's shorter row is padded to the longer one); they are not counted as "
                       "tokens. TRL's padding-free batches have none.")
    if "data" in st:
        d = st["data"]
        out.append(f"- TRL SFT: loss mask via {st.get('loss_mask')}; BFD packed the same examples into "
                   f"{d.get('trl_bins')} bins ({d.get('trl_bin_tokens', 0):,} tokens, {d.get('trl_bin_loss_tokens', 0):,} "
                   f"with loss), padding-free={d.get('trl_padding_free')}.")
    ro, rt = c.get("reward-ours", {}), c.get("reward-trl", {})
    if "data" in ro:
        d = ro["data"]
        out.append(f"- reward data: {d['pairs_used']} pairs (of {d['pairs_available']}; {d['pairs_fitting']} fit in "
                   f"{RM_MAX_LEN} tokens), {d['epochs']} epoch(s); TRL token ids identical to ours: "
                   f"{(rt.get('data') or {}).get('same_token_ids_as_ours', 'n/a')}.")
        if "padding_free" in ro:
            out.append(f"- reward-ours as the stage ships: padding-free pairs {ro['padding_free']} (params/reward.yaml "
                       "`padding_free: auto`: a batch's pairs joined into one row on a CPU, bench/RESULTS-padding-free.md); "
                       "TRL's RewardTrainer pads each batch to its longest sequence.")
    if c.get("reward-ours-shared", {}).get("attention") == "segment_sdpa":
        out.append("- reward-ours-shared: params/reward.yaml `share_prompts: true` (opt-in, off as the stage ships): "
                   "the joined pairs under `segment_sdpa` (reward_model.pair_attention), attention once per sequence, "
                   "each pair's common prefix (its prompt) computed once and the rejected answer attending to it: the "
                   "same loss and gradients (tests/test_reward_padding_free.py), fewer positions computed; tokens "
                   "count both sequences of a pair in full, as on the other sides.")
    for case in CASES:
        r = c.get(case, {})
        for n in r.get("notes", []) or []:
            out.append(f"- {case}: {n}")
        if "error" in r:
            out.append(f"- **{case} failed**: `{r['error']}`")
    losses = ", ".join(f"{k} {c[k]['final_loss']:.4f}" for k in CASES if c.get(k, {}).get("final_loss") is not None)
    if losses:
        out.append(f"- final training loss (sanity, not a quality measure): {losses}.")
    return out


def write_outputs(out: Path, results: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    m = results["machine"]
    lines = ["# Training throughput: llm-refinery vs TRL", "",
             f"Produced by `{results['command']}` on {m['date']}.", "",
             "## Machine", "",
             f"- CPU: {m['cpu']} — {m['cores']} cores ({m['usable_cores']} usable), torch threads {m['torch_threads']}"
             + (f", GPU {m['gpu']}" if m.get("gpu") else ", no GPU") + f", {m['memory_gb']} GB RAM",
             f"- load average at start: {', '.join(map(str, m['load_average_at_start']))} "
             "(other jobs on the machine slow every case; compare the ratios, not the absolute numbers, across runs)",
             f"- Python {m['python']}, torch {m['torch']}, transformers {m['transformers']}, trl {m['trl']}, "
             f"peft {m['peft']}", f"- {m['platform']}"] + ([f"- {results['note']}"] if results.get("note") else []) + ["",
             "## Settings", "",
             f"- {results['steps']} optimizer steps per case, {results.get('precision', 'fp32')}, no gradient checkpointing, "
             "AdamW lr "
             f"{SFT_LR:g}, cosine with {WARMUP_RATIO:.0%} warm-up, one checkpoint saved at the end (inside the timing) on "
             "both sides, each case in a fresh subprocess"
             + (f"; {results['repeat']} interleaved runs per case, the median-time run reported." if results.get("repeat", 1) > 1
                else "; one run per case (use --repeat to take a median)."),
             f"- SFT: LoRA r={LORA_R} alpha={LORA_ALPHA} dropout {SFT_LORA_DROPOUT} on q,k,v,o,gate,up,down; "
             f"rows of ≤{SFT_BLOCK} tokens, batch {SFT_BATCH} rows; loss on the assistant answer only.",
             f"- reward: LoRA r={LORA_R} alpha={LORA_ALPHA} dropout {RM_LORA_DROPOUT} (SEQ_CLS, score head trained); "
             f"batch {RM_BATCH} pairs, max_length {RM_MAX_LEN}; Bradley-Terry loss.",
             "- tokens = non-padding input tokens the trainer trained on; tokens/s and pairs/s divide by the wall "
             "time of `trainer.train()`; *steady* = from the end of step 1 to the end of the last step (no warm-up "
             "step, no checkpoint save). peak memory = the case process's peak RSS (ru_maxrss: model load, data "
             "preparation and training). How each side is counted: bench/README.md."]
    if m.get("gpu"):
        lines += ["- on the GPU, peak memory = `torch.cuda.max_memory_allocated` (GPU memory); MFU = steady tokens/s × "
                  "model FLOPs per token / the GPU's bf16 dense peak (" + ", ".join(
                      f"{k} {v / 1e12:g}" for k, v in PEAK_BF16_FLOPS.items()) + " TFLOP/s); model FLOPs per token "
                  "= k·N + 12·L·d·T with k = 6 for full fine-tuning and 4 for an adapter (frozen weights get no "
                  "weight gradient), N the weights in matrix products, T the mean row length (bench.py "
                  "`flops_per_token`)."]
    lines.append("")
    failed = []
    for name, entry in results["models"].items():
        lines += [f"## Model `{name}` — {entry['model']}", "", f"Data: {entry['data_source']}.", ""]
        if entry.get("error"):
            lines += [f"**Not measured**: {entry['error']}", ""]
            continue
        lines += model_table(entry) + [""] + ratio_lines(entry["ratios"]) + [""] + detail_lines(entry) + [""]
        failed += [f"{name}/{c}" for c, r in entry["cases"].items() if "error" in r]
    if failed:
        lines += ["## Failed cases", "",
                  "These cases raised instead of training; their error text is in the table above and in "
                  f"results.json: {', '.join(failed)}.", ""]
    ov = results.get("overhead")
    if ov:
        lines += ["## Pipeline overhead", ""] + overhead_lines(ov) + [""]
    (out / "RESULTS.md").write_text("\n".join(lines))


# ---------------------------------------------------------------------------------------------------------------
# pipeline overhead (--overhead)
# ---------------------------------------------------------------------------------------------------------------
def _timed(cmd: list[str], timeout: int = 1800) -> tuple[int, float, str, str]:
    """(exit code, wall seconds, stdout, stderr) of a command run from the repository root."""
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        rc, out, err = proc.returncode, proc.stdout, proc.stderr
    except subprocess.TimeoutExpired:
        rc, out, err = 124, "", f"timed out after {timeout}s"
    except FileNotFoundError as exc:
        rc, out, err = 127, "", str(exc)
    return rc, round(time.perf_counter() - t0, 2), out, err


def _tail(out: str, err: str, n: int) -> list[str]:
    return (out + "\n" + err).strip().splitlines()[-n:]


def overhead() -> dict:
    bindir = Path(sys.executable).parent
    dvc = str(bindir / "dvc") if (bindir / "dvc").exists() else "dvc"
    res: dict = {"stages": {}}
    rc, secs, out, err = _timed([dvc, "status", "--json"])
    res["dvc_status"] = {"rc": rc, "seconds": secs}
    try:
        clean = rc == 0 and json.loads(out.strip() or "null") == {}  # `dvc status --json` prints {} when clean
    except json.JSONDecodeError:
        clean = False
    if clean:
        rc, secs, out, err = _timed([dvc, "repro"])
        res["dvc_repro_noop"] = {"rc": rc, "seconds": secs, "tail": _tail(out, err, 3)}
        rc, secs, out, err = _timed([sys.executable, "-m", "flows.pipeline"])
        summary = next((ln for ln in out.splitlines() if ln.startswith("pipeline: ")), "")
        res["pipeline_skipped"] = {"rc": rc, "seconds": secs, "tail": _tail(out, err, 4),
                                   "all_skipped": bool(summary) and " ran" not in summary}
    else:
        res["skipped"] = ("`dvc status` is not clean (or failed), so a no-op `dvc repro` and a fully skipped "
                          "pipeline run cannot be timed without training: " + " ".join((out + " " + err).split())[:300])
    timing = ROOT / "reports" / "pipeline-timing.json"  # written by the last pipeline run that ran stages
    if timing.is_file():
        res["last_pipeline_run"] = json.loads(timing.read_text())
    import yaml

    try:
        stages = list((yaml.safe_load((ROOT / "dvc.yaml").read_text()) or {}).get("stages", {}))
    except (OSError, yaml.YAMLError):
        stages = []
    for stage in stages:
        path = ROOT / "metrics" / f"{stage}.json"
        if not path.is_file():
            continue
        try:
            train = json.loads(path.read_text()).get("train") or {}
        except (json.JSONDecodeError, AttributeError):
            continue
        if isinstance(train, dict) and "seconds" in train:
            res["stages"][stage] = {k: train.get(k) for k in ("seconds", "steps", "tokens_per_second",
                                                               "pairs_per_second", "peak_memory_mb")}
    return res


def overhead_lines(ov: dict) -> list[str]:
    out = [f"- `dvc status`: {ov['dvc_status']['seconds']} s (exit {ov['dvc_status']['rc']})"]
    if "skipped" in ov:
        out.append(f"- no-op timings skipped: {ov['skipped']}")
    else:
        for key, label in (("dvc_repro_noop", "no-op `dvc repro`"),
                           ("pipeline_skipped", "fully skipped `python -m flows.pipeline`")):
            r = ov[key]
            warn = " — **a stage ran**, so this is not an orchestration-only time" if r.get("all_skipped") is False else ""
            out.append(f"- {label}: {r['seconds']} s (exit {r['rc']}){warn}")
    if (run := ov.get("last_pipeline_run")) and run.get("stages"):
        share = run.get("overhead_share")
        out += ["", f"Last pipeline run that ran stages (reports/pipeline-timing.json): {run['total_seconds']:.0f} s, "
                f"of which stage compute (training, evaluation, saving) {run['compute_seconds']:.0f} s; orchestration,"
                f" tracking and I/O **{100 * share:.1f}%** of the run:", "",
                f"- stage processes outside their bodies (process start, imports, loading inputs, Prefect flow "
                f"engine, DVC's hashing and lock): {run['stage_process_outside_body_seconds']:.1f} s",
                f"- MLflow calls inside the stages: {run['mlflow_seconds']:.1f} s",
                f"- DVC status checks: {run['dvc_status_seconds']:.1f} s; the pipeline flow itself (Prefect tasks, "
                f"lineage tags): {run['pipeline_flow_seconds']:.1f} s", "",
                "| stage | wall s | body s | MLflow s |", "|---|---:|---:|---:|"]
        out += [f"| {k} | {v['wall_seconds']:.1f} | {v['body_seconds']:.1f} | {v['mlflow_seconds']:.1f} |"
                for k, v in run["stages"].items()]
    if ov["stages"]:
        out += ["", "Training seconds recorded by the last pipeline run (metrics/<stage>.json `train`); the stage's "
                "whole wall time is not recorded there, so the orchestration/IO share cannot be derived from "
                "metrics alone:", "", "| stage | train seconds | steps | tokens/s | pairs/s | peak memory MB |",
                "|---|---:|---:|---:|---:|---:|"]
        for stage, t in ov["stages"].items():
            out.append(f"| {stage} | {fmt(t['seconds'], 2)} | {fmt(t['steps'])} | {fmt(t['tokens_per_second'])} | "
                       f"{fmt(t['pairs_per_second'], 2)} | {fmt(t['peak_memory_mb'], 0)} |")
    else:
        out.append("- no metrics/<stage>.json with `train.seconds` found.")
    return out


# ---------------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=("tiny", "default", "both"), default="both")
    ap.add_argument("--steps", type=int, default=10, help="optimizer steps per case (default 10)")
    ap.add_argument("--out", default=str(ROOT / "bench"), help="folder for RESULTS.md and results.json")
    ap.add_argument("--cases", default=",".join(CASES), help=f"comma-separated subset of {','.join(CASES)}")
    ap.add_argument("--repeat", type=int, default=1,
                    help="runs per case, interleaved; the median-time run is reported (default 1)")
    ap.add_argument("--overhead", action="store_true", help="also time a no-op dvc repro and a skipped pipeline")
    ap.add_argument("--verbose", action="store_true", help="show the case subprocesses' output")
    ap.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                    help="training precision of both sides (bf16: the Trainer's autocast, for a GPU)")
    ap.add_argument("--note", default="", help="a line printed under the machine in RESULTS.md")
    ap.add_argument("--keep-work", action="store_true", help="keep the temp folder (models, data, logs)")
    # internal: one case in this process
    ap.add_argument("--only", choices=CASES, help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    ap.add_argument("--data-dir", help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.steps < 1 or args.repeat < 1:
        ap.error("--steps and --repeat must be at least 1")
    if args.only:
        return run_only(args)
    global PRECISION
    PRECISION = args.precision

    out = Path(args.out).resolve()
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    bad = [c for c in cases if c not in CASES]
    if bad:
        ap.error(f"unknown case(s) {bad}; known: {', '.join(CASES)}")
    models = ["tiny", "default"] if args.model == "both" else [args.model]
    base = ROOT / "models" / "base"
    if "default" in models and not ((base / "config.json").is_file() and any(base.glob("*.safetensors"))):
        print(f"bench: {base} is missing (or holds no safetensors model): the default model is the pipeline's "
              "SmolLM2-135M import; make it first with `dvc repro base_model` (or `python -m flows.base_model`), "
              "or run `--model tiny`.", file=sys.stderr)
        return 2
    os.chdir(ROOT)  # params/ and data/demo/ paths are relative to the repository root
    for k, v in CHILD_ENV.items():
        os.environ.setdefault(k, v)

    machine = machine_info()
    results = {"command": "python bench/bench.py " + " ".join(sys.argv[1:] if argv is None else argv),
               "note": args.note, "precision": PRECISION, "steps": args.steps, "repeat": args.repeat, "machine": machine,
               "models": {}}
    print(f"bench: {machine['cpu']}, {machine['cores']} cores, torch {machine['torch']}, transformers "
          f"{machine['transformers']}, trl {machine['trl']}; {args.steps} steps per case")
    work = Path(tempfile.mkdtemp(prefix="refinery-bench-"))
    try:
        for name in models:
            mdir = work / name / "model"
            if name == "tiny":
                build_tiny(mdir)
                label = "random tiny Llama (2 layers, hidden 64) with the SmolLM2 tokenizer"
            else:
                mdir, label = base, "models/base (SmolLM2-135M-Instruct, fp32)"
            data_dir, source = ensure_data(mdir, work / name)
            entry = {"model": label, "data_source": source, "cases": {}}
            runs: dict[str, list[dict]] = {c: [] for c in cases}
            for rep in range(args.repeat):  # interleaved (ours, TRL, ours, TRL, ...): drifting load hits both
                for case in cases:
                    tag = f" (run {rep + 1}/{args.repeat})" if args.repeat > 1 else ""
                    print(f"bench: {name:<7} {case:<12}{tag} ...", end="", flush=True)
                    r = run_case(case, mdir, data_dir, args.steps, work / name / f"run{rep}", args.verbose)
                    runs[case].append(r)
                    print(f" failed: {r['error']}" if "error" in r else
                          f" {r['seconds']:.1f} s train, {r['tokens_per_second']:,.0f} tokens/s"
                          + (f", {r['pairs_per_second']:.2f} pairs/s" if r.get("pairs_per_second") else "")
                          + f", peak {r['peak_memory_mb']:,.0f} MB ({r['process_seconds']:.0f} s process)")
            entry["cases"] = {case: pick_median(rs) for case, rs in runs.items()}
            entry["ratios"] = ratios(entry)
            results["models"][name] = entry
            print()
            print(f"## {name}: {label}")
            print("\n".join(model_table(entry)))
            print("\n".join(ratio_lines(entry["ratios"])))
            print("\n".join(detail_lines(entry)))
            print()
        if args.overhead:
            print("bench: pipeline overhead ...", flush=True)
            results["overhead"] = overhead()
            print("\n".join(overhead_lines(results["overhead"])))
    finally:
        if args.keep_work:
            print(f"bench: work folder kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    write_outputs(out, results)
    print(f"bench: wrote {out / 'RESULTS.md'} and {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

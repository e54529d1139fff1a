#!/usr/bin/env python
"""GPU benchmark at the sizes people train at on a GPU. This is a script, not a test, and every model has RANDOM weights.

    python bench/gpu_bench.py --make-snapshot .gpusnap               # here: the committed refinery/, params/, data/demo,
                                                                     # the SmolLM2 tokenizer and the prepared data
    PYTHONPATH=.gpusnap python bench/gpu_bench.py --src .gpusnap --out DIR   # on the GPU: measure, write DIR/results-gpu.json
    python bench/gpu_bench.py --report DIR/results-gpu.json          # write bench/RESULTS-gpu.md + bench/results-gpu.json
    python bench/gpu_bench.py --tiny --repeats 1 --out /tmp/gb       # smoke test of every case (CPU is fine)

Cases (bench/README.md, section "GPU benchmark", has the details):
  sft-ours / sft-trl        full fine-tuning of a ~1.07B Llama (Llama-3.2-1B shape, SmolLM2 vocabulary) in bf16 autocast,
                            with packed rows of 2048 tokens, 4 rows per step. Ours is render_example -> build_train_rows ->
                            batch_collator (PadCollator + LabelledLogitsOnly, as sft) -> run_trainer. TRL is
                            SFTTrainer on the same examples (BFD packing, padding-free).
  reward-ours / reward-trl  the same model with a scalar head, Bradley-Terry on pairs of up to 2048 tokens, 4 pairs per
                            step. Ours is pair_rows -> PairCollator -> BradleyTerryTrainer. TRL is RewardTrainer.
  qlora-7b                  LLaMA-2-7B shape, random bf16 weights saved to local disk and loaded in 4-bit NF4 through our
                            load_causal_lm. Then LoRA r=16 on every linear projection, gradient checkpointing, batch 1 x
                            1024 tokens. It reports the peak GPU memory.
  ppo                       our PPOTrainer at the 1B size with LoRA policy and value model (only if time is left).
  profile                   a torch.profiler trace of 2 sft-ours steps: GPU busy time by kernel family (only if time is left).

Both sides of a comparison get the same random weights (same seed, built on the device), the same token ids, the same
batch, and the same optimiser (the Trainer's default AdamW), LR and schedule. Runs are interleaved (ours, TRL, ours,
TRL, ...). Each run excludes its warm-up steps from the timing.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import functools
import gc
import importlib.metadata
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("bench_cpu", HERE / "bench.py")
B = importlib.util.module_from_spec(_spec)  # bench.py: Meter, metered, step_clock, sft_data, flops_per_token, mfu, ...
_spec.loader.exec_module(B)
# bench.py puts the repository root first on sys.path. An explicit PYTHONPATH (the committed snapshot on the device)
# must win over the live working tree, so those entries move back in front.
for _p in reversed([p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]):
    _p = str(Path(_p).resolve())
    if _p in sys.path:
        sys.path.remove(_p)
    sys.path.insert(0, _p)

SEED = 42
SEQ = 2048            # SFT row length / longest reward sequence (tokens)
SFT_ROWS = 4          # packed rows per optimizer step
RM_PAIRS = 4          # preference pairs per optimizer step (8 sequences)
LR = 2e-5             # full fine-tuning learning rate (both sides), cosine with 10% warm-up as bench.py
WARMUP = 3            # steps excluded from the timing
TIMED = 15            # timed steps per run
QLORA_SEQ, QLORA_WARMUP, QLORA_TIMED = 1024, 2, 3
# Llama-3.2-1B's shape; the vocabulary is the SmolLM2 tokenizer's (49,152) so that our chat rendering runs unchanged
MODEL_1B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                num_key_value_heads=8, max_position_embeddings=4096, rope_theta=500000.0, rms_norm_eps=1e-5,
                tie_word_embeddings=True)
MODEL_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096, rope_theta=10000.0,
                rms_norm_eps=1e-5, tie_word_embeddings=False)  # LLaMA-2-7B
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=2048, rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=True)
BASE_CASES = ("sft-ours", "sft-trl", "reward-ours", "reward-trl")
# Liger's Triton kernels (fused RMSNorm, RoPE, SwiGLU; for SFT also the fused linear cross-entropy), switched on the
# way each side's users do: our `training.use_liger_kernel: true`, TRL's `use_liger_kernel=True` (CUDA only)
LIGER_CASES = ("sft-ours-liger", "sft-trl-liger", "reward-ours-liger", "reward-trl-liger")
CASES = BASE_CASES + LIGER_CASES
# first guesses of each task's seconds on an H100/H200; replaced by measured times as the run goes on
EST = {**{c: 30 for c in CASES}, "qlora-7b": 150, "ppo": 60, "profile": 25}


class Ctx:
    """What every case needs: the device, sizes, tokenizer folder, data, scratch folder."""

    def __init__(self, args):
        import torch

        self.tiny = args.tiny
        self.cuda = torch.cuda.is_available()
        self.device = "cuda" if self.cuda else "cpu"
        self.seq = 128 if args.tiny else SEQ
        self.qlora_seq = 128 if args.tiny else QLORA_SEQ
        self.warmup, self.timed = (1, 2) if args.tiny else (WARMUP, args.timed)
        # Liger's kernels are Triton kernels for CUDA: their cases run where both are there
        self.liger = self.cuda and importlib.util.find_spec("liger_kernel") is not None and not args.no_liger
        self.cases = BASE_CASES + (LIGER_CASES if self.liger else ())
        self.qwarm, self.qtimed = (1, 2) if args.tiny else (QLORA_WARMUP, QLORA_TIMED)
        self.steps = self.warmup + self.timed
        self.model_cfg = dict(TINY if args.tiny else MODEL_1B)
        self.model_7b = dict(TINY, vocab_size=32000, tie_word_embeddings=False) if args.tiny else dict(MODEL_7B)
        self.precision = "bf16" if self.cuda else "fp32"
        self.src = Path(args.src).resolve()
        self.work = Path(tempfile.mkdtemp(prefix="gpu-bench-"))
        self.tok_dir = self.src / "tok"
        self.data_dir = self.src / "data" / "prepared"
        self._sft = self._pairs = None

    def tokenizer(self):
        from refinery.modeling.loading import load_tokenizer

        return load_tokenizer(self.tok_dir)

    def llama_config(self, kind: str, spec: dict | None = None):
        from transformers import LlamaConfig

        tok = self.tokenizer()
        spec = dict(spec or self.model_cfg)
        spec.setdefault("vocab_size", len(tok))
        cfg = LlamaConfig(**spec, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                          pad_token_id=tok.pad_token_id)
        if kind == "seqcls":
            cfg.num_labels = 1
        return cfg

    @property
    def sft(self):
        """Our packed rows (steps x SFT_ROWS rows of <= SEQ tokens), the records they hold, and statistics
        (bench.sft_data, with the GPU block size and batch)."""
        if self._sft is None:
            B.SFT_BLOCK, B.SFT_BATCH = self.seq, SFT_ROWS
            self._sft = B.sft_data(self.tokenizer(), self.data_dir, self.steps)
        return self._sft

    @property
    def pairs(self):
        """Preference pairs of up to SEQ tokens per side (bench.reward_data over joined demo pairs)."""
        if self._pairs is None:
            from refinery.data.records import read_jsonl

            tok = self.tokenizer()
            recs = [r for _, r in read_jsonl(self.data_dir / "preferences" / "train.jsonl")]
            folder = self.work / "long-pairs"
            (folder / "preferences").mkdir(parents=True, exist_ok=True)
            cached = self.src / "data" / f"long-pairs-{self.seq}.jsonl"  # made by --make-snapshot (same function)
            joined = [r for _, r in read_jsonl(cached)] if cached.is_file() else []
            if len(joined) < self.steps * RM_PAIRS:
                joined = long_pairs(tok, recs, self.seq, self.steps * RM_PAIRS)
            with open(folder / "preferences" / "train.jsonl", "w") as fh:
                for r in joined[:self.steps * RM_PAIRS]:
                    fh.write(json.dumps(r) + "\n")
            B.RM_MAX_LEN, B.RM_BATCH = self.seq, RM_PAIRS
            used, stats = B.reward_data(tok, folder, self.steps)
            from refinery.train.reward_model import pair_rows

            rows = pair_rows(tok, used, self.seq)
            lens = [len(r[k]) for r in rows for k in ("chosen", "rejected")]
            stats.update({"demo_pairs": len(recs), "sequences": len(lens), "tokens": sum(lens),
                          "mean_tokens_per_sequence": round(sum(lens) / max(len(lens), 1), 1),
                          "min_tokens": min(lens, default=0), "max_tokens": max(lens, default=0)})
            self._pairs = (used, rows, stats)
        return self._pairs


def long_pairs(tok, recs: list[dict], max_len: int, n: int) -> list[dict]:
    """Pairs as long as a GPU run trains on: consecutive demo pairs joined (prompts, chosen answers and rejected
    answers each joined by a blank line) for as long as both rendered sides fit in `max_len` tokens. Greedy on an
    estimate from the single pairs' lengths, then checked on the real rendering (and shortened if over)."""
    from refinery.train.reward_model import render

    def join(group, key):
        return "\n\n".join(r[key] for r in group)

    def length(group):
        p = join(group, "prompt")
        return max(len(render(tok, p, join(group, k), 10**9)) for k in ("chosen", "rejected"))

    single = [length([r]) for r in recs]
    frame = length([{"prompt": "", "chosen": "", "rejected": ""}])  # the template's own tokens, paid once per pair
    out, i = [], 0
    while len(out) < n and recs:
        group, est = [], frame
        while not group or est + single[i % len(recs)] - frame + 4 <= max_len:
            est += single[i % len(recs)] - frame + (4 if group else 0)
            group.append(recs[i % len(recs)])
            i += 1
        while len(group) > 1 and length(group) > max_len:  # the estimate was short: give back the last pair
            group.pop()
            i -= 1
        out.append({"id": f"joined-{len(out)}", "prompt": join(group, "prompt"), "chosen": join(group, "chosen"),
                    "rejected": join(group, "rejected"), "task": "joined", "joined_pairs": len(group)})
    return out


# ---------------------------------------------------------------------------------------------------------------
# measurement plumbing
# ---------------------------------------------------------------------------------------------------------------
def callbacks(meter) -> list:
    """[synchronize the GPU at the end of a step, bench.step_clock (time + tokens), no checkpoint saves]. Order
    matters: the clock must read the time after the synchronisation."""
    import torch
    from transformers import TrainerCallback

    class Sync(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if torch.cuda.is_available():
                torch.cuda.synchronize()

    class NoSave(TrainerCallback):
        """A 1B full fine-tune checkpoint (weights + AdamW states) is ~13 GB: no case saves one."""

        def on_step_end(self, args, state, control, **kw):
            control.should_save = False

    return [Sync(), B.step_clock(meter), NoSave()]


def gpu_reset() -> float:
    """Free what the last case left, reset the peak counter; memory still allocated (MiB, a leak would show here)."""
    import torch

    gc.collect()
    if not torch.cuda.is_available():
        return 0.0
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return torch.cuda.memory_allocated() / 2**20


def gpu_mb(kind: str = "allocated") -> float | None:
    import torch

    if not torch.cuda.is_available():
        return None
    fn = {"allocated": torch.cuda.memory_allocated, "peak": torch.cuda.max_memory_allocated,
          "peak_reserved": torch.cuda.max_memory_reserved}[kind]
    return round(fn() / 2**20, 1)


@contextlib.contextmanager
def default_dtype(dtype):
    import torch

    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def build_model(ctx: Ctx, kind: str):
    """The random-weight model, built directly on the device in fp32 (as our stages train: fp32 weights, bf16 only
    through the Trainer's autocast). Same seed -> same weights for ours and TRL."""
    import torch
    from transformers import LlamaForCausalLM, LlamaForSequenceClassification

    cfg = ctx.llama_config(kind)
    torch.manual_seed(SEED)
    with torch.device(ctx.device):
        model = (LlamaForCausalLM if kind == "causal" else LlamaForSequenceClassification)(cfg)
    model.config.use_cache = False
    return model


def model_size(ctx: Ctx) -> tuple[int, int]:
    """(vocabulary, parameters) of the 1B causal model, counted on the meta device (tied weights once)."""
    import torch
    from transformers import LlamaForCausalLM

    cfg = ctx.llama_config("causal")
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    return cfg.vocab_size, sum(p.numel() for p in model.parameters())


def timed_window(meter, warm: int) -> dict:
    """Steps warm+1..N of the run, from bench.step_clock's marks (taken after a GPU synchronisation)."""
    marks = meter.steps
    out = {"steps_run": len(marks)}
    if meter.t_begin is not None:
        ts = [meter.t_begin] + [t for _, t, _, _ in marks]
        out["step_seconds"] = [round(b - a, 4) for a, b in zip(ts, ts[1:])]
    warm = min(warm, max(len(marks) - 1, 0))
    if len(marks) < 2 or warm < 1:
        return out
    (_, t0, k0, r0), (_, tn, kn, rn) = marks[warm - 1], marks[-1]
    secs = max(tn - t0, 1e-9)
    out.update({"warmup_steps": warm, "timed_steps": len(marks) - warm, "timed_seconds": round(secs, 4),
                "timed_tokens": kn - k0, "timed_rows": rn - r0, "tokens_per_second": round((kn - k0) / secs, 1),
                "step_seconds_timed_median": round(statistics.median(out["step_seconds"][warm:]), 4)})
    return out


def finish(case: str, ctx: Ctx, meter, trainer, fpt_tokens_per_row: float, pairs: bool, extra: dict) -> dict:
    res = {"case": case, **timed_window(meter, ctx.warmup), "tokens_total": meter.tokens,
           "loss_tokens_total": meter.loss_tokens, "peak_gpu_mb": gpu_mb("peak"),
           "peak_gpu_reserved_mb": gpu_mb("peak_reserved"),
           "final_loss": next((h["loss"] for h in reversed(trainer.state.log_history) if "loss" in h), None),
           "optimizer": str(getattr(trainer.args.optim, "value", trainer.args.optim)), "bf16_autocast": bool(trainer.args.bf16),
           "gradient_checkpointing": bool(trainer.args.gradient_checkpointing),
           "attn_implementation": getattr(trainer.model.config, "_attn_implementation", None),
           "trainable_params": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
           "liger": bool(getattr(trainer.args, "use_liger_kernel", False))}
    if pairs and res.get("timed_rows") is not None:
        res["pairs_per_second"] = round(res["timed_rows"] / 2 / res["timed_seconds"], 3)
    # the same model FLOPs per token for both sides of a comparison: T = the mean sequence length of *our* layout
    fpt, formula = B.flops_per_token(trainer.model, fpt_tokens_per_row)
    res["flops_per_token"], res["flops_formula"] = round(fpt), formula
    res["mfu"] = B.mfu(res.get("tokens_per_second"), fpt)
    res.update(extra)
    return res


# ---------------------------------------------------------------------------------------------------------------
# the four 1B cases
# ---------------------------------------------------------------------------------------------------------------
def case_sft_ours(ctx: Ctx, profile_steps: tuple[int, int] | None = None, steps: int | None = None,
                  liger: bool = False) -> dict:
    from transformers import Trainer

    from refinery.config import MethodParams
    from refinery.data.packing import batch_collator
    from refinery.modeling.methods import apply_method
    from refinery.train.trainer import run_trainer

    rows, _, stats = ctx.sft
    tok = ctx.tokenizer()
    start = gpu_reset()
    model = apply_method(build_model(ctx, "causal"), MethodParams(method="full"), "CAUSAL_LM", seed=SEED)
    model_mb = gpu_mb()
    meter = B.Meter()
    cbs = callbacks(meter)
    prof = Profiler(*profile_steps) if profile_steps else None
    if prof:
        cbs.insert(0, prof.cb)
    # as flows/sft.py builds it: padded rows, the LM head on answer positions only (not with Liger, whose fused
    # loss never builds the logits)
    collate = batch_collator(False, tok.pad_token_id, labelled_logits_only=not liger)
    summary, trainer = run_trainer(model, rows, B.CountingCollator(collate),
                                   our_targs(steps or ctx.steps, SFT_ROWS, liger), ctx.work / "ckpt-sft-ours", SEED,
                                   trainer_cls=B.metered(Trainer, meter), count_tokens="all", callbacks=cbs)
    res = finish("sft-ours" + "-liger" * liger, ctx, meter, trainer, stats["row_tokens"] / stats["rows"], False,
                 {"allocated_at_start_mb": round(start, 1), "model_mb": model_mb,
                  "batch_shape_tokens_incl_padding": summary.tokens, "data": stats})
    if prof:
        res["profile"] = prof.result()
    return res


def case_sft_trl(ctx: Ctx, profile_steps: tuple[int, int] | None = None, steps: int | None = None,
                 liger: bool = False) -> dict:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    rows, used, stats = ctx.sft
    stats = dict(stats)
    tok = ctx.tokenizer()
    # conversational prompt/completion + completion_only_loss masks exactly what render_example masks (SmolLM2's
    # template has no {% generation %} markers, so assistant_only_loss is refused: bench/README.md, caveat 3)
    data = [{"prompt": [{"role": "user", "content": r["prompt"]}],
             "completion": [{"role": "assistant", "content": r["response"]}]} for r in used]
    start = gpu_reset()
    model = build_model(ctx, "causal")
    model_mb = gpu_mb()
    meter = B.Meter()
    args = SFTConfig(**B.training_kwargs(steps or ctx.steps, SFT_ROWS, LR, ctx.work / "ckpt-sft-trl", "all"),
                     max_length=ctx.seq, packing=True, packing_strategy="bfd", padding_free=True,
                     completion_only_loss=True, dataset_num_proc=None, use_liger_kernel=liger)
    cbs = callbacks(meter)
    prof = Profiler(*profile_steps) if profile_steps else None
    if prof:
        cbs.insert(0, prof.cb)
    trainer = B.metered(SFTTrainer, meter)(model=model, args=args, train_dataset=Dataset.from_list(data),
                                           processing_class=tok, callbacks=cbs)
    assert not trainer.args.gradient_checkpointing and trainer.args.bf16 == (ctx.precision == "bf16")
    ds = trainer.train_dataset
    stats.update({"trl_bins": len(ds), "trl_bin_tokens": sum(len(x) for x in ds["input_ids"]),
                  "trl_bin_loss_tokens": sum(1 for lab in ds["labels"] for x in lab if x != -100) if "labels" in
                  ds.column_names else None, "trl_padding_free": bool(trainer.padding_free),
                  "trl_loss_type": str(getattr(trainer.args, "loss_type", None))})
    if "labels" not in ds.column_names and "completion_mask" in ds.column_names:
        stats["trl_bin_loss_tokens"] = sum(sum(m) for m in ds["completion_mask"])
    notes = []
    if stats["trl_bin_tokens"] != stats["row_tokens"] or stats["trl_bin_loss_tokens"] != stats["row_loss_tokens"]:
        notes.append(f"TRL's prepared data differs from ours: {stats['trl_bin_tokens']} tokens / "
                     f"{stats['trl_bin_loss_tokens']} loss tokens vs ours {stats['row_tokens']} / "
                     f"{stats['row_loss_tokens']}")
    trainer.train()
    res = finish("sft-trl" + "-liger" * liger, ctx, meter, trainer, stats["row_tokens"] / stats["rows"], False,
                 {"allocated_at_start_mb": round(start, 1), "model_mb": model_mb, "data": stats, "notes": notes,
                  "flattened_row_tokens_median": statistics.median(meter.row_lengths) if meter.row_lengths else None})
    if prof:
        res["profile"] = prof.result()
    return res


def case_reward_ours(ctx: Ctx, liger: bool = False) -> dict:
    from refinery.config import MethodParams
    from refinery.modeling.methods import apply_method
    from refinery.train.reward_model import BradleyTerryTrainer, PairCollator
    from refinery.train.trainer import run_trainer

    _, rows, stats = ctx.pairs
    tok = ctx.tokenizer()
    start = gpu_reset()
    model = apply_method(build_model(ctx, "seqcls"), MethodParams(method="full"), "SEQ_CLS", seed=SEED)
    model_mb = gpu_mb()
    meter = B.Meter()
    summary, trainer = run_trainer(model, rows, PairCollator(tok.pad_token_id), our_targs(ctx.steps, RM_PAIRS, liger),
                                   ctx.work / "ckpt-reward-ours", SEED, trainer_cls=B.metered(BradleyTerryTrainer, meter),
                                   count_tokens="non_padding", callbacks=callbacks(meter), margin=0.0)
    return finish("reward-ours" + "-liger" * liger, ctx, meter, trainer, stats["mean_tokens_per_sequence"], True,
                  {"allocated_at_start_mb": round(start, 1), "model_mb": model_mb, "data": stats})


def case_reward_trl(ctx: Ctx, liger: bool = False) -> dict:
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer

    used, ours, stats = ctx.pairs
    stats = dict(stats)
    tok = ctx.tokenizer()
    data = [{"prompt": [{"role": "user", "content": r["prompt"]}],
             "chosen": [{"role": "assistant", "content": r["chosen"]}],
             "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in used]
    start = gpu_reset()
    model = build_model(ctx, "seqcls")
    model_mb = gpu_mb()
    meter = B.Meter()
    args = RewardConfig(**B.training_kwargs(ctx.steps, RM_PAIRS, LR, ctx.work / "ckpt-reward-trl", "non_padding"),
                        max_length=ctx.seq, center_rewards_coefficient=None, dataset_num_proc=None,
                        use_liger_kernel=liger)
    trainer = B.metered(RewardTrainer, meter)(model=model, args=args, train_dataset=Dataset.from_list(data),
                                              processing_class=tok, callbacks=callbacks(meter))
    assert not trainer.args.gradient_checkpointing and trainer.args.bf16 == (ctx.precision == "bf16")
    ds = trainer.train_dataset
    stats["same_token_ids_as_ours"] = len(ds) == len(ours) and all(
        list(a) == b["chosen"] and list(c) == b["rejected"] for a, c, b in zip(ds["chosen_ids"], ds["rejected_ids"], ours))
    notes = [] if stats["same_token_ids_as_ours"] else ["TRL's tokenized pairs differ from ours"]
    trainer.train()
    return finish("reward-trl" + "-liger" * liger, ctx, meter, trainer, stats["mean_tokens_per_sequence"], True,
                  {"allocated_at_start_mb": round(start, 1), "model_mb": model_mb, "data": stats, "notes": notes})


CASE_FNS = {"sft-ours": case_sft_ours, "sft-trl": case_sft_trl, "reward-ours": case_reward_ours,
            "reward-trl": case_reward_trl}
CASE_FNS.update({f"{c}-liger": functools.partial(CASE_FNS[c], liger=True) for c in BASE_CASES})


def our_targs(steps: int, batch: int, liger: bool):
    """bench.our_targs (the TrainingArgs both sides share) with our `training.use_liger_kernel`."""
    return B.our_targs(steps, batch, LR).model_copy(update={"use_liger_kernel": liger})


class RowMeter(B.Meter):
    """bench.Meter plus the length of every batch row (TRL's padding-free batch is one flattened row)."""

    def __init__(self):
        super().__init__()
        self.row_lengths: list[int] = []


def _patch_meter():
    """bench.metered counts rows; also keep each batch's row length (cheap: a shape)."""
    orig = B.metered

    def metered(trainer_cls, meter):
        cls = orig(trainer_cls, meter)

        class WithRows(cls):
            def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
                if model.training and hasattr(meter, "row_lengths"):
                    meter.row_lengths.append(int(inputs["input_ids"].shape[-1]))
                return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                            num_items_in_batch=num_items_in_batch)

        WithRows.__name__ = WithRows.__qualname__ = cls.__name__
        return cls if not hasattr(meter, "row_lengths") else WithRows

    B.Meter = RowMeter
    B.metered = metered


# ---------------------------------------------------------------------------------------------------------------
# QLoRA 7B, PPO, profile
# ---------------------------------------------------------------------------------------------------------------
def linear_params(cfg) -> int:
    """Weights in matrix products per the config (for MFU of a 4-bit model, whose packed weights have half the numel)."""
    h, i, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    kv = cfg.num_key_value_heads * (h // cfg.num_attention_heads)
    return L * (2 * h * h + 2 * h * kv + 3 * h * i) + cfg.vocab_size * h


def case_qlora_7b(ctx: Ctx) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer

    from refinery.config import LoraArgs, MethodParams, QLoraArgs, TrainingArgs
    from refinery.data.packing import PadCollator
    from refinery.modeling.loading import load_causal_lm
    from refinery.modeling.methods import apply_method
    from refinery.train.trainer import run_trainer

    res: dict = {"case": "qlora-7b"}
    cfg = LlamaConfig(**ctx.model_7b, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    res["config"] = {k: v for k, v in ctx.model_7b.items()}
    res["linear_params"] = linear_params(cfg)
    res["seq"] = ctx.qlora_seq
    shm = Path("/dev/shm")
    need = 2 * linear_params(cfg) * 1.1 + 2 * cfg.vocab_size * cfg.hidden_size
    base = shm if shm.is_dir() and shutil.disk_usage(shm).free > need else ctx.work
    folder = Path(tempfile.mkdtemp(prefix="rand7b-", dir=base))
    res["checkpoint_dir"] = str(base)
    try:
        t0 = time.perf_counter()
        gpu_reset()
        torch.manual_seed(SEED)
        with default_dtype(torch.bfloat16), torch.device(ctx.device):
            model = LlamaForCausalLM(cfg)
        res["params"] = sum(p.numel() for p in model.parameters())
        model.save_pretrained(folder)
        del model
        res["random_checkpoint_seconds"] = round(time.perf_counter() - t0, 1)
        res["random_checkpoint_gb"] = round(sum(f.stat().st_size for f in folder.glob("*.safetensors")) / 1e9, 2)
        qlora = ctx.cuda and importlib.util.find_spec("bitsandbytes") is not None
        lora = dict(r=16, alpha=32, dropout=0.05)
        method = (MethodParams(method="qlora", qlora=QLoraArgs(**lora)) if qlora
                  else MethodParams(method="lora", lora=LoraArgs(**lora)))
        res["method"] = method.method
        t0 = time.perf_counter()
        gpu_reset()
        model = load_causal_lm(folder, method=method)  # our loader: 4-bit NF4, double quant, bf16 compute
        if not qlora:
            model = model.to(ctx.device)
        res["load_seconds"] = round(time.perf_counter() - t0, 1)
        res["linear4bit_modules"] = sum(1 for m in model.modules() if type(m).__name__ == "Linear4bit")
        res["after_load_gpu_mb"] = gpu_mb()
        model = apply_method(model, method, "CAUSAL_LM", seed=SEED)
        res["after_lora_gpu_mb"] = gpu_mb()
        res["trainable_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    g = torch.Generator().manual_seed(SEED)
    steps = ctx.qwarm + ctx.qtimed
    ids = torch.randint(3, cfg.vocab_size, (steps, ctx.qlora_seq), generator=g).tolist()
    rows = [{"input_ids": x, "labels": x} for x in ids]  # random ids: memory and time do not depend on the values
    res["runs"] = {}
    for precision in (("fp32", "bf16") if ctx.cuda else ("fp32",)):
        gpu_reset()
        meter = B.Meter()
        targs = TrainingArgs(max_steps=steps, batch_size=1, grad_accum=1, lr=2e-4, warmup_ratio=0.1, scheduler="cosine",
                             save_steps=steps, keep_checkpoints=1, precision=precision, gradient_checkpointing=True)
        t0 = time.perf_counter()
        summary, trainer = run_trainer(model, rows, PadCollator(0), targs, ctx.work / f"ckpt-qlora-{precision}", SEED,
                                       trainer_cls=B.metered(Trainer, meter), count_tokens="non_padding",
                                       callbacks=callbacks(meter))
        w = timed_window(meter, ctx.qwarm)
        fpt = 4 * linear_params(cfg) + 12 * cfg.num_hidden_layers * cfg.hidden_size * ctx.qlora_seq
        res["runs"][precision] = {
            **w, "peak_gpu_mb": gpu_mb("peak"), "peak_gpu_reserved_mb": gpu_mb("peak_reserved"),
            "seconds": round(time.perf_counter() - t0, 1),
            "gradient_checkpointing": bool(trainer.args.gradient_checkpointing), "bf16_autocast": bool(trainer.args.bf16),
            "losses": [round(h["loss"], 4) for h in summary.history],
            "flops_per_token": fpt, "mfu": B.mfu(w.get("tokens_per_second"), fpt)}
        del trainer, summary
    del model
    return res


def case_ppo(ctx: Ctx, precision: str = "auto", value_model: str | None = None) -> dict:
    """The ppo stage's PPO at the 1B size, as flows/ppo.py `build_models` + `make_trainer` set it up for `method:
    lora` (that module imports Prefect, which the device machine lacks, so the same steps are spelled out here, in
    its order): the policy (random 1B causal LM, KV cache on) with LoRA from params/ppo.yaml, the reference = the
    policy with its adapter off, gradient checkpointing as params/ppo.yaml sets it, frozen linears held in the
    compute dtype (store_frozen_linears), everything under compute_precision. The value model is params/ppo.yaml's
    `value_model` unless `value_model` is given: `policy_trunk` (the default) a value head on the policy's trunk
    started from the score head of a frozen random 1B scalar-head reward model; `separate` a random 1B scalar-head
    value model with LoRA whose adapter-off self is the reward model (ppo_judge). The reward is the judge's real
    forward over the decoded answers (rm_scores), as the stage's reward_fn does."""
    import torch

    from refinery.config import load_params
    from refinery.data.chat import prompt_ids
    from refinery.data.records import read_jsonl
    from refinery.modeling.methods import apply_method
    from refinery.modeling.precision import compute_precision, resolve, store_frozen_linears
    from refinery.rlhf.policy_eval import decode_responses, ppo_judge, rm_scores
    from refinery.rlhf.ppo_trainer import PPOTrainer
    from refinery.rlhf.value_head import head_from_reward_model

    tok = ctx.tokenizer()
    steps = 3 if ctx.tiny else 4
    # lr 1e-5 (params/ppo.yaml: 3e-4): on random 1B weights the first device run's policy at 3e-4 reached KL 1.7 by
    # step 3 and produced NaN sampling probabilities at step 4 (a CUDA assert that ends the process). Throughput and
    # memory do not depend on the learning rate.
    upd = dict(steps=steps, batch_size=16, mini_batch_size=8, ppo_epochs=2, max_new_tokens=16 if ctx.tiny else 64,
               save_steps=steps, keep_checkpoints=1, method="lora", lr=1e-5, value_lr=1e-5,
               **({"value_model": value_model} if value_model else {}))
    cfg = load_params("ppo").model_copy(update=upd)
    trunk = cfg.value_model == "policy_trunk"
    recs = [r for _, r in read_jsonl(ctx.data_dir / "prompts" / "train.jsonl")]
    keep = [i for i, r in enumerate(recs) if len(prompt_ids(tok, r["prompt"])) <= cfg.max_prompt_tokens] or list(
        range(len(recs)))
    recs = [recs[i] for i in keep]
    prompts = [prompt_ids(tok, r["prompt"]) for r in recs]
    start = gpu_reset()
    torch.manual_seed(SEED)
    policy, scalar = build_model(ctx, "causal"), build_model(ctx, "seqcls")
    policy.config.use_cache = True
    if trunk:  # the judge frozen on its own, the values from a head on the policy's trunk (flows/ppo.build_models)
        judge = scalar.eval().requires_grad_(False)
        value = head_from_reward_model(policy, judge)
    else:
        value = scalar
    if cfg.gradient_checkpointing:
        for m in ((policy,) if trunk else (policy, value)):
            m.activation_checkpointing_enable()
    policy = apply_method(policy, cfg, "CAUSAL_LM", seed=SEED)
    if not trunk:
        value = apply_method(value, cfg, "SEQ_CLS", seed=SEED)
        judge = ppo_judge(value, cfg.method, "", False, None)
    prec = resolve(precision)
    freed = sum(store_frozen_linears(m, prec) for m in ((policy, judge) if trunk else (policy, value)))
    at_rest = gpu_mb()

    def reward_fn(idx, rollout):
        answers = decode_responses(tok, rollout)
        return rm_scores(judge, tok, [recs[i]["prompt"] for i in idx], answers).to(rollout.sequences.device)

    gpu_reset()
    with compute_precision(prec):
        state = PPOTrainer(cfg, policy, value, reward_fn, prompts, tok, ctx.work / f"ppo-{prec}-{cfg.value_model}",
                           seed=SEED).train()
    h = state.history
    later = h[1:] or h
    return {"case": f"ppo-{prec}" + ("" if trunk else "-separate"), "precision": prec,
            "allocated_at_start_mb": round(start, 1), "steps": len(h),
            "settings": {k: getattr(cfg, k) for k in ("batch_size", "mini_batch_size", "ppo_epochs", "max_new_tokens",
                                                      "temperature", "gradient_checkpointing", "value_model")},
            "lora": {"r": cfg.lora.r, "alpha": cfg.lora.alpha, "targets": list(cfg.lora.target_modules)},
            "prompt_tokens_median": statistics.median(len(p) for p in prompts), "prompts": len(prompts),
            "frozen_weights_16bit_mb": round(freed / 2**20, 1), "models_at_rest_mb": at_rest,
            "episodes_per_second_per_step": [round(x["episodes_per_second"], 3) for x in h],
            "episodes_per_second_median_after_step1": round(statistics.median(x["episodes_per_second"] for x in later), 3),
            "generated_tokens_per_second_median_after_step1": round(
                statistics.median(x["tokens_per_second"] for x in later), 1),
            "response_length_mean": round(statistics.mean(x["response_length"] for x in h), 1),
            "step_seconds": [round(x["seconds"], 3) for x in h], "peak_gpu_mb": gpu_mb("peak"),
            "reward_first_last": [h[0]["reward_mean"], h[-1]["reward_mean"]]}


class Profiler:
    """torch.profiler over optimizer steps [first, last] of one run; GPU kernel time by family."""

    FAMILIES = (("attention", ("fmha", "flash", "attention", "cudnn", "sdpa", "efficient")),
                ("matmul", ("gemm", "xmma", "cutlass", "nvjet", "sm90", "matmul", "wgmma")),
                ("optimizer", ("adam", "multi_tensor", "fused_adam")),
                ("copy/cast", ("copy", "cast", "memcpy", "memset", "fill")),
                ("softmax/loss", ("softmax", "nll", "cross_entropy", "log_softmax")),
                ("norm/elementwise", ("elementwise", "vectorized", "reduce", "rms", "norm", "mul", "add", "pow",
                                      "silu", "neg", "cat", "index")))

    def __init__(self, first: int, last: int):
        from transformers import TrainerCallback

        self.first, self.last, self.prof, self.t0, self.wall = first, last, None, None, None
        outer = self

        class CB(TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):
                if state.global_step + 1 == outer.first:
                    outer.start()

            def on_step_end(self, args, state, control, **kw):
                if state.global_step == outer.last:
                    outer.stop()

        self.cb = CB()

    def start(self):
        import torch
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.prof = profile(activities=acts)
        self.prof.start()
        self.t0 = time.perf_counter()

    def stop(self):
        import torch

        if self.prof is None:
            return
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.wall = time.perf_counter() - self.t0
        self.prof.stop()

    def result(self) -> dict:
        from torch.autograd import DeviceType

        if self.prof is None or self.wall is None:
            return {"error": "the profiled steps were not reached"}
        kernels: dict[str, float] = {}
        cpu_ops: dict[str, tuple[float, int]] = {}
        for evt in self.prof.key_averages():
            dev_t = getattr(evt, "self_device_time_total", None)
            if dev_t is None:
                dev_t = getattr(evt, "self_cuda_time_total", 0)
            if getattr(evt, "device_type", None) == DeviceType.CUDA and dev_t > 0:
                if is_annotation(evt.key):  # a user range (e.g. Optimizer.step#AdamW.step) drawn on the GPU timeline
                    continue
                kernels[evt.key] = kernels.get(evt.key, 0.0) + dev_t / 1e6
            elif evt.key.startswith("aten::"):
                cpu_ops[evt.key] = (evt.self_cpu_time_total / 1e6, evt.count)
        fam: dict[str, float] = {}
        for name, secs in kernels.items():
            low = name.lower()
            f = next((f for f, keys in self.FAMILIES if any(k in low for k in keys)), "other")
            fam[f] = fam.get(f, 0.0) + secs
        busy = sum(kernels.values())
        top = sorted(kernels.items(), key=lambda kv: -kv[1])[:12]
        top_cpu = sorted(cpu_ops.items(), key=lambda kv: -kv[1][0])[:10]
        return {"steps": [self.first, self.last], "wall_seconds": round(self.wall, 4),
                "gpu_kernel_seconds": round(busy, 4), "gpu_busy_fraction": round(busy / self.wall, 4) if self.wall else None,
                "kernel_launches": sum(e.count for e in self.prof.key_averages()
                                       if getattr(e, "device_type", None) == DeviceType.CUDA),
                "by_family_seconds": {k: round(v, 4) for k, v in sorted(fam.items(), key=lambda kv: -kv[1])},
                "top_kernels": [[n[:120], round(s, 4)] for n, s in top],
                "top_cpu_ops": [[n, round(s, 4), c] for n, (s, c) in top_cpu]}


def is_annotation(name: str) -> bool:
    """torch.profiler's record_function ranges that it also reports with GPU time; they overlap real kernels."""
    return name.startswith(("Optimizer.", "ProfilerStep", "## ")) or "#" in name.split("<")[0]


def without_annotations(p: dict) -> dict:
    """A profile result with the annotation ranges among its top kernels taken out of the totals (results written
    before the device side skipped them)."""
    ann = [(n, t) for n, t in p.get("top_kernels", []) if is_annotation(n)]
    if not ann:
        return p
    p = json.loads(json.dumps(p))
    fam = p.get("by_family_seconds", {})
    for name, secs in ann:
        low = name.lower()
        f = next((f for f, keys in Profiler.FAMILIES if any(k in low for k in keys)), "other")
        if f in fam:
            fam[f] = round(fam[f] - secs, 4)
        p["gpu_kernel_seconds"] = round(p["gpu_kernel_seconds"] - secs, 4)
    p["by_family_seconds"] = dict(sorted(fam.items(), key=lambda kv: -kv[1]))
    p["gpu_busy_fraction"] = round(p["gpu_kernel_seconds"] / p["wall_seconds"], 4) if p.get("wall_seconds") else None
    p["top_kernels"] = [[n, t] for n, t in p["top_kernels"] if not is_annotation(n)]
    p["annotations_removed"] = ann
    return p


def profile_case(case: str):
    fn = {"sft-ours": case_sft_ours, "sft-trl": case_sft_trl}[case.removesuffix("-liger")]

    def run_profile(ctx: Ctx) -> dict:
        res = fn(ctx, profile_steps=(ctx.warmup + 1, ctx.warmup + 2), steps=ctx.warmup + 2,
                 liger=case.endswith("-liger"))
        return {"case": f"profile {case}", **res.get("profile", {}), "tokens_per_step": round(
            res["timed_tokens"] / max(res["timed_steps"], 1)) if res.get("timed_steps") else None}

    return run_profile


# ---------------------------------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------------------------------
def machine(ctx: Ctx) -> dict:
    import torch

    m = B.machine_info()
    m.pop("load_average_at_start", None)
    try:
        import bitsandbytes

        m["bitsandbytes"] = bitsandbytes.__version__
    except Exception:  # noqa: BLE001 - absent on CPU machines
        m["bitsandbytes"] = None
    m["liger_kernel"] = importlib.metadata.version("liger-kernel") if importlib.util.find_spec("liger_kernel") else None
    import refinery

    m["refinery_from"] = str(Path(refinery.__file__).resolve().parent)
    snap = ctx.src / "SNAPSHOT"
    m["snapshot"] = snap.read_text().strip() if snap.is_file() else None
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        m["gpu_memory_gb"] = round(p.total_memory / 2**30, 1)
        m["cuda"] = torch.version.cuda
        try:
            m["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                         capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            m["driver"] = None
    return m


def matmul_ceiling() -> float | None:
    """bf16 8192^3 matrix product on random data, median of 20 timed runs (TFLOP/s): the measured ceiling."""
    import torch

    if not torch.cuda.is_available():
        return None
    n = 8192
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for _ in range(5):
        a @ b
    times = []
    for _ in range(20):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        a @ b
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    del a, b
    return round(2 * n**3 / statistics.median(times) / 1e12, 1)


def run(args) -> int:
    t_start = time.perf_counter()
    out = Path(args.out).resolve()
    os.environ.setdefault("TQDM_DISABLE", "1")
    for k, v in B.CHILD_ENV.items():
        os.environ.setdefault(k, v)
    src = Path(args.src).resolve()
    args.src = str(src)
    if str(src) not in sys.path:
        sys.path.insert(0, str(src))
    os.chdir(src)  # params/ is read relative to the working directory
    _patch_meter()
    ctx = Ctx(args)
    B.PRECISION = ctx.precision
    out.mkdir(parents=True, exist_ok=True)
    budget = args.budget_s
    results: dict = {"command": "python bench/gpu_bench.py " + " ".join(sys.argv[1:]),
                     "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                     "tiny": ctx.tiny, "budget_s": budget, "machine": machine(ctx),
                     "settings": {"seq": ctx.seq, "sft_rows_per_step": SFT_ROWS, "reward_pairs_per_step": RM_PAIRS,
                                  "lr": LR, "warmup_ratio": B.WARMUP_RATIO, "scheduler": B.SCHEDULER,
                                  "max_grad_norm": B.MAX_GRAD_NORM, "warmup_steps_excluded": ctx.warmup,
                                  "timed_steps": ctx.timed, "precision": ctx.precision, "model": ctx.model_cfg,
                                  "qlora_seq": ctx.qlora_seq, "qlora_warmup": ctx.qwarm, "qlora_timed": ctx.qtimed,
                                  "peak_flops_table": B.PEAK_BF16_FLOPS},
                     "runs": {c: [] for c in CASES}, "timeline": [], "skipped": {}}
    print(f"gpu_bench: {results['machine'].get('gpu') or 'no GPU'}; refinery from {results['machine']['refinery_from']}; "
          f"budget {budget:.0f} s", flush=True)
    results["matmul_ceiling_tflops"] = matmul_ceiling()
    est = dict(EST)

    def left() -> float:
        return budget - (time.perf_counter() - t_start)

    def save():
        results["elapsed_s"] = round(time.perf_counter() - t_start, 1)
        (out / "results-gpu.json").write_text(json.dumps(results, indent=2, default=str) + "\n")

    def task(name: str, fn, key: str):
        if left() < est[key]:
            why = f"not started: {left():.0f} s of the {budget:.0f} s budget left, about {est[key]:.0f} s needed"
            results["skipped"].setdefault(name, why)
            print(f"gpu_bench: {name}: {why}", flush=True)
            return None
        t0 = time.perf_counter()
        print(f"gpu_bench: {name} ...", flush=True)
        try:
            r = fn(ctx)
        except Exception as exc:  # noqa: BLE001 - recorded; the next task runs
            traceback.print_exc()
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            r = {"case": name, "error": f"{type(exc).__name__}: {first}"[:500]}
        secs = time.perf_counter() - t0
        est[key] = max(est[key] * 0.5, secs * 1.15)
        results["timeline"].append([name, round(t0 - t_start, 1), round(secs, 1)])
        try:
            gpu_reset()
        except Exception as exc:  # a device-side assert poisons the CUDA context: keep what was measured, then stop
            results.setdefault("fatal", {})[name] = {**r, "after": f"{type(exc).__name__}: {str(exc).splitlines()[0]}"}
            save()
            raise
        brief = {k: r.get(k) for k in ("tokens_per_second", "pairs_per_second", "mfu", "peak_gpu_mb", "error") if r.get(k)
                 is not None}
        print(f"gpu_bench: {name} done in {secs:.1f} s {json.dumps(brief)}", flush=True)
        return r

    def round_of_cases(rep: int):
        for case in ctx.cases:
            r = task(f"{case}#{rep}", CASE_FNS[case], case)
            if r is not None:
                r["repeat"] = rep
                results["runs"][case].append(r)
            save()

    try:
        ctx.sft, ctx.pairs  # noqa: B018 - data first (tokenisation outside every timing)
        results["data"] = {"sft": ctx.sft[2], "pairs": ctx.pairs[2]}
        results["model_vocab"], results["model_params"] = model_size(ctx)
        # what matters most first: the rounds, the profiles, PPO in the stage's precision and in fp32 (its memory
        # against bf16; a CUDA assert there would end the process), QLoRA 7B, then PPO with a separate value model
        # (against the default trunk head); the budget skips what would not fit
        rounds = [f"r{i}" for i in range(1, args.repeats + 1)]
        plan = [*rounds, "profile", "ppo", "ppo-fp32", "qlora", "ppo-separate"]
        results["profiles"] = {}
        for step in plan:
            if step.startswith("r"):
                round_of_cases(int(step[1:]))
            elif step == "qlora" and not args.skip_qlora:
                results["qlora_7b"] = (task("qlora-7b", case_qlora_7b, "qlora-7b")
                                       or {"skipped": results["skipped"].get("qlora-7b")})
            elif step.startswith("ppo") and not args.skip_ppo:
                prec = "fp32" if step == "ppo-fp32" else "auto"
                vm = "separate" if step == "ppo-separate" else None  # None: params/ppo.yaml's value_model
                r = task(step, functools.partial(case_ppo, precision=prec, value_model=vm), "ppo")
                results.setdefault("ppo_runs", {})[step] = r or {"skipped": results["skipped"].get(step)}
            elif step == "profile" and not args.skip_profile:
                for case in ("sft-ours-liger", "sft-trl-liger") if ctx.liger else ("sft-ours", "sft-trl"):
                    results["profiles"][case] = (task(f"profile {case}", profile_case(case), "profile")
                                                 or {"skipped": results["skipped"].get(f"profile {case}")})
            save()
    finally:
        save()
        shutil.rmtree(ctx.work, ignore_errors=True)
    print("\n".join(report_lines(results)))
    print(f"gpu_bench: wrote {out / 'results-gpu.json'} ({time.perf_counter() - t_start:.0f} s)")
    if args.write_md:
        write_report(results, out)
    return 0


# ---------------------------------------------------------------------------------------------------------------
# summary and report (every number in RESULTS-gpu.md comes from results-gpu.json through these functions)
# ---------------------------------------------------------------------------------------------------------------
# (name, our case, TRL case, rate): each side as shipped; both with Liger; ours with Liger against TRL as shipped
COMPARISONS = tuple((f"{fam}{tag}", f"{fam}-ours{a}", f"{fam}-trl{b}", key)
                    for fam, key in (("sft", "tokens_per_second"), ("reward", "pairs_per_second"))
                    for tag, a, b in (("", "", ""), ("-liger", "-liger", "-liger"), ("-liger-vs-default", "-liger", "")))
COMPARISON_LABELS = {"": "as shipped (no Liger on either side)", "-liger": "both with Liger",
                     "-liger-vs-default": "ours with Liger / TRL as shipped"}


def summarise(results: dict) -> dict:
    summ: dict = {}
    for case, runs in results.get("runs", {}).items():
        ok = [r for r in runs if "error" not in r and r.get("tokens_per_second")]
        s: dict = {"runs": len(runs), "ok": len(ok), "errors": [r["error"] for r in runs if "error" in r]}
        if ok:
            for key in ("tokens_per_second", "pairs_per_second", "mfu", "peak_gpu_mb", "step_seconds_timed_median"):
                vals = [r[key] for r in ok if r.get(key) is not None]
                if vals:
                    s[key] = {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "values": vals}
            tps = s["tokens_per_second"]
            s["spread_pct"] = round(100 * (tps["max"] - tps["min"]) / tps["median"], 1)
            s["tokens_per_step"] = round(statistics.median(r["timed_tokens"] / r["timed_steps"] for r in ok))
        summ[case] = s
    for fam, ours, trl, key in COMPARISONS:
        a, b = summ.get(ours, {}).get(key), summ.get(trl, {}).get(key)
        if a and b:
            ra = {r["repeat"]: r.get(key) for r in results["runs"][ours] if r.get(key)}
            rb = {r["repeat"]: r.get(key) for r in results["runs"][trl] if r.get(key)}
            paired = [ra[k] / rb[k] for k in sorted(ra) if k in rb]
            summ[f"{fam}_ratio"] = {"median_over_median": round(a["median"] / b["median"], 3),
                                    "paired": [round(x, 3) for x in paired]}
    return summ


fmt = B.fmt


REPORT_CMD = "python bench/gpu_bench.py --report <results-gpu.json>"


def report_lines(results: dict) -> list[str]:
    m, st = results["machine"], results["settings"]
    summ = summarise(results)
    peak = next((v for k, v in st["peak_flops_table"].items() if m.get("gpu") and k in m["gpu"]), None)
    cfg = st["model"]
    n1b = None
    for case in CASES:
        for r in results["runs"].get(case, []):
            if r.get("flops_formula") and case.startswith("sft"):
                n1b = r["flops_formula"]
                break
        if n1b:
            break
    lines = ["# GPU benchmark: llm-refinery vs TRL at GPU sizes (random weights)", "",
             f"Produced by `{results['command']}` on {results['date']}; this file by "
             f"`{results.get('report_command') or REPORT_CMD}`. Every model here has **random weights**, built "
             "on the GPU from a config (weights cannot travel to the device machine). Throughput and memory do not "
             "depend on the weight values; losses do, and they only show that training ran.", "",
             *(["**TINY SMOKE TEST (`--tiny`): 2-layer models, short rows, no GPU numbers. Not a measurement.**", ""]
               if results.get("tiny") else []),
             "## Machine", "",
             f"- GPU: {m.get('gpu') or 'none'}" + (f", {m['gpu_memory_gb']} GiB, CUDA {m.get('cuda')}, driver "
                                                   f"{m.get('driver')}" if m.get("gpu_memory_gb") else "")
             + f"; CPU {m['cpu']}, {m['cores']} cores, {m['memory_gb']} GB RAM",
             f"- Python {m['python']}, torch {m['torch']}, transformers {m['transformers']}, trl {m['trl']}, peft "
             f"{m['peft']}, bitsandbytes {m.get('bitsandbytes')}, liger-kernel {m.get('liger_kernel')}; our code from "
             f"`{m.get('refinery_from')}`"
             + (f" ({m['snapshot']})" if m.get("snapshot") else ""),
             f"- MFU peak: **{fmt(peak / 1e12 if peak else None, 1)} TFLOP/s** (dense bf16, H100/H200 SXM datasheet; "
             f"bench.py `PEAK_BF16_FLOPS`). Measured bf16 8192³ matrix product on this GPU: "
             f"{fmt(results.get('matmul_ceiling_tflops'), 1)} TFLOP/s.", "",
             "## 1. Full fine-tuning at ~1B: ours vs TRL 1.16", "",
             f"Model: Llama, hidden {cfg['hidden_size']}, {cfg['num_hidden_layers']} layers, intermediate "
             f"{cfg['intermediate_size']}, {cfg['num_attention_heads']} heads ({cfg['num_key_value_heads']} KV), tied "
             f"embeddings, vocabulary {fmt(_vocab(results))} (the SmolLM2 tokenizer; Llama-3.2-1B's shape otherwise), "
             f"{fmt(_params(results))} parameters, fp32 weights, SDPA attention. "
             f"Training: full fine-tuning, " + ("bf16 autocast (the Trainer's `bf16=True`, our `precision: bf16`)" if
               st['precision'] == 'bf16' else f"{st['precision']} (no GPU)") + ", the "
             f"Trainer's default optimiser ({_first(results, 'optimizer')}) on both sides, lr {st['lr']:g}, cosine "
             f"with {st['warmup_ratio']:.0%} warm-up, grad-norm clip {st['max_grad_norm']:g}, no gradient "
             f"checkpointing, no checkpoint saves. Each run: {st['warmup_steps_excluded']} warm-up steps excluded, "
             f"then {st['timed_steps']} timed steps (GPU synchronised at every step end). Runs interleaved ours, TRL, "
             "ours, TRL, …; the table gives the median of the runs, their min–max and the spread (max − min) / "
             "median. Peak GPU memory is the largest `torch.cuda.max_memory_allocated` of the runs, from the model "
             "build to the end of training.", "",
             "| case | runs | tokens/s (median) | min–max | spread | pairs/s (median) | MFU | peak GPU memory MiB "
             "| tokens per step | step s (median) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for case in CASES:
        s = summ.get(case)
        if not s:
            continue
        if not s.get("ok"):
            lines.append(f"| {case} | {s['runs']} | failed: {(s['errors'] or ['not run'])[0].replace('|', '/')[:150]} "
                         "| | | | | | | |")
            continue
        t, p = s["tokens_per_second"], s.get("pairs_per_second")
        mf, mem = s.get("mfu"), s.get("peak_gpu_mb")
        lines.append(f"| {case} | {s['ok']}" + (f" ({s['runs'] - s['ok']} failed)" if s['runs'] > s['ok'] else "")
                     + f" | {fmt(t['median'])} | {fmt(t['min'])}–{fmt(t['max'])} | {fmt(s['spread_pct'])}% | "
                     f"{fmt(p['median'], 3) if p else '–'} | "
                     f"{fmt(100 * mf['median'], 1, '%') if mf else '–'} | "
                     f"{fmt(mem['max'], 0) if mem else '–'} | {fmt(s['tokens_per_step'])} | "
                     f"{fmt(s['step_seconds_timed_median']['median'], 3) if s.get('step_seconds_timed_median') else '–'} |")
    lines.append("")
    for name, ours, trl, _ in COMPARISONS:
        fam = name.split("-")[0]
        label = ("SFT tokens/s" if fam == "sft" else "reward pairs/s") + ", " + COMPARISON_LABELS[name[len(fam):]]
        r = summ.get(f"{name}_ratio")
        if r:
            goal = "meets" if r["median_over_median"] >= 1.3 else "misses"
            lines.append(f"- {label}, {ours} / {trl}: **{r['median_over_median']:.2f}×** (median over median; per "
                         f"paired run: {', '.join(f'{x:.2f}' for x in r['paired'])}); {goal} the 1.3× goal.")
        elif ours in results["runs"] or name == fam:
            lines.append(f"- {label}, {ours} / {trl}: n/a (a side has no successful run)")
    mf = [(c, summ[c]["mfu"]["median"]) for c in CASES if summ.get(c, {}).get("mfu")]
    if mf:
        lines.append("- MFU (goal ≥ 40%): " + ", ".join(f"{c} {100 * v:.1f}%" for c, v in mf) + ". MFU = timed tokens/s "
                     f"× model FLOPs per token / peak; FLOPs per token = 6·N + 12·L·d·T (bench.py `flops_per_token`; "
                     f"{n1b}), with T our rows' mean length for both sides of a comparison, so MFU ratios equal "
                     "throughput ratios.")
    lines += profile_split_lines(results) + detail_lines(results, summ) + [""]
    lines += qlora_lines(results.get("qlora_7b")) + [""] + ppo_lines(results) + [""]
    for case, prof in (results.get("profiles") or {"sft-ours": results.get("profile")}).items():
        lines += profile_lines(prof, case) + [""]
    if results.get("skipped"):
        lines += ["## Not run", ""] + [f"- {k}: {v}" for k, v in results["skipped"].items()] + [""]
    lines += ["## Run", "",
              f"- device-run wall time {fmt(results.get('elapsed_s'))} s of a {fmt(results.get('budget_s'))} s budget; "
              "tasks (start s, seconds): " + ", ".join(f"{n} ({s}, {d})" for n, s, d in results.get("timeline", [])), ""]
    return lines


def _first(results, key):
    for runs in results.get("runs", {}).values():
        for r in runs:
            if r.get(key) is not None:
                return r[key]
    return None


def _vocab(results):
    return results.get("model_vocab")


def _params(results):
    return results.get("model_params")


def profile_split_lines(results: dict) -> list[str]:
    """Attention vs everything else on the GPU, ours and TRL's SFT, from the two profiles (when both ran)."""
    profs = results.get("profiles") or {}
    pair = ("sft-ours-liger", "sft-trl-liger") if "sft-ours-liger" in profs else ("sft-ours", "sft-trl")
    a, b = (without_annotations(profs[c]) if isinstance(profs.get(c), dict) and profs[c].get("by_family_seconds") else None
            for c in pair)
    if not (a and b):
        return []

    def split(p):
        att = p["by_family_seconds"].get("attention", 0.0)
        return att, p["gpu_kernel_seconds"] - att, p.get("tokens_per_step") or 0

    (ao, ro, to), (at, rt, tt) = split(a), split(b)
    return [f"- Where the SFT gap is (profiles below, 2 steps each, {to:,} vs {tt:,} tokens per step): attention kernels "
            f"ours {ao:.3f} s, TRL {at:.3f} s; every other kernel ours {ro:.3f} s, TRL {rt:.3f} s. So "
            + ("TRL's extra attention over its flattened rows accounts for the ratio; without it TRL's other GPU work is "
               "the smaller one." if rt < ro else "ours is also ahead outside attention.")]


def detail_lines(results: dict, summ: dict) -> list[str]:
    out = []
    d = results.get("data", {})
    sft, pairs = d.get("sft"), d.get("pairs")
    if sft:
        out.append(f"- SFT data: {sft['examples']:,} demo examples (the mixture of params/sft.yaml, cycled) rendered with "
                   f"`render_example`, packed by `build_train_rows` into {sft['rows']} rows of ≤{results['settings']['seq']}"
                   f" tokens ({sft['row_tokens']:,} tokens, {sft['row_loss_tokens']:,} with loss); TRL gets the same "
                   "examples as a conversational prompt/completion set (`completion_only_loss`), packs them itself (BFD, "
                   "padding-free) and trains on the same tokens.")
    trl = next((r for r in results["runs"].get("sft-trl", []) if "data" in r), None)
    ours = next((r for r in results["runs"].get("sft-ours", []) if "data" in r), None)
    if trl:
        td = trl["data"]
        same = (td.get("trl_bin_tokens") == (sft or {}).get("row_tokens")
                and td.get("trl_bin_loss_tokens") == (sft or {}).get("row_loss_tokens"))
        out.append(f"- TRL SFT: {td.get('trl_bins')} BFD bins, {fmt(td.get('trl_bin_tokens'))} tokens, "
                   f"{fmt(td.get('trl_bin_loss_tokens'))} with loss (same as ours: {same}); loss type "
                   f"{td.get('trl_loss_type')}. Its padding-free collator flattens a batch into one row (median "
                   f"{fmt(trl.get('flattened_row_tokens_median'))} tokens) with position-id restarts. With SDPA (no "
                   "flash-attention varlen kernel on this machine) transformers turns that into a block-diagonal mask "
                   "over the whole flattened row, so TRL's attention computes scores over the full row; ours computes "
                   f"them over rows of ≤{results['settings']['seq']} (also masked). That extra masked attention work is "
                   "part of TRL's time here.")
    if ours:
        pad = (ours.get("batch_shape_tokens_incl_padding") or 0) - ours.get("tokens_total", 0)
        if ours.get("batch_shape_tokens_incl_padding"):
            out.append(f"- sft-ours pads a batch's shorter rows to the longest: {pad:,} padding positions computed "
                       f"({100 * pad / ours['batch_shape_tokens_incl_padding']:.1f}% of its batch positions), not counted "
                       "as tokens.")
    if pairs:
        rt = next((r for r in results["runs"].get("reward-trl", []) if "data" in r), {})
        out.append(f"- reward data: {pairs['pairs_used']} pairs of up to {results['settings']['seq']} tokens per side, "
                   f"each several consecutive demo pairs joined (prompts, chosen and rejected answers joined by a blank "
                   f"line; {pairs['demo_pairs']} demo pairs); sequences {pairs['min_tokens']}–{pairs['max_tokens']} "
                   f"tokens, mean {pairs['mean_tokens_per_sequence']}; {results['settings']['reward_pairs_per_step']} "
                   f"pairs (= {2 * results['settings']['reward_pairs_per_step']} padded sequences) per step on both "
                   f"sides; TRL's token ids identical to ours: {rt.get('data', {}).get('same_token_ids_as_ours', 'n/a')}.")
    for case in CASES:
        for r in results["runs"].get(case, []):
            for n in r.get("notes", []) or []:
                out.append(f"- {case} run {r.get('repeat')}: {n}")
            if "error" in r:
                out.append(f"- **{case} run {r.get('repeat')} failed**: `{r['error']}`")
    def rate(r):
        return (f"{fmt(r['pairs_per_second'], 3)} pairs/s" if r.get("pairs_per_second")
                else f"{fmt(r.get('tokens_per_second'))} tokens/s")

    order = sorted(((r.get("repeat") or 0, CASES.index(c), f"{c} #{r.get('repeat')} {rate(r)}")
                    for c in CASES for r in results["runs"].get(c, []) if r.get("tokens_per_second")))
    if order:
        out.append("- every run, in the order they ran: " + "; ".join(x[2] for x in order) + ".")
    cold = []
    for c in CASES:
        ok = [r for r in results["runs"].get(c, []) if r.get("tokens_per_second")]
        first = [r for r in ok if r.get("repeat") == 1]
        later = [r["tokens_per_second"] for r in ok if r.get("repeat", 1) > 1]
        if first and later:
            steps = first[0].get("step_seconds") or []
            warm = statistics.median(x for r in ok if r.get("repeat", 1) > 1 for x in r.get("step_seconds", [])[1:])
            slow = [x for x in steps[1:] if x > 2 * warm]
            cold.append(f"{c} {first[0]['tokens_per_second'] / statistics.median(later):.2f} (steps 2..N of its first run: "
                        f"{len(slow)} over twice the later runs' median step of {warm:.3f} s, {sum(slow):.2f} s in all)")
    if cold:
        out.append("- first run / median of the later runs (tokens/s): " + "; ".join(cold) + ". Every run trains on the "
                   "same batches in the same order, so only the first run meets each batch shape for the first time. "
                   "The slow steps come with new shapes (our padded width, or TRL's flattened length), which fits cuDNN's "
                   "SDPA building a new execution plan per shape. The later runs show the steady state once the shapes "
                   "are known; a long real run keeps meeting new shapes for a while.")
    starts = [r.get("allocated_at_start_mb") for rs in results["runs"].values() for r in rs
              if r.get("allocated_at_start_mb") is not None]
    if starts:
        out.append(f"- GPU memory still allocated at the start of a run (left over from the previous one): at most "
                   f"{max(starts):,.0f} MiB; peak memory is `torch.cuda.max_memory_allocated` from the model build to "
                   "the end of training (model, gradients, AdamW states, activations).")
    losses = []
    for case in CASES:
        vals = [r["final_loss"] for r in results["runs"].get(case, []) if r.get("final_loss") is not None]
        if vals:
            losses.append(f"{case} {statistics.median(vals):.3f}")
    if losses:
        out.append("- final training loss, median of runs (random weights: a sanity check only): " + ", ".join(losses) + ".")
    return out


def qlora_lines(q: dict | None) -> list[str]:
    out = ["## 2. QLoRA SFT at 7B: peak GPU memory", ""]
    if not q:
        return out + ["Not run."]
    if q.get("skipped"):
        return out + [f"Not run: {q['skipped']}"]
    if q.get("error"):
        return out + [f"**Failed**: `{q['error']}`"]
    c = q["config"]
    if q.get("from_earlier_run"):
        out += [f"**Not re-run this time (device budget); from an earlier run: {q['from_earlier_run']}.**", ""]
    out += [f"Model: LLaMA-2-7B shape (hidden {c['hidden_size']}, {c['num_hidden_layers']} layers, intermediate "
            f"{c['intermediate_size']}, {c['num_attention_heads']} heads, vocabulary {c['vocab_size']:,}), "
            f"{fmt(q.get('params'))} parameters, random bf16 weights saved to local disk ({q.get('random_checkpoint_gb')} "
            f"GB under {q.get('checkpoint_dir')}, {q.get('random_checkpoint_seconds')} s) and loaded by our "
            f"`load_causal_lm` with method `{q.get('method')}` "
            + (f"(4-bit NF4, double quantisation, bf16 compute; {q.get('linear4bit_modules')} `Linear4bit` modules; "
               if q.get('method') == 'qlora' else "(no CUDA or bitsandbytes here: plain LoRA on an fp32 load; ")
            + f"{q.get('load_seconds')} s). "
            f"`apply_method`: peft's `prepare_model_for_kbit_training`, then LoRA r=16, alpha 32, dropout 0.05 on q, k, v, o, "
            f"gate, up, down ({fmt(q.get('trainable_params'))} trainable). Training through `run_trainer`: gradient "
            f"checkpointing, batch 1 × {q.get('seq')} random token ids, AdamW.", "",
            f"GPU memory after the 4-bit load: {fmt(q.get('after_load_gpu_mb'), 0)} MiB; after `apply_method`: "
            f"{fmt(q.get('after_lora_gpu_mb'), 0)} MiB (the frozen embeddings, norms and LM head are cast to fp32).", "",
            "| precision | peak GPU memory MiB (GB) | ≤ 24 GB | peak reserved MiB | tokens/s | MFU | steps (timed) "
            "| loss first → last |",
            "|---|---:|---|---:|---:|---:|---:|---|"]
    for prec, r in q.get("runs", {}).items():
        pk = r.get("peak_gpu_mb")
        label = {"fp32": "fp32 (params default: no autocast)", "bf16": "bf16 autocast"}.get(prec, prec)
        losses = r.get("losses") or []
        out.append(f"| {label} | {fmt(pk, 0)} ({fmt(pk * 2**20 / 1e9 if pk else None, 2)}) | "
                   f"{'yes' if pk is not None and pk * 2**20 <= 24e9 else ('no' if pk is not None else '–')} | "
                   f"{fmt(r.get('peak_gpu_reserved_mb'), 0)} | {fmt(r.get('tokens_per_second'))} | "
                   f"{fmt(100 * r['mfu'], 1, '%') if r.get('mfu') else '–'} | {r.get('steps_run')} ({r.get('timed_steps')}) | "
                   f"{losses[0] if losses else '–'} → {losses[-1] if losses else '–'} |")
    out += ["", "MFU here uses 4·N + 12·L·d·T (frozen base: no weight gradients; the recomputation of gradient "
            "checkpointing is not counted), N from the config."]
    return out


def ppo_weight_formula(results: dict, r: int, trunk: bool = False) -> dict | None:
    """bench/ppo_memory.py's weight bytes for the 1B config with LoRA r on all seven projections: bf16 frozen
    linears in two models (policy; value = reward model, or with `trunk` the frozen reward model beside the policy),
    or both fp32: 2 x (2 N_lin + 4 N_other) + 4 T and 2 x 4 (N_lin + N_other) + 4 T. T: the trained LoRA (the
    policy's, and the value model's unless `trunk`) and the score head."""
    c, vocab = results.get("settings", {}).get("model"), results.get("model_vocab")
    if not c or not vocab:
        return None
    h, i, L = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]
    kv = c["num_key_value_heads"] * (h // c["num_attention_heads"])
    n_lin = L * (2 * h * h + 2 * h * kv + 3 * h * i)       # the tied LM head is the embedding: not a frozen linear
    n_other = vocab * h + (2 * L + 1) * h                  # embedding, norms
    lora = L * r * ((h + h) * 2 + (h + kv) * 2 + (h + i) * 3)
    t = (1 if trunk else 2) * lora + h                     # policy's (and value model's) LoRA, the value score head
    return {"bf16": 2 * (2 * n_lin + 4 * n_other) + 4 * t, "fp32": 2 * 4 * (n_lin + n_other) + 4 * t,
            "n_lin": n_lin, "n_other": n_other, "t": t}


VARIANTS = {"nocudnn": "SDPA without cuDNN's backend (what the stage now does)", "eager": "eager attention",
            "fp32-nocudnn": "SDPA without cuDNN's backend", "default": "every SDPA backend allowed"}


def value_model_of(run: dict) -> str:
    """A PPO run's value model; runs from before `value_model` existed built a separate one."""
    return run.get("settings", {}).get("value_model") or "separate"


def ppo_lines(results: dict) -> list[str]:
    out = ["## 3. PPO at ~1B with LoRA (the ppo stage's set-up)", ""]
    runs = results.get("ppo_runs") or ({"ppo": results["ppo"]} if results.get("ppo") else {})
    lost = [t for t in results.get("timeline", []) if t[0].startswith("ppo") and t[0] not in runs]
    for name, start, secs in lost:
        fatal = (results.get("fatal") or {}).get(name, {})
        out.append(f"- **{name} in the main run (every SDPA backend allowed, so cuDNN's on this GPU) did not finish**: "
                   f"it started at {start} s, the process ended {secs} s later"
                   + (f" ({fatal.get('error') or fatal.get('after')})" if fatal else
                      " with no result saved (the run's log: a CUDA device-side assert, `probability tensor contains "
                      "either inf, nan or element < 0`, in sampling at step 4 of 4; the same at step 4 in an earlier "
                      "run at lr 3e-4)") + ". The variants below, each in its own process "
                   "(`bench/gpu_ppo_variants.py`, run on the next lease of the same machine type), located it: with "
                   "cuDNN's SDPA backend off, or eager attention, all 4 steps ran. The ppo stage now runs every "
                   "left-padded pass without cuDNN's backend (refinery/modeling/attention.py).")
    if lost:
        out.append("")
    done = [p for p in runs.values() if p.get("steps")]
    notes = [f"- {name}: " + (f"not run: {p['skipped']}" if p.get("skipped") else f"**failed**: `{p['error']}`")
             for name, p in runs.items() if p.get("skipped") or p.get("error")]
    out += notes + ([""] if notes else [])
    if not done:
        return out + ([] if runs else ["Not run."])
    s, first = done[0]["settings"], done[0]
    r = first.get("lora", {}).get("r", 16)
    out += ["Policy: the 1B causal model above with LoRA "
            f"r={r} ({', '.join(first.get('lora', {}).get('targets', [])) or 'q, k, v, o, gate, up, down'}); reference "
            "= the policy with its adapter off. Value model (column `value model`, params/ppo.yaml `value_model`): "
            "`policy_trunk` (the default) a value head on the policy's trunk, the reward model a frozen model of the same "
            "shape with a scalar head (random weights); `separate` (the runs before it existed have no value) a model "
            "of that shape with LoRA whose adapter-off self is the reward model. The reward model scores the decoded "
            "answers (its real forward, as the stage's reward_fn); gradient checkpointing "
            f"{'on' if s.get('gradient_checkpointing') else 'off'} (params/ppo.yaml); frozen linear weights held in the "
            "compute dtype under bf16 (`store_frozen_linears`). "
            f"{s['batch_size']} prompts per step (median prompt {fmt(first.get('prompt_tokens_median'))} tokens, "
            f"{first.get('prompts')} demo prompts), {s['max_new_tokens']} new tokens, mini-batch {s['mini_batch_size']}, "
            f"{s['ppo_epochs']} PPO epochs, {first['steps']} steps. Peak GPU memory is `max_memory_allocated` over the "
            "training, the models included.", "",
            "| variant | value model | precision | episodes/s (median, steps 2..N) | generated tokens/s | mean response "
            "length | step seconds | models at rest MiB | frozen weights in 16 bits MiB | peak GPU memory MiB |",
            "|---|---|---|---:|---:|---:|---|---:|---:|---:|"]
    for p in done:
        out.append(f"| {VARIANTS.get(p.get('variant'), p.get('variant') or 'in the main run')} | {value_model_of(p)} | "
                   f"{p.get('precision', 'fp32')} | {fmt(p.get('episodes_per_second_median_after_step1'), 2)} | "
                   f"{fmt(p.get('generated_tokens_per_second_median_after_step1'))} | {fmt(p.get('response_length_mean'))} | "
                   f"{', '.join(str(x) for x in p.get('step_seconds', []))} | {fmt(p.get('models_at_rest_mb'), 0)} | "
                   f"{fmt(p.get('frozen_weights_16bit_mb'), 0)} | {fmt(p.get('peak_gpu_mb'), 0)} |")
    checks = []
    for p in done:
        formula = ppo_weight_formula(results, r, trunk=value_model_of(p) == "policy_trunk")
        if formula and p.get("models_at_rest_mb") and p.get("precision") in formula and p.get("variant") != "eager":
            checks.append(f"{value_model_of(p)}, {p.get('precision')}: predicted {formula[p.get('precision')] / 2**20:,.0f}"
                          f" MiB, measured {p['models_at_rest_mb']:,.0f} MiB (N_lin {formula['n_lin']:,}, "
                          f"N_other {formula['n_other']:,}, T {formula['t']:,})")
    if checks:
        out += ["", "- Weight memory against the formula of bench/ppo_memory.py (README \"PPO memory\"; GPU memory "
                "allocated once the models are built; T: the trained LoRA and the value score head): "
                + "; ".join(checks) + "."]
    by = {p.get("precision"): p for p in done if p.get("variant") != "eager" and value_model_of(p) == value_model_of(first)}
    if by.get("bf16", {}).get("peak_gpu_mb") and by.get("fp32", {}).get("peak_gpu_mb"):
        b16, f32 = by["bf16"], by["fp32"]
        out += ["", f"- bf16 / fp32: peak memory {b16['peak_gpu_mb'] / f32['peak_gpu_mb']:.2f}×, episodes/s "
                f"{b16['episodes_per_second_median_after_step1'] / f32['episodes_per_second_median_after_step1']:.2f}×."]
    return out


def profile_lines(p: dict | None, case: str = "sft-ours") -> list[str]:
    out = [f"## Where {case} spends its time (torch.profiler, 2 steps after warm-up)", ""]
    if not p:
        return out + ["Not run."]
    if p.get("skipped"):
        return out + [f"Not run: {p['skipped']}"]
    if p.get("error"):
        return out + [f"Not available: `{p['error']}`"]
    p = without_annotations(p)
    out += [f"Wall time {fmt(p.get('wall_seconds'), 3)} s for steps {p['steps'][0]}–{p['steps'][1]} (under the "
            f"profiler); GPU kernel time {fmt(p.get('gpu_kernel_seconds'), 3)} s = "
            f"**{fmt(100 * (p.get('gpu_busy_fraction') or 0), 1)}%** "
            f"busy; {fmt(p.get('kernel_launches'))} kernel launches.", "",
            "| kernel family (by name) | GPU seconds | share of kernel time |", "|---|---:|---:|"]
    tot = p.get("gpu_kernel_seconds") or 0
    for fam, secs in (p.get("by_family_seconds") or {}).items():
        out.append(f"| {fam} | {secs:.4f} | {100 * secs / tot:.1f}% |" if tot else f"| {fam} | {secs:.4f} | – |")
    if p.get("annotations_removed"):
        out += ["", "Left out of the kernel time: profiler annotation ranges drawn on the GPU timeline (they overlap the "
                "kernels they contain): " + "; ".join(f"`{n}` {t:.4f} s" for n, t in p["annotations_removed"]) + "."]
    if p.get("top_kernels"):
        out += ["", "Top kernels: " + "; ".join(f"`{n[:70]}` {s:.4f} s" for n, s in p["top_kernels"][:6]) + "."]
    if p.get("top_cpu_ops"):
        out += ["", "Host side, largest self CPU time of aten ops (seconds, calls): " + "; ".join(
            f"`{n}` {s:.3f} ({c})" for n, s, c in p["top_cpu_ops"][:6]) + "."]
    return out


def write_report(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results-gpu.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    (out / "RESULTS-gpu.md").write_text("\n".join(report_lines(results)) + "\n")
    print(f"gpu_bench: wrote {out / 'RESULTS-gpu.md'} and {out / 'results-gpu.json'}")


# ---------------------------------------------------------------------------------------------------------------
# snapshot for the device machine
# ---------------------------------------------------------------------------------------------------------------
def make_snapshot(dest: Path) -> int:
    """The committed refinery/, params/ and data/demo (git archive HEAD), the SmolLM2 tokenizer (tok/) and the
    prepared data (data/prepared/): everything the device run reads, independent of the live working tree."""
    root = HERE.parent
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    archive = subprocess.run(["git", "archive", "HEAD", "refinery", "params", "data/demo"], cwd=root,
                             capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    sys.path.insert(0, str(dest))
    os.chdir(dest)
    from refinery.config import load_params
    from refinery.data.prepare import prepare_all
    from refinery.modeling.base_import import load_smollm2_tokenizer

    tok = load_smollm2_tokenizer()
    tok.save_pretrained(dest / "tok")
    from refinery.modeling.loading import load_tokenizer

    tok = load_tokenizer(dest / "tok")
    prepare_all(load_params("prepare"), tok, 2048, SEED, dest / "data" / "prepared")
    from refinery.data.records import read_jsonl

    recs = [r for _, r in read_jsonl(dest / "data" / "prepared" / "preferences" / "train.jsonl")]
    with open(dest / "data" / f"long-pairs-{SEQ}.jsonl", "w") as fh:  # tokenising these costs ~20 s: not on the device
        for r in long_pairs(tok, recs, SEQ, (WARMUP + TIMED) * RM_PAIRS):
            fh.write(json.dumps(r) + "\n")
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True).stdout.strip()
    (dest / "SNAPSHOT").write_text(f"git archive of {commit} (refinery params data/demo) + tok/ + data/prepared/\n")
    size = sum(f.stat().st_size for f in dest.rglob("*") if f.is_file())
    print(f"gpu_bench: snapshot of {commit[:10]} in {dest} ({size / 2**20:.1f} MiB)")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", default=str(HERE.parent),
                    help="folder with refinery/, params/, tok/ and data/prepared/ (a --make-snapshot folder)")
    ap.add_argument("--out", default=str(HERE), help="where results-gpu.json goes (default bench/)")
    ap.add_argument("--repeats", type=int, default=5, help="interleaved runs per 1B case (default 5)")
    ap.add_argument("--budget-s", type=float, default=390.0,
                    help="stop starting new tasks when they would not end within this many seconds of the start")
    ap.add_argument("--timed", type=int, default=TIMED, help=f"timed steps per 1B run (default {TIMED})")
    ap.add_argument("--no-liger", action="store_true", help="leave out the Liger-kernel cases")
    ap.add_argument("--tiny", action="store_true", help="2 layers, hidden 64, 128-token rows, 3 steps: a smoke test")
    ap.add_argument("--skip-qlora", action="store_true")
    ap.add_argument("--skip-ppo", action="store_true")
    ap.add_argument("--skip-profile", action="store_true")
    ap.add_argument("--write-md", action="store_true", help="also write RESULTS-gpu.md into --out after the run")
    ap.add_argument("--report", metavar="JSON", help="only write RESULTS-gpu.md + results-gpu.json (into --out) from JSON")
    ap.add_argument("--ppo-runs", nargs="*", metavar="JSON", help="with --report: bench/gpu_ppo_variants.py outputs")
    ap.add_argument("--qlora-from", metavar="JSON", help="with --report: take the QLoRA 7B section from an earlier run")
    ap.add_argument("--make-snapshot", metavar="DIR", help="build the folder --src reads, from the committed code")
    args = ap.parse_args(argv)
    if args.make_snapshot:
        return make_snapshot(Path(args.make_snapshot).resolve())
    if args.report:
        results = json.loads(Path(args.report).read_text())
        results["report_command"] = "python bench/gpu_bench.py " + " ".join(
            Path(a).name if a.endswith(".json") else a for a in (argv if argv is not None else sys.argv[1:]))
        for f in args.ppo_runs or []:  # bench/gpu_ppo_variants.py outputs, one per variant
            r = json.loads(Path(f).read_text())
            results.setdefault("ppo_runs", {})[f"variant {r['variant']}"] = r
        if args.qlora_from:  # an earlier run's QLoRA 7B measurement, labelled with its date and code
            old = json.loads(Path(args.qlora_from).read_text())
            results["qlora_7b"] = {**old["qlora_7b"], "from_earlier_run": f"{old['date']}, {old['machine'].get('snapshot')}"}
        write_report(results, Path(args.out).resolve())
        return 0
    return run(args)


if __name__ == "__main__":
    sys.exit(main())

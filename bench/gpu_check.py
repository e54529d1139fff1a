#!/usr/bin/env python
"""Checks of the CUDA-only paths, for a machine with an NVIDIA GPU (CI has none, so these are not tests):

    python bench/gpu_check.py --model-dir models/base --out /tmp/gpu-check

  qlora-sft     the base loads in 4-bit NF4 (bitsandbytes), LoRA trains on it (loss falls), peak GPU memory
                against plain LoRA on the fp32 base; the saved output is a plain fp32 folder (no quantisation
                config) whose logits equal the full-precision base + the trained adapter
  qlora-reward  the same for the reward stage's scalar-head model (Bradley-Terry on demo preference pairs)
  bf16-sft      LoRA SFT with `precision: bf16` (the Trainer's autocast): loss falls
  ppo-cuda      our PPO trainer with the policy, value model and reward on the GPU, LoRA and QLoRA policies

It uses only torch/transformers/peft/bitsandbytes and tasks/ (no Prefect, MLflow or DVC), so it runs on a bare
GPU image. Results: one line per check, and <out>/gpu_check.json; exit status 1 if any check failed.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from refinery.config import LoraArgs, MethodParams, PPOParams, QLoraArgs, TrainingArgs  # noqa: E402
from refinery.data.chat import chat_ids, render_example  # noqa: E402
from refinery.data.packing import PadCollator  # noqa: E402
from refinery.data.records import read_jsonl  # noqa: E402
from refinery.modeling.loading import load_causal_lm, load_tokenizer, save_output  # noqa: E402
from refinery.modeling.methods import apply_method, get_method  # noqa: E402
from refinery.train.reward_model import BradleyTerryTrainer, PairCollator, init_reward_model, pair_rows, score  # noqa: E402
from refinery.train.trainer import run_trainer  # noqa: E402

LORA = dict(r=16, alpha=32, dropout=0.0)


def sft_rows(tok, n: int = 8) -> list[dict]:
    recs = [r for _, r in read_jsonl(ROOT / "data/demo/sft/summarize.jsonl")][:n]
    rows = []
    for r in recs:
        ids, labels = render_example(tok, r["prompt"], r["response"])
        rows.append({"input_ids": ids[:256], "labels": labels[:256]})
    return rows


def targs(steps: int, batch: int, precision: str = "fp32", lr: float = 2e-3) -> TrainingArgs:
    # one fixed batch repeated (batch == rows): the loss must fall if the trainable weights learn at all
    return TrainingArgs(max_steps=steps, batch_size=batch, lr=lr, warmup_ratio=0.0, scheduler="constant",
                        save_steps=steps, keep_checkpoints=1, precision=precision)


def gpu_peak_reset() -> None:
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()


def train_sft(model_dir: Path, method: MethodParams, work: Path, precision: str = "fp32"):
    tok = load_tokenizer(model_dir)
    rows = sft_rows(tok)
    gpu_peak_reset()
    model = load_causal_lm(model_dir, method=method)
    if method.method != "qlora":
        model = model.cuda()
    model = apply_method(model, method, "CAUSAL_LM", seed=0)
    summary, _ = run_trainer(model, rows, PadCollator(tok.pad_token_id), targs(12, len(rows), precision), work / "ckpt",
                             0, count_tokens="non_padding")
    losses = [h["loss"] for h in summary.history]
    return model, tok, rows, losses, torch.cuda.max_memory_allocated() / 2**20, summary


def logits_of(model, ids: list[int]) -> torch.Tensor:
    dev = next(model.parameters()).device
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids], device=dev)).logits.float().cpu()


def check_qlora_sft(model_dir: Path, work: Path) -> dict:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    qlora = MethodParams(method="qlora", qlora=QLoraArgs(**LORA))
    get_method(qlora, "gpu_check")  # CUDA + bitsandbytes present
    model, tok, rows, q_losses, q_peak, q_sum = train_sft(model_dir, qlora, work / "q")
    n4bit = sum(1 for m in model.modules() if type(m).__name__ == "Linear4bit")
    _, _, _, l_losses, l_peak, l_sum = train_sft(model_dir, MethodParams(method="lora", lora=LoraArgs(**LORA)), work / "l")
    out = work / "out"
    save_output(model, tok, "qlora", out, model_dir)
    cfg = json.loads((out / "config.json").read_text())
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)  # plain transformers, no peft
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    base_logits = logits_of(base, rows[0]["input_ids"])
    ref = PeftModel.from_pretrained(base, out / "adapter").eval()
    ids = rows[0]["input_ids"]
    diff_ref = (logits_of(merged, ids) - logits_of(ref, ids)).abs().max().item()
    moved = (logits_of(merged, ids) - base_logits).abs().max().item()
    ok = (q_losses[-1] < q_losses[0] and n4bit > 0 and "quantization_config" not in cfg and diff_ref < 1e-3
          and moved > 1e-3 and all(p.dtype == torch.float32 for p in merged.parameters()))
    return {"ok": ok, "linear4bit_modules": n4bit, "qlora_loss_first_last": [q_losses[0], q_losses[-1]],
            "lora_fp32_loss_first_last": [l_losses[0], l_losses[-1]],
            "qlora_peak_gpu_mb": round(q_peak, 1), "lora_fp32_peak_gpu_mb": round(l_peak, 1),
            "qlora_tokens_per_second": round(q_sum.tokens_per_second, 1),
            "lora_fp32_tokens_per_second": round(l_sum.tokens_per_second, 1),
            "saved_config_has_quantization": "quantization_config" in cfg,
            "merged_vs_base_plus_adapter_max_abs_logit_diff": diff_ref, "merged_vs_base_max_abs_logit_diff": moved}


def check_qlora_reward(model_dir: Path, work: Path) -> dict:
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    qlora = MethodParams(method="qlora", qlora=QLoraArgs(**LORA))
    tok = load_tokenizer(model_dir)
    recs = [r for _, r in read_jsonl(ROOT / "data/demo/preferences.jsonl")][:8]
    rows = pair_rows(tok, recs, 256)
    model = apply_method(init_reward_model(model_dir, tok.pad_token_id, 0, method=qlora), qlora, "SEQ_CLS", seed=0)
    summary, _ = run_trainer(model, rows, PairCollator(tok.pad_token_id), targs(12, len(rows)), work / "ckpt", 0,
                             trainer_cls=BradleyTerryTrainer, count_tokens="non_padding", margin=0.0)
    losses = [h["loss"] for h in summary.history]
    out = work / "out"
    save_output(model, tok, "qlora", out, model_dir)
    merged = AutoModelForSequenceClassification.from_pretrained(out, dtype=torch.float32).eval()
    base = init_reward_model(model_dir, tok.pad_token_id, 0)
    ref = PeftModel.from_pretrained(base, out / "adapter").eval()
    seqs = [r["chosen"] for r in rows[:4]]
    a, b = score(merged, seqs, tok.pad_token_id), score(ref, seqs, tok.pad_token_id)
    diff = max(abs(x - y) for x, y in zip(a, b))
    return {"ok": losses[-1] < losses[0] and diff < 1e-3, "loss_first_last": [losses[0], losses[-1]],
            "merged_vs_base_plus_adapter_max_abs_score_diff": diff,
            "pairs_per_second": round(len(rows) * 12 / summary.seconds, 2)}


def check_bf16_sft(model_dir: Path, work: Path) -> dict:
    _, _, _, losses, peak, summary = train_sft(model_dir, MethodParams(method="lora", lora=LoraArgs(**LORA)), work,
                                               precision="bf16")
    return {"ok": losses[-1] < losses[0], "loss_first_last": [losses[0], losses[-1]], "peak_gpu_mb": round(peak, 1),
            "tokens_per_second": round(summary.tokens_per_second, 1)}


def check_ppo_cuda(model_dir: Path, work: Path) -> dict:
    from refinery.rlhf.ppo_trainer import PPOTrainer

    tok = load_tokenizer(model_dir)
    prompts = [chat_ids(tok, [{"role": "user", "content": f"Tell me about topic {i}."}], add_generation_prompt=True)
               for i in range(16)]
    res = {"ok": True}
    for name in ("lora", "qlora"):
        method = MethodParams(method=name, **{name: (QLoraArgs if name == "qlora" else LoraArgs)(**LORA)})
        torch.manual_seed(0)
        policy = load_causal_lm(model_dir, method=method)
        value = init_reward_model(model_dir, tok.pad_token_id, 0, method=method)
        if name == "lora":
            policy, value = policy.cuda(), value.cuda()
        policy = apply_method(policy, method, "CAUSAL_LM", seed=0)
        value = apply_method(value, method, "SEQ_CLS", seed=0)
        emb = policy.get_input_embeddings().weight.detach().float()
        table = emb @ torch.randn(emb.shape[1], generator=torch.Generator().manual_seed(7)).to(emb.device)
        table = (table - table.mean()) / table.std()

        def reward_fn(idx, rollout, table=table):  # dense, learnable rule reward (as tests/test_ppo.py), on the GPU
            return (table[rollout.responses] * rollout.response_mask).sum(-1) / rollout.response_mask.sum(-1)

        cfg = PPOParams(steps=4, batch_size=8, mini_batch_size=4, ppo_epochs=2, lr=5e-3, value_lr=5e-3,
                        max_new_tokens=16, temperature=0.7, normalize_scores=False, reward_clip=None,
                        missing_eos_penalty=None, save_steps=2, keep_checkpoints=1)
        gpu_peak_reset()
        state = PPOTrainer(cfg, policy, value, reward_fn, prompts, tok, work / name, seed=0).train()
        h = state.history
        finite = all(torch.isfinite(torch.tensor([x["policy_loss"], x["value_loss"], x["kl"]])).all() for x in h)
        res[name] = {"steps": len(h), "reward_first_last": [h[0]["reward_mean"], h[-1]["reward_mean"]],
                     "episodes_per_second": h[-1]["episodes_per_second"], "finite": bool(finite),
                     "peak_gpu_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1)}
        res["ok"] = res["ok"] and finite and len(h) == cfg.steps
    return res


CHECKS = {"qlora-sft": check_qlora_sft, "qlora-reward": check_qlora_reward, "bf16-sft": check_bf16_sft,
          "ppo-cuda": check_ppo_cuda}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model-dir", default=str(ROOT / "models" / "base"))
    ap.add_argument("--out", default=None, help="folder for gpu_check.json (default: a temp folder)")
    ap.add_argument("--checks", default=",".join(CHECKS))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU visible; these checks need one", file=sys.stderr)
        return 2
    out = Path(args.out or tempfile.mkdtemp(prefix="gpu-check-"))
    out.mkdir(parents=True, exist_ok=True)
    results = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "checks": {}}
    try:
        import bitsandbytes

        results["bitsandbytes"] = bitsandbytes.__version__
    except ImportError:
        results["bitsandbytes"] = None
    failed = 0
    for name in args.checks.split(","):
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            try:
                r = CHECKS[name](Path(args.model_dir), Path(tmp))
            except Exception as exc:  # noqa: BLE001 - reported, the next check runs
                traceback.print_exc()
                r = {"ok": False, "error": f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300]}"}
        r["seconds"] = round(time.perf_counter() - t0, 1)
        failed += not r["ok"]
        results["checks"][name] = r
        print(f"gpu_check: {name}: {'ok' if r['ok'] else 'FAILED'} {json.dumps(r, default=str)}", flush=True)
    (out / "gpu_check.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

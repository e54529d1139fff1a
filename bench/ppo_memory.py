"""PPO's weight memory against model size: the formula the README states, checked by counting the tensors of
the models the ppo stage holds, at several Llama-architecture sizes (random weights built from a config: only
the shapes matter for bytes).

    python bench/ppo_memory.py            # writes bench/RESULTS-ppo-memory.md

What ppo holds for `method: lora` (flows/ppo.py): the policy (SFT weights + LoRA) and the value model
(reward-model weights + LoRA + a trained copy of its score head). The reference is the policy with its adapter
off, the reward model the value model with its adapter off (refinery/rlhf/policy_eval.ppo_judge). Under
`precision: bf16` (what `auto` picks on a GPU with bf16 and on AVX512-BF16 CPUs) their frozen linear weights
are held in bf16 (refinery/modeling/precision.store_frozen_linears); embeddings, norms and everything trained
stay fp32. Before both changes ppo held policy, value and reward model in fp32. With N_lin the frozen linear
parameters of one model (its tied LM head excluded: that is the embedding), N_other the rest of its
parameters, T the LoRA (+ head) parameters trained in policy and value together:

    before (3 models, fp32):       3 x 4 (N_lin + N_other) + 4 T      bytes
    now (2 models, bf16 frozen):   2 x (2 N_lin + 4 N_other) + 4 T    bytes
    training adds 12 T (gradient + AdamW's two moments) to both.

Activations come on top: per mini-batch ~ mini_batch_size x (prompt + response tokens) x hidden x layers for
policy and value (only each layer's input with `gradient_checkpointing: true`), the response logits
mini_batch_size x response x vocab, and generation's KV cache batch x tokens x layers x 2 x kv_heads x head_dim.
"""
from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification  # noqa: E402

from refinery.modeling.precision import store_frozen_linears  # noqa: E402
from refinery.rlhf.policy_eval import AdapterOffJudge  # noqa: E402

# name -> LlamaConfig fields (SmolLM2's published configs; `tiny` is the tests' model)
SIZES = {
    "tiny (tests)": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2),
    "SmolLM2-135M (the demo)": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                    num_attention_heads=9, num_key_value_heads=3),
    "SmolLM2-360M": dict(hidden_size=960, intermediate_size=2560, num_hidden_layers=32, num_attention_heads=15,
                         num_key_value_heads=5),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]  # params/ppo.yaml's lora


def tensor_bytes(*models) -> int:
    """Bytes of every parameter and buffer, each storage counted once (tied weights share one)."""
    seen, total = set(), 0
    for m in models:
        for t in [*m.parameters(), *m.buffers()]:
            key = t.untyped_storage().data_ptr()
            if key not in seen:
                seen.add(key)
                total += t.untyped_storage().nbytes()
    return total


def split_counts(model) -> tuple[int, int, int]:
    """(N_lin, N_other, T) of one model as the formula defines them."""
    params = {id(p): p for p in model.parameters()}
    shared = {id(p) for m in model.modules() if type(m) is not torch.nn.Linear for p in m.parameters(recurse=False)}
    lin = {id(p) for m in model.modules() if type(m) is torch.nn.Linear for p in m.parameters(recurse=False)
           if not p.requires_grad and id(p) not in shared}
    trained = {i for i, p in params.items() if p.requires_grad}
    n = lambda ids: sum(params[i].numel() for i in ids)  # noqa: E731
    return n(lin), n(set(params) - lin - trained), n(trained)


def build(fields: dict) -> list:
    cfg = LlamaConfig(vocab_size=49152, tie_word_embeddings=True, pad_token_id=2, num_labels=1, **fields)
    lora = dict(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS)
    policy = get_peft_model(LlamaForCausalLM(cfg), LoraConfig(task_type="CAUSAL_LM", **lora))
    value = get_peft_model(LlamaForSequenceClassification(cfg), LoraConfig(task_type="SEQ_CLS", **lora))
    judge = LlamaForSequenceClassification(cfg).requires_grad_(False)  # what ppo loaded before sharing
    return [policy, value, judge]


def measure(name: str, fields: dict) -> dict:
    policy, value, judge = build(fields)
    n_lin, n_other, _ = split_counts(judge)  # one model, all frozen
    t = split_counts(policy)[2] + split_counts(value)[2]
    before = tensor_bytes(policy, value, judge)
    for m in (policy, value):
        store_frozen_linears(m, "bf16")
    after = tensor_bytes(policy, AdapterOffJudge(value))  # value and reward model: one set of weights
    return {"name": name, "params": n_lin + n_other, "n_lin": n_lin, "n_other": n_other, "t": t,
            "before": before, "before_formula": 3 * 4 * (n_lin + n_other) + 4 * t,
            "now": after, "now_formula": 2 * (2 * n_lin + 4 * n_other) + 4 * t}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(ROOT / "bench" / "RESULTS-ppo-memory.md"))
    args = ap.parse_args()
    torch.manual_seed(0)
    rows = [measure(n, f) for n, f in SIZES.items()]
    gb = lambda b: f"{b / 1e9:.3f}"  # noqa: E731
    lines = ["# PPO weight memory against model size", "",
             f"Produced by `python bench/ppo_memory.py` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} "
             f"(torch {torch.__version__}, Python {platform.python_version()}). Random weights built from each "
             "config (bytes depend on shapes only). The formula and what it counts: this script's docstring and "
             "README \"PPO memory\".", "",
             "`method: lora` (r=16 on all seven projections); counted = bytes of every parameter and buffer the "
             "models hold, each storage once. Before: policy, value and reward model in fp32; now: policy and value "
             "model with bf16 frozen linears, the reward model being the value model with its adapter off.", "",
             "| model | parameters | N_lin | N_other | T (trained) | before: counted GB | before: formula GB | "
             "now: counted GB | now: formula GB | now / before |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['params']:,} | {r['n_lin']:,} | {r['n_other']:,} | {r['t']:,} | "
                     f"{gb(r['before'])} | {gb(r['before_formula'])} | {gb(r['now'])} | {gb(r['now_formula'])} | "
                     f"{r['now'] / r['before']:.2f} |")
    worst = max(abs(r[k] - r[k + "_formula"]) / r[k + "_formula"] for r in rows for k in ("before", "now"))
    lines += ["", f"Largest gap between counted and formula: {worst:.2%} (buffers such as the rotary frequencies "
              "are counted, not in the formula).", "",
              "What this leaves out: activations (docstring), the ~0.5 GB of the Python process itself, and "
              "on a CPU the pages of a safetensors file mapped into memory, which `ru_maxrss` counts as long as "
              "any tensor of the file is in use (store_frozen_linears copies the remaining fp32 tensors out so "
              "the mapping can go)."]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

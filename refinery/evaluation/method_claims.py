"""What the project's seed articles claim for each adaptation method, and whether a method comparison agrees.

Their summary table (parameters updated; compute and memory cost, three levels):
    full fine-tuning   all            high   high
    adapter tuning     ~1-5%          medium medium
    LoRA (and QLoRA)   ~0.1-1%        low    low
    prefix/prompt      ~0.01-1%       low    low      (prefix, prompt, P-tuning, P-tuning v2 here)
IA3 is not in it. A run's compute and memory are put on the same three levels relative to full fine-tuning
in the same comparison (seconds per step and peak memory): < 0.5x full is low, < 0.8x medium, else high.
Each disagreement comes with the reason this run differs (the seeds speak of billion-parameter models).
"""
from __future__ import annotations

CLAIMS: dict[str, dict] = {
    "full": {"params": (100.0, 100.0), "compute": "high", "memory": "high"},
    "adapter": {"params": (1.0, 5.0), "compute": "medium", "memory": "medium"},
    "lora": {"params": (0.1, 1.0), "compute": "low", "memory": "low"},
    "qlora": {"params": (0.1, 1.0), "compute": "low", "memory": "low"},
    "prefix": {"params": (0.01, 1.0), "compute": "low", "memory": "low"},
    "prompt": {"params": (0.01, 1.0), "compute": "low", "memory": "low"},
    "ptuning": {"params": (0.01, 1.0), "compute": "low", "memory": "low"},
    "ptuning_v2": {"params": (0.01, 1.0), "compute": "low", "memory": "low"},
}

# why a small model on a CPU can disagree with a claim made for large models
REASONS = {
    "params_high": ("the share falls with model width: a rank-r update of a d x d matrix trains 2r/d of it, and "
                    "d is 576 here (r=16 on all seven projections of a 135M model is 3.5%)"),
    "params_low": "the method's size is set by its own knobs (virtual tokens, bottleneck), not by the model",
    "compute": ("a parameter-efficient step still runs the whole forward and backward pass through the frozen "
                "model; it saves the weight gradients and optimizer update, a smaller share at 135M than at 7B"),
    "memory": ("at 135M the activations and the frozen weights dominate peak memory; full fine-tuning's extra "
               "gradients and Adam state are ~1.6 GB here, a much larger share of a 7B model's budget"),
}


def level(ratio: float) -> str:
    """low / medium / high cost, relative to full fine-tuning in the same comparison."""
    return "low" if ratio < 0.5 else "medium" if ratio < 0.8 else "high"


def _fmt_range(lo: float, hi: float) -> str:
    return "all" if lo == hi == 100.0 else f"~{lo:g}-{hi:g}%"


def judge(method: str, row: dict, full: dict | None) -> dict:
    """claims vs this run for one method's comparison row (trainable_percent, seconds_per_step,
    peak_memory_mb); `full` is full fine-tuning's row in the same comparison (None: compute and memory
    cannot be placed on the scale)."""
    claim = CLAIMS.get(method)
    if claim is None:
        return {"claim": "not in the seeds' table", "agrees": "", "why": ""}
    out, why = [], []
    lo, hi = claim["params"]
    pct = float(row["trainable_percent"])
    ok_params = lo / 2 <= pct <= hi * 2 if method != "full" else pct > 99
    out.append(f"params {_fmt_range(lo, hi)} vs {pct:.3g}%: {'yes' if ok_params else 'no'}")
    if not ok_params:
        why.append(REASONS["params_high" if pct > hi else "params_low"])
    agrees = [ok_params]
    if full and method != "full":
        for key, col in (("compute", "seconds_per_step"), ("memory", "peak_memory_mb")):
            ratio = float(row[col]) / float(full[col])
            got = level(ratio)
            ok = got == claim[key]
            agrees.append(ok)
            out.append(f"{key} {claim[key]} vs {got} ({ratio:.2f}x full): {'yes' if ok else 'no'}")
            if not ok:
                why.append(REASONS[key])
    return {"claim": "; ".join(out), "agrees": f"{sum(agrees)}/{len(agrees)}", "why": " ".join(dict.fromkeys(why))}

"""Pieces every training stage (dapt, sft, reward) shares: loading the start, the `train` metrics block, the atomic save."""
from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from refinery.atomic import atomic_dir
from refinery.config import load_params
from refinery.modeling.manifest import build_manifest, tokenizer_fingerprint, write_manifest
from refinery.modeling.methods import get_method
from refinery.modeling.loading import load_causal_lm, load_tokenizer, save_output
from refinery.train.trainer import TrainSummary


def load_start(stage: str, params_dir: str, input_dir: str, overrides: dict | None):
    """(base params, stage params, method, model, tokenizer) of a causal-LM stage, validated before training;
    the model in 4-bit when the method is qlora."""
    base = load_params("base", params_dir)
    cfg = load_params(stage, params_dir, overrides)
    method = get_method(cfg, f"{params_dir}/{stage}.yaml")
    model = load_causal_lm(input_dir, base.trust_remote_code, method=cfg)
    return base, cfg, method, model, load_tokenizer(input_dir, base.trust_remote_code)


def train_block(method: str, summary: TrainSummary, trainable: int, total: int, **extra) -> dict:
    """The `train` block of metrics/<stage>.json (names fixed by the metrics contract in DESIGN.md)."""
    return {
        "method": method,
        "steps": summary.steps,
        "tokens_per_second": round(summary.tokens_per_second, 2),
        "peak_memory_mb": round(summary.peak_memory_mb, 1),
        "trainable_params": trainable,
        "trainable_percent": round(100.0 * trainable / max(total, 1), 4),
        "seconds": round(summary.seconds, 2),
        "seconds_per_step": round(summary.seconds / max(summary.steps - (summary.resumed_from or 0), 1), 3),
        "tokens": summary.tokens,
        "resumed_from_step": summary.resumed_from,
        "final_loss": summary.history[-1]["loss"] if summary.history else None,
        **extra,
    }


@task(cache_policy=NO_CACHE)
def save_stage_output(stage: str, model, tokenizer, method: str, out_dir: str, input_dir: str, params: dict,
                      inputs: dict[str, str], seed: int) -> dict:
    """Model + tokenizer + manifest into a temp folder, renamed over `out_dir` only once complete."""
    with atomic_dir(out_dir) as tmp:
        save_output(model, tokenizer, method, tmp, input_dir)
        manifest = build_manifest(stage, tmp, params=params, inputs={k: Path(v) for k, v in inputs.items()},
                                  tokenizer_hash=tokenizer_fingerprint(tokenizer), seed=seed)
        manifest["method"] = method
        write_manifest(tmp, manifest)
    return manifest

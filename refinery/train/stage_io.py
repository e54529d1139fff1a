"""What every training stage (dapt, sft, reward, ppo) shares: its typed inputs, loading the start, the
`train` metrics block, the atomic save."""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from refinery.atomic import atomic_dir
from refinery.config import load_params
from refinery.errors import UserError
from refinery.modeling.loading import load_causal_lm, load_tokenizer, save_output
from refinery.modeling.manifest import build_manifest, hash_path, tokenizer_fingerprint, write_manifest
from refinery.modeling.methods import check_stage_method
from refinery.ops.prefect_tasks import uncached_task
from refinery.ops.stage_cli import checkpoint_dir
from refinery.train.trainer import TrainSummary


@dataclass(frozen=True, kw_only=True)
class StageInputs:
    """What a stage runs on, built and validated before anything trains (every rank of a multi-process run
    builds the same). Each stage subclasses it with its own data fields."""

    stage: str
    base: Any                   # refinery.config.BaseParams
    cfg: Any                    # the stage's params model
    tokenizer: Any
    inputs: dict[str, str]      # name -> path of everything read (hashed into the manifest and checkpoint key)
    model: Any = None           # the loaded start (before the method is applied)
    general: list[dict] = field(default_factory=list)  # general-domain rows for retention (refinery/evaluation/forgetting.py)
    params: dict = field(init=False)
    input_hashes: dict[str, str] = field(init=False)

    def __post_init__(self):
        object.__setattr__(self, "params", {"base": self.base.model_dump(), self.stage: self.cfg.model_dump()})
        object.__setattr__(self, "input_hashes", {k: hash_path(v) for k, v in self.inputs.items()})

    @property
    def checkpoint(self) -> Path:
        return checkpoint_dir(self.stage, self.params, self.input_hashes)

    def lineage_tags(self, data: str) -> dict[str, str]:
        """MLflow tags tying the run to its data and input model (12-char hashes)."""
        tags = {"data_hash": self.input_hashes[data][:12]}
        if "model" in self.input_hashes:
            tags["input_model_hash"] = self.input_hashes["model"][:12]
        return tags


def load_start(stage: str, params_dir: str, input_dir: str, overrides: dict | None):
    """(base params, stage params, method, model, tokenizer) of a causal-LM stage, validated before training;
    the model in 4-bit when the method is qlora."""
    base = load_params("base", params_dir)
    cfg = load_params(stage, params_dir, overrides)
    method = check_stage_method(cfg, stage, f"{params_dir}/{stage}.yaml")  # for this machine and this stage
    if method.virtual_tokens and cfg.training.eval_steps > 0:
        # HF Trainer's evaluation and best-checkpoint reload do not handle virtual tokens (labels one prompt
        # shorter than the logits; peft refuses load_best_model_at_end for prompt learning): such a run trains
        # unmonitored, says so, and records eval_steps 0 in its params, so `dvc exp run -S method=prompt` works
        print(f"warning: {stage}: validation monitoring is off for method {cfg.method} (virtual tokens); "
              f"training.eval_steps {cfg.training.eval_steps} -> 0", file=sys.stderr)
        cfg.training.eval_steps = 0
        cfg.training.early_stopping_patience = 0
    if getattr(cfg, "padding_free", False) and not method.packing:
        raise UserError(f"{params_dir}/{stage}.yaml: padding_free: method {cfg.method} trains on padded examples "
                        "(virtual tokens change the sequence), not packed rows; set it false")
    model = load_causal_lm(input_dir, base.trust_remote_code, method=cfg, attn_implementation=base.attn_implementation)
    return base, cfg, method, model, load_tokenizer(input_dir, base.trust_remote_code)


def train_block(method: str, summary: TrainSummary, trainable: int, total: int, **extra) -> dict:
    """The `train` block of a stage's metrics (names fixed by refinery/ops/metrics_contract.py)."""
    return {
        "method": method,
        "steps": summary.steps,
        "tokens_per_second": round(summary.tokens_per_second, 2),
        "peak_memory_mb": round(summary.peak_memory_mb, 1),
        "trainable_params": trainable,
        "trainable_percent": round(100.0 * trainable / max(total, 1), 4),
        "seconds": round(summary.seconds, 2),
        "seconds_per_step": round(summary.seconds / max(summary.steps - (summary.resumed_from or 0), 1), 3),
        "tokens": summary.tokens,  # the whole run's; after a resume the tokens/s is this process's share only
        "tokens_this_process": summary.tokens_this_process,
        "resumed_from_step": summary.resumed_from,
        "final_loss": summary.history[-1]["loss"] if summary.history else None,
        **extra,
    }


@uncached_task
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

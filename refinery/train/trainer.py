"""The training loop shared by the supervised stages: transformers' Trainer, driven by our params.

Trainer gives us gradient accumulation, schedulers, DDP/FSDP/DeepSpeed under torchrun/accelerate,
and resumable checkpoints (optimizer, scheduler, RNG, data position). We add: checkpoints keyed by
the stage's inputs (outside DVC outs, which DVC deletes before a run), resume from the last *complete*
checkpoint, and per-step metrics (loss, lr, grad norm, tokens/s) into the stage's StageRecord.
"""
from __future__ import annotations

import math
import re
import resource
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import EarlyStoppingCallback, Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_callback import ProgressCallback

from refinery.config import TrainingArgs
from refinery.modeling.precision import store_frozen_linears

CKPT = re.compile(r"^checkpoint-(\d+)$")


def last_complete_checkpoint(folder: Path) -> Path | None:
    """Trainer writes trainer_state.json last: a checkpoint without it was cut off mid-save and is removed."""
    if not folder.is_dir():
        return None
    found = sorted((int(m.group(1)), p) for p in folder.iterdir() if (m := CKPT.match(p.name)))
    for _, path in reversed(found):
        if (path / "trainer_state.json").is_file():
            return path
        shutil.rmtree(path, ignore_errors=True)
    return None


def checkpoint_state(checkpoint: Path) -> dict:
    """The trainer_state.json of a checkpoint (step reached, tokens seen, log history)."""
    import json

    return json.loads((checkpoint / "trainer_state.json").read_text())


def peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB -> MiB, whole process


class RecordCallback(TrainerCallback):
    """Per-step metrics to MLflow (via StageRecord) and to an optional progress reporter."""

    def __init__(self, record, progress=None):
        self.record, self.progress = record, progress
        self._t = self._tokens = None
        self.rates: dict[int, float] = {}

    def on_evaluate(self, args, state, control, metrics=None, **kw):
        if self.record is not None and metrics and "eval_loss" in metrics:
            self.record.log_step(state.global_step, {"validation_loss": metrics["eval_loss"]})

    def on_train_begin(self, args, state, control, **kw):
        self._t, self._tokens = time.perf_counter(), state.num_input_tokens_seen

    def on_log(self, args, state, control, logs=None, **kw):
        if not logs or "loss" not in logs:
            return
        now, tokens = time.perf_counter(), state.num_input_tokens_seen
        row = {"loss": logs["loss"], "lr": logs.get("learning_rate"), "grad_norm": logs.get("grad_norm"),
               "tokens_per_second": (tokens - self._tokens) / max(now - self._t, 1e-9)}
        self._t, self._tokens = now, tokens
        self.rates[state.global_step] = row["tokens_per_second"]
        if self.record is not None:
            self.record.log_step(state.global_step, {k: v for k, v in row.items() if v is not None})

    def on_step_end(self, args, state, control, **kw):
        if self.progress is not None:
            self.progress(state.global_step, state.max_steps)


class QuietProgress(ProgressCallback):
    """The progress bar, with loss and lr on it instead of a printed dict per step."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.training_bar is not None and logs and "loss" in logs:
            self.training_bar.set_postfix(loss=f"{logs['loss']:.4f}", lr=f"{logs.get('learning_rate', 0):.2e}")


@dataclass
class TrainSummary:
    steps: int
    seconds: float
    tokens: int                      # the whole run's (a resumed run's count continues from its checkpoint)
    tokens_per_second: float         # this process's tokens over this process's seconds
    peak_memory_mb: float
    resumed_from: int | None
    history: list[dict] = field(default_factory=list)
    validation: list[dict] = field(default_factory=list)  # [{"step", "validation_loss"}] when monitored
    tokens_this_process: int = 0     # tokens trained by this process (less than `tokens` after a resume)
    best_step: int | None = None      # the step whose weights the stage keeps (validation monitored)
    stopped_early: bool = False

    def selection(self, targs: TrainingArgs) -> dict:
        """The `early_stopping` block of metrics/<stage>.json: the step chosen and why."""
        if not self.validation:
            return {"monitored": False, "why": "validation monitoring off (training.eval_steps = 0): the last step is kept"}
        best = min(self.validation, key=lambda v: v["validation_loss"])
        why = (f"lowest validation loss {best['validation_loss']:.4f} at step {best['step']} of "
               f"{len(self.validation)} evaluations every {targs.eval_steps} steps")
        if self.stopped_early:
            why += f"; stopped at step {self.steps} after {targs.early_stopping_patience} without improvement"
        return {"monitored": True, "best_step": self.best_step, "best_validation_loss": best["validation_loss"],
                "stopped_early": self.stopped_early, "evaluations": len(self.validation), "why": why}


def training_arguments(targs: TrainingArgs, ckpt_dir: Path, seed: int, count_tokens: str = "all",
                       args_cls: type[TrainingArguments] = TrainingArguments, **extra) -> TrainingArguments:
    """count_tokens: "all" for packed rows (no padding to skip), "non_padding" for padded batches. `args_cls`: a
    TrainingArguments subclass (TRL's DPOConfig) that takes its own fields through `extra`."""
    kwargs = dict(
        output_dir=str(ckpt_dir), max_steps=targs.max_steps,
        per_device_train_batch_size=targs.batch_size, gradient_accumulation_steps=targs.grad_accum,
        learning_rate=targs.lr, weight_decay=targs.weight_decay, warmup_steps=targs.warmup_ratio,
        lr_scheduler_type=targs.scheduler, max_grad_norm=targs.max_grad_norm,
        logging_steps=1, save_strategy="steps", save_steps=targs.save_steps,
        save_total_limit=targs.keep_checkpoints, seed=seed, data_seed=seed, report_to="none",
        bf16=targs.precision == "bf16", fp16=targs.precision == "fp16", use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0, remove_unused_columns=False, include_num_input_tokens_seen=count_tokens,
        activation_checkpointing=targs.gradient_checkpointing, disable_tqdm=False,
        activation_checkpointing_kwargs={"every_n_layers": targs.checkpoint_every_n_layers},
        torch_compile=targs.torch_compile, use_liger_kernel=targs.use_liger_kernel,
    )
    return args_cls(**{**kwargs, **extra})


def monitoring_arguments(targs: TrainingArgs) -> dict:
    """TrainingArguments for validation-loss monitoring: evaluate every `eval_steps`, save on the same
    steps (Trainer keeps the best checkpoint only among saved ones) and load the best at the end."""
    if targs.eval_steps == 0:
        return {}
    return {"eval_strategy": "steps", "eval_steps": targs.eval_steps, "save_steps": targs.eval_steps,
            "load_best_model_at_end": True, "metric_for_best_model": "eval_loss", "greater_is_better": False,
            "per_device_eval_batch_size": targs.batch_size, "prediction_loss_only": True}


def global_batch(targs: TrainingArgs) -> int:
    """Rows per optimiser step over all processes."""
    from refinery.ops.distributed import world_size

    return targs.batch_size * targs.grad_accum * max(targs.nproc_per_node, world_size())


def derive_max_steps(stage: str, targs: TrainingArgs, examples: int, examples_per_step: float) -> None:
    """`num_epochs` -> `max_steps` = ceil(num_epochs x examples / examples per step), written into `targs` (so
    the checkpoint key, MLflow params and schedule all see the steps that run); nothing when it is unset."""
    if targs.num_epochs is None:
        return
    targs.max_steps = max(1, math.ceil(targs.num_epochs * examples / examples_per_step))
    print(f"{stage}: num_epochs {targs.num_epochs:g} over {examples} training examples "
          f"({examples_per_step:g} per step) -> max_steps {targs.max_steps}")


def run_trainer(model, train_dataset, collator, targs: TrainingArgs, ckpt_dir: Path, seed: int,
                record=None, progress=None, trainer_cls=Trainer, count_tokens: str = "all",
                callbacks: list | None = None, resumable: bool = True, eval_dataset=None,
                args_cls: type[TrainingArguments] = TrainingArguments, args_extra: dict | None = None,
                **trainer_kwargs) -> tuple[TrainSummary, Trainer]:
    """Train to `targs.max_steps`, resuming from the last complete checkpoint in `ckpt_dir` if any. With
    `targs.eval_steps` and an `eval_dataset` (a fixed validation slice), the validation loss is monitored,
    training stops after `early_stopping_patience` evaluations without improvement, and the model returned
    holds the best checkpoint's weights (transformers' load_best_model_at_end + EarlyStoppingCallback)."""
    if not resumable and ckpt_dir.exists():
        print(f"warning: this method's checkpoints cannot be resumed; starting over (removing {ckpt_dir})")
        shutil.rmtree(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    resume = last_complete_checkpoint(ckpt_dir)
    if hasattr(model, "config"):
        model.config.use_cache = False  # a KV cache disables the packed-sequence mask, and training needs none
    if targs.precision in ("bf16", "fp16") and targs.accelerate_config is None:
        # frozen linear weights kept in the compute dtype: autocast casts them to it on every forward anyway, so
        # outputs and gradients are unchanged (tests/test_precision.py) and the per-step casts and their fp32
        # copies go (a demo LoRA SFT step 3.5 -> 3.2 s). Not under FSDP/DeepSpeed (accelerate_config): their
        # flattened parameters want one dtype. Saving merges into the fp32 input (loading.save_output)
        store_frozen_linears(model, targs.precision)
    callback = RecordCallback(record, progress)
    monitored = targs.eval_steps > 0 and eval_dataset is not None
    extra_callbacks = list(callbacks or [])
    if monitored and targs.early_stopping_patience > 0:
        extra_callbacks.append(EarlyStoppingCallback(early_stopping_patience=targs.early_stopping_patience))
    if targs.use_liger_kernel:  # a scalar-head model gets Liger's layer kernels here, not Trainer's patch
        from refinery.modeling.kernels import liger_for_trainer

        targs = targs.model_copy(update={"use_liger_kernel": liger_for_trainer(model, True)})
    args = training_arguments(targs, ckpt_dir, seed, count_tokens, args_cls,
                              **(monitoring_arguments(targs) if monitored else {}), **(args_extra or {}))
    trainer = trainer_cls(model=model, args=args, train_dataset=train_dataset,
                          eval_dataset=eval_dataset if monitored else None, data_collator=collator,
                          callbacks=[callback, *extra_callbacks], **trainer_kwargs)
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(QuietProgress())
    resumed = checkpoint_state(resume) if resume is not None else {}
    start_tokens = resumed.get("num_input_tokens_seen", 0)
    t0 = time.perf_counter()
    if resumed.get("global_step", 0) >= targs.max_steps:
        # killed after its last checkpoint: training is done, only the weights are needed (Trainer would run
        # one step past max_steps if asked to resume from the final checkpoint)
        from transformers.trainer_callback import TrainerState

        trainer._load_from_checkpoint(str(resume))
        trainer.state = TrainerState.load_from_json(str(resume / "trainer_state.json"))
    else:
        trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    seconds = time.perf_counter() - t0
    tokens = trainer.state.num_input_tokens_seen - start_tokens  # this process's share of the run
    history = [{"step": h["step"], "loss": h["loss"], "lr": h.get("learning_rate"), "grad_norm": h.get("grad_norm"),
                "tokens_per_second": callback.rates.get(h["step"])} for h in trainer.state.log_history if "loss" in h]
    validation = [{"step": h["step"], "validation_loss": h["eval_loss"]} for h in trainer.state.log_history
                  if "eval_loss" in h]
    best = trainer.state.best_model_checkpoint
    return TrainSummary(steps=trainer.state.global_step, seconds=seconds,
                        tokens=int(trainer.state.num_input_tokens_seen), tokens_this_process=int(tokens),
                        tokens_per_second=tokens / max(seconds, 1e-9), peak_memory_mb=peak_memory_mb(),
                        resumed_from=int(resume.name.split("-")[1]) if resume else None, history=history,
                        validation=validation, best_step=int(Path(best).name.split("-")[1]) if best else None,
                        stopped_early=monitored and trainer.state.global_step < targs.max_steps), trainer

"""Validation-loss monitoring and early stopping (refinery/train/trainer.py): the run stops at the right
step, the weights it ends with are the best checkpoint's, and the stage reports the step chosen and why."""
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, Trainer

from refinery.config import TrainingArgs
from refinery.data.corpus import corpus_rows
from refinery.data.packing import PadCollator
from refinery.modeling.loading import load_tokenizer
from refinery.train.trainer import run_trainer

# validation losses by step: best at 4, then two evaluations without improvement -> stop at step 8
SCRIPTED = {2: 1.0, 4: 0.5, 6: 0.7, 8: 0.8, 10: 0.9, 12: 1.0}


class ScriptedValidation(Trainer):
    """Real training; the validation loss read from SCRIPTED, so the stopping step is known in advance."""

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        return torch.tensor(SCRIPTED[self.state.global_step]), None, None


def run(tiny_base, prepared, ckpt, **overrides):
    tok = load_tokenizer(tiny_base)
    rows = corpus_rows(prepared / "corpus" / "train.jsonl", tok, 64, packed=True)[:40]
    args = TrainingArgs(**{"max_steps": 12, "batch_size": 2, "lr": 1e-2, "save_steps": 2, "keep_checkpoints": 2,
                           "warmup_ratio": 0.0, "eval_steps": 2, "early_stopping_patience": 2, **overrides})
    model = AutoModelForCausalLM.from_pretrained(tiny_base)
    summary, trainer = run_trainer(model, rows, PadCollator(tok.pad_token_id), args, ckpt, seed=1,
                                   trainer_cls=ScriptedValidation, eval_dataset=rows[:4])
    return summary, trainer, args


def test_stops_at_the_right_step_and_keeps_the_best_weights(tiny_base, prepared, tmp_path):
    summary, trainer, args = run(tiny_base, prepared, tmp_path / "ckpt")
    assert summary.steps == 8 and summary.stopped_early
    assert summary.best_step == 4
    assert [v["step"] for v in summary.validation] == [2, 4, 6, 8]
    best = load_file(str(tmp_path / "ckpt" / "checkpoint-4" / "model.safetensors"))
    last = load_file(str(tmp_path / "ckpt" / "checkpoint-8" / "model.safetensors"))
    state = trainer.model.state_dict()
    name = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(state[name], best[name])          # the model ends with step 4's weights
    assert not torch.equal(best[name], last[name])        # which training had since moved away from
    sel = summary.selection(args)
    assert sel["best_step"] == 4 and sel["best_validation_loss"] == 0.5 and sel["stopped_early"]
    assert "step 4" in sel["why"] and "stopped at step 8" in sel["why"]


def test_off_by_default_keeps_the_last_step(tiny_base, prepared, tmp_path):
    summary, _, args = run(tiny_base, prepared, tmp_path / "ckpt", eval_steps=0, max_steps=4)
    assert summary.steps == 4 and not summary.validation and summary.best_step is None
    assert summary.selection(args)["monitored"] is False

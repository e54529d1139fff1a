"""Kernel options (TrainingArgs `torch_compile`, `use_liger_kernel`), passed to transformers' Trainer: a compiled
model trains to the same losses as the eager one, and Liger's kernels are refused in one line where they cannot
run (no CUDA GPU, or liger-kernel not installed)."""
import pytest
import torch
from transformers import AutoModelForCausalLM

from refinery.config import TrainingArgs, load_params
from refinery.data.corpus import corpus_rows
from refinery.data.packing import PadCollator
from refinery.errors import UserError
from refinery.modeling.loading import load_tokenizer
from refinery.train.trainer import run_trainer


def test_compiled_training_matches_eager(tiny_base, prepared, tmp_path):
    """fp32 on both sides; inductor's fused kernels sum in another order, so the losses agree to float noise
    (~1e-6 here), far below the loss's step-to-step change (~0.1)."""
    tok = load_tokenizer(tiny_base)
    rows = corpus_rows(prepared / "corpus" / "train.jsonl", tok, 64, packed=True)[:16]
    curves = {}
    for compiled in (False, True):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(tiny_base)
        args = TrainingArgs(max_steps=4, batch_size=4, lr=3e-3, save_steps=4, warmup_ratio=0.0, precision="fp32",
                            torch_compile=compiled)
        summary, trainer = run_trainer(model, rows, PadCollator(tok.pad_token_id), args, tmp_path / str(compiled),
                                       seed=1)
        assert trainer.args.torch_compile == compiled
        curves[compiled] = [h["loss"] for h in summary.history]
    assert len(curves[True]) == 4
    assert curves[True] == pytest.approx(curves[False], abs=1e-3), curves
    assert curves[False][0] - curves[False][-1] > 0.05, curves  # it trained, by far more than the tolerance


def test_checkpointing_every_other_layer_trains_the_same(tiny_base, prepared, tmp_path):
    """TrainingArgs `checkpoint_every_n_layers` reaches transformers' Trainer: with 2, layer 0 of the tiny model's
    two recomputes and layer 1 keeps its activations; recomputation changes no loss (fp32)."""
    tok = load_tokenizer(tiny_base)
    rows = corpus_rows(prepared / "corpus" / "train.jsonl", tok, 64, packed=True)[:16]
    curves, flags = {}, {}
    for checkpointing, every_n in ((False, 1), (True, 1), (True, 2)):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(tiny_base)
        args = TrainingArgs(max_steps=3, batch_size=4, lr=3e-3, save_steps=3, warmup_ratio=0.0, precision="fp32",
                            gradient_checkpointing=checkpointing, checkpoint_every_n_layers=every_n)
        summary, trainer = run_trainer(model, rows, PadCollator(tok.pad_token_id), args,
                                       tmp_path / f"{checkpointing}{every_n}", seed=1)
        curves[checkpointing, every_n] = [h["loss"] for h in summary.history]
        flags[checkpointing, every_n] = [layer.gradient_checkpointing for layer in trainer.model.model.layers]
    assert flags == {(False, 1): [False, False], (True, 1): [True, True], (True, 2): [True, False]}
    for key in ((True, 1), (True, 2)):
        assert curves[key] == pytest.approx(curves[False, 1], abs=1e-5), key
    assert curves[False, 1][0] != curves[False, 1][-1]  # it trained


@pytest.mark.bad_input
@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_liger_without_a_gpu_is_refused(tmp_path):
    (tmp_path / "dapt.yaml").write_text("method: lora\ntraining:\n  use_liger_kernel: true\n")
    with pytest.raises(UserError, match=r"dapt.yaml: training.use_liger_kernel: Liger's kernels need a CUDA GPU"):
        load_params("dapt", tmp_path)
    (tmp_path / "dapt.yaml").write_text("method: lora\ntraining:\n  use_liger_kernel: false\n")
    assert load_params("dapt", tmp_path).training.use_liger_kernel is False


def test_liger_patches_a_scalar_head_models_layers_not_its_forward(tiny_base, monkeypatch):
    """liger-kernel 0.8.5's instance patch (what Trainer's use_liger_kernel calls) gives a
    *ForSequenceClassification model its causal-LM forward, which fails on `lm_head` (measured on an H200): a
    scalar-head model gets the layer kernels without the fused cross-entropy, and Trainer's switch off; a causal
    LM is left to Trainer. liger-kernel is CUDA-only, so its entry point is stood in for here."""
    import sys
    import types

    from transformers import AutoModelForSequenceClassification

    from refinery.modeling.kernels import liger_for_trainer

    calls = []
    fake = types.ModuleType("liger_kernel.transformers")
    fake._apply_liger_kernel_to_instance = lambda model, **kw: calls.append((type(model).__name__, kw))
    monkeypatch.setitem(sys.modules, "liger_kernel", types.ModuleType("liger_kernel"))
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers", fake)
    scalar = AutoModelForSequenceClassification.from_pretrained(tiny_base, num_labels=1)
    assert liger_for_trainer(scalar, True) is False
    assert calls == [("LlamaForSequenceClassification", {"fused_linear_cross_entropy": False, "cross_entropy": False})]
    assert liger_for_trainer(AutoModelForCausalLM.from_pretrained(tiny_base), True) is True
    assert liger_for_trainer(scalar, False) is False and len(calls) == 1

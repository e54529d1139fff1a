"""One precision knob (params/base.yaml `precision`, refinery/modeling/precision.py): what `auto` picks, what
a machine cannot run is refused, bf16 training still learns with fp32 master weights, and every stage reads
the resolved value."""
import copy
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from refinery.config import TrainingArgs, load_params
from refinery.data.corpus import corpus_rows
from refinery.data.packing import PadCollator
from refinery.errors import UserError
from refinery.evaluation.heldout import row_losses
from refinery.modeling import precision
from refinery.modeling.loading import load_tokenizer
from refinery.train.trainer import run_trainer

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU rule")
def test_auto_on_a_cpu_follows_its_bf16_instructions(monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: True)
    assert precision.resolve("auto") == "bf16"
    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: False)
    assert precision.resolve("auto") == "fp32"
    assert precision.resolve("fp32") == "fp32" and precision.resolve("bf16") == "bf16"


@pytest.mark.bad_input
@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 runs on a GPU")
def test_fp16_without_a_gpu_is_refused():
    with pytest.raises(UserError, match="precision: fp16 needs a CUDA GPU"):
        precision.resolve("fp16")


def test_compute_precision_runs_matmuls_in_bf16_and_fp32_untouched():
    layer = torch.nn.Linear(8, 8)
    x = torch.randn(2, 8)
    with precision.compute_precision("bf16", "cpu"):
        assert layer(x).dtype == torch.bfloat16
    with precision.compute_precision("fp32", "cpu"):
        assert layer(x).dtype == torch.float32
    assert layer.weight.dtype == torch.float32  # master weights stay fp32


def test_every_training_stage_reads_the_base_precision(tmp_path):
    shutil.copytree(REPO / "params", tmp_path / "params")
    base = tmp_path / "params" / "base.yaml"
    for choice, want in (("fp32", "fp32"), ("bf16", "bf16"), ("auto", precision.resolve("auto"))):
        data = yaml.safe_load(base.read_text())
        data["precision"] = choice
        base.write_text(yaml.safe_dump(data))
        for stage in ("dapt", "sft", "reward"):
            assert load_params(stage, tmp_path / "params").training.precision == want, (stage, choice)


def test_bf16_training_learns_and_keeps_fp32_weights(tiny_base, prepared, tmp_path):
    """The tiny model trained under bf16 autocast: its held-out loss (measured in fp32) goes down like the
    fp32 run's, and the weights it saves are fp32."""
    tok = load_tokenizer(tiny_base)
    rows = corpus_rows(prepared / "corpus" / "train.jsonl", tok, 64, packed=True)[:48]
    held = corpus_rows(prepared / "corpus" / "validation.jsonl", tok, 64, packed=True)[:16]
    collate = PadCollator(tok.pad_token_id)
    results = {}
    for p in ("fp32", "bf16"):
        model = AutoModelForCausalLM.from_pretrained(tiny_base)
        before = row_losses(model, held, 8, 2, collate)[0]["eval_loss"]
        args = TrainingArgs(max_steps=12, batch_size=4, lr=3e-3, save_steps=12, warmup_ratio=0.0, precision=p)
        summary, trainer = run_trainer(model, rows, collate, args, tmp_path / p, seed=1)
        assert trainer.args.bf16 == (p == "bf16")
        after = row_losses(model, held, 8, 2, collate)[0]["eval_loss"]
        assert all(t.dtype == torch.float32 for t in model.state_dict().values())
        results[p] = (before, after)
    for p, (before, after) in results.items():
        assert after < before - 0.3, (p, before, after)
    # the same recipe, the same data: bf16 lands within a few percent of fp32
    assert abs(results["bf16"][1] - results["fp32"][1]) < 0.05 * results["fp32"][1], results


def test_training_inside_the_stage_precision_context_changes_the_model(tiny_base, prepared, tmp_path):
    """A stage runs its whole body (evaluation, training, evaluation) inside `compute_precision`. Regression:
    with autocast's weight cache on, every forward after the first kept using the first 16-bit copy of the
    LoRA weights, so the validation loss never moved while the weights trained."""
    from peft import LoraConfig, get_peft_model

    tok = load_tokenizer(tiny_base)
    rows = corpus_rows(prepared / "corpus" / "train.jsonl", tok, 64, packed=True)[:48]
    held = corpus_rows(prepared / "corpus" / "validation.jsonl", tok, 64, packed=True)[:8]
    collate = PadCollator(tok.pad_token_id)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_base),
                           LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    args = TrainingArgs(max_steps=8, batch_size=4, lr=1e-2, save_steps=2, warmup_ratio=0.0, precision="bf16",
                        eval_steps=2, early_stopping_patience=0)
    with precision.compute_precision("bf16", "cpu"):
        before = row_losses(model, held, 8, 1, collate)[0]["eval_loss"]
        summary, _ = run_trainer(model, rows, collate, args, tmp_path / "ckpt", seed=1, eval_dataset=held)
        after = row_losses(model, held, 8, 1, collate)[0]["eval_loss"]
    losses = [v["validation_loss"] for v in summary.validation]
    assert len(set(losses)) == len(losses), losses  # each evaluation sees the weights of its step
    assert after < before - 0.02, (before, after)


def test_bf16_training_stores_frozen_weights_in_bf16_and_saves_the_fp32_merge(tiny_base, prepared, tmp_path,
                                                                               monkeypatch):
    """run_trainer under bf16 keeps a LoRA model's frozen linear weights in bf16 (autocast would cast them on
    every forward): the same training as with fp32 frozen weights under autocast, to float noise, and the stage
    output is the adapter merged into the fp32 input weights, loadable with plain transformers."""
    from peft import LoraConfig, get_peft_model

    from refinery.modeling.loading import save_output
    from refinery.train import trainer as trainer_module

    tok = load_tokenizer(tiny_base)
    rows = corpus_rows(prepared / "corpus" / "train.jsonl", tok, 64, packed=True)[:24]
    collate = PadCollator(tok.pad_token_id)
    trained = {}
    for name in ("fp32 frozen", "bf16 frozen"):
        if name == "fp32 frozen":
            monkeypatch.setattr(trainer_module, "store_frozen_linears", lambda model, p: 0)
        else:
            monkeypatch.undo()
        torch.manual_seed(0)
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_base),
                               LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"],
                                          task_type="CAUSAL_LM"))
        args = TrainingArgs(max_steps=6, batch_size=4, lr=1e-2, save_steps=6, warmup_ratio=0.0, precision="bf16")
        with precision.compute_precision("bf16", "cpu"):
            summary, _ = run_trainer(model, rows, collate, args, tmp_path / name, seed=1)
        frozen = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight
        assert frozen.dtype == (torch.bfloat16 if name == "bf16 frozen" else torch.float32)
        save_output(model, tok, "lora", tmp_path / f"out {name}", tiny_base)
        trained[name] = ([h["loss"] for h in summary.history],
                         AutoModelForCausalLM.from_pretrained(tmp_path / f"out {name}").state_dict())
    (losses, weights), (losses16, weights16) = trained["fp32 frozen"], trained["bf16 frozen"]
    assert losses16 == pytest.approx(losses, rel=1e-3), (losses, losses16)
    for key, w in weights.items():
        assert weights16[key].dtype == torch.float32, key
        assert torch.allclose(weights16[key], w, atol=1e-4), key


@pytest.mark.parametrize("method", ["full", "lora"])
def test_a_bf16_base_gives_bf16_outputs(tiny_base, tmp_path, method):
    """Issue "Fast and lean": outputs are saved in the base's dtype. A bf16 input folder, trained on fp32 master
    weights (as every stage loads it), is written back in bf16: config.json says so, plain transformers loads it
    in bf16 with dtype="auto", the weights are the trained fp32 ones rounded once, and the model in memory keeps
    fp32. An fp32 input (the demo's) keeps fp32 outputs."""
    from peft import LoraConfig, get_peft_model

    from refinery.modeling.loading import load_causal_lm, save_output, stored_dtype

    tok = load_tokenizer(tiny_base)
    base16 = tmp_path / "base16"
    AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.bfloat16).save_pretrained(base16)
    tok.save_pretrained(base16)
    assert stored_dtype(base16) == torch.bfloat16 and stored_dtype(tiny_base) == torch.float32
    for base, dtype in ((base16, torch.bfloat16), (Path(tiny_base), torch.float32)):
        torch.manual_seed(0)
        model = load_causal_lm(base)  # fp32 master weights
        if method == "lora":
            model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                     task_type="CAUSAL_LM"))
        with torch.no_grad():  # "training": every weight moves, the adapter's B included
            for p in model.parameters():
                p.add_(0.01 * torch.randn_like(p))
        # the trained weights as fp32 tensors (a LoRA model merged on a copy: merge_and_unload folds in place)
        trained = (copy.deepcopy(model).merge_and_unload() if method == "lora" else model).state_dict()
        trained = {k: v.clone() for k, v in trained.items()}
        out = tmp_path / f"out-{method}-{dtype}"
        save_output(model, tok, method, out, base)
        assert all(p.dtype == torch.float32 for p in model.parameters())  # the model in memory: as trained
        loaded = AutoModelForCausalLM.from_pretrained(out, dtype="auto")
        assert loaded.dtype == dtype
        assert stored_dtype(out) == dtype
        saved = loaded.state_dict()
        for key, w in trained.items():
            assert saved[key].dtype == dtype, key
            assert torch.equal(saved[key], w.to(dtype)), key

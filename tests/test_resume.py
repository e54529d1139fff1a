"""A training run that crashes after a checkpoint resumes from it and ends where an uninterrupted run ends."""
import pytest
import torch
from transformers import AutoModelForCausalLM, TrainerCallback

from refinery.config import TrainingArgs
from refinery.data.corpus import corpus_rows
from refinery.data.packing import PadCollator
from refinery.modeling.loading import load_tokenizer
from refinery.train.trainer import last_complete_checkpoint, run_trainer

ARGS = TrainingArgs(max_steps=6, batch_size=2, lr=3e-3, save_steps=2, keep_checkpoints=2, warmup_ratio=0.0)


class Crash(TrainerCallback):
    def on_step_end(self, args, state, control, **kw):
        if state.global_step == 5:
            raise RuntimeError("simulated crash")


def train(tiny_base, prepared, ckpt, crash=False):
    tok = load_tokenizer(tiny_base)
    rows = corpus_rows(prepared / "corpus" / "train.jsonl", tok, 64, packed=True)[:40]
    model = AutoModelForCausalLM.from_pretrained(tiny_base)
    kwargs = {"callbacks": [Crash()]} if crash else {}
    summary, trainer = run_trainer(model, rows, PadCollator(tok.pad_token_id), ARGS, ckpt, seed=1, **kwargs)
    return summary, model


def test_resume_after_crash_matches_uninterrupted(tiny_base, prepared, tmp_path):
    ref_summary, ref_model = train(tiny_base, prepared, tmp_path / "ref")

    with pytest.raises(RuntimeError, match="simulated crash"):
        train(tiny_base, prepared, tmp_path / "crash", crash=True)
    assert last_complete_checkpoint(tmp_path / "crash").name == "checkpoint-4"

    summary, model = train(tiny_base, prepared, tmp_path / "crash")
    assert summary.resumed_from == 4 and summary.steps == 6
    # the whole run's tokens, as the uninterrupted run counts them; this process trained the last 2 of 6 steps
    assert summary.tokens == ref_summary.tokens and ref_summary.tokens_this_process == ref_summary.tokens
    assert 0 < summary.tokens_this_process < summary.tokens
    losses = {h["step"]: h["loss"] for h in summary.history}
    ref = {h["step"]: h["loss"] for h in ref_summary.history}
    assert sorted(losses) == list(range(1, 7))  # no step repeated or lost
    assert losses == pytest.approx(ref, abs=1e-6)
    for (name, p), (_, q) in zip(model.named_parameters(), ref_model.named_parameters()):
        assert torch.equal(p, q), name


def test_incomplete_checkpoint_is_ignored(tmp_path):
    (tmp_path / "checkpoint-2").mkdir()
    (tmp_path / "checkpoint-2" / "trainer_state.json").write_text("{}")
    (tmp_path / "checkpoint-4").mkdir()  # cut off mid-save: no trainer_state.json
    assert last_complete_checkpoint(tmp_path).name == "checkpoint-2"
    assert not (tmp_path / "checkpoint-4").exists()


def test_killed_after_the_last_checkpoint_does_not_train_past_max_steps(tiny_base, prepared, tmp_path):
    """Every checkpoint is there (killed after the last save): the rerun trains nothing and returns the weights
    the uninterrupted run ended with."""
    summary, finished = train(tiny_base, prepared, tmp_path / "run")
    base = AutoModelForCausalLM.from_pretrained(tiny_base)
    # the comparison below only means something if training moved the weights away from the base
    assert any(not torch.equal(p, q) for p, q in zip(finished.parameters(), base.parameters()))
    again, model = train(tiny_base, prepared, tmp_path / "run")  # a fresh model object, loaded from checkpoint-6
    assert again.resumed_from == 6 and again.steps == 6
    assert [h["step"] for h in again.history] == [h["step"] for h in summary.history]  # no step past max_steps
    resumed, uninterrupted = dict(model.named_parameters()), dict(finished.named_parameters())
    assert resumed.keys() == uninterrupted.keys()
    for name, p in resumed.items():
        torch.testing.assert_close(p, uninterrupted[name], atol=1e-6, rtol=0, msg=lambda m, name=name: f"{name}: {m}")


def test_checkpoints_are_keyed_by_params_inputs_and_code(tmp_path, monkeypatch):
    """A finished run's checkpoints stay, so the key must change with anything that changes the training: params,
    input hashes, and the code (else `dvc repro` after a code change resumed the finished run's last step and
    saved the old weights again). The same code, params and inputs: the same folder, for a resume after a kill."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    from refinery.ops import stage_cli

    key = stage_cli.checkpoint_dir("sft", {"lr": 1}, {"data": "a"})
    assert key == stage_cli.checkpoint_dir("sft", {"lr": 1}, {"data": "a"}) and key.parent == Path("checkpoints/sft")
    assert key != stage_cli.checkpoint_dir("sft", {"lr": 2}, {"data": "a"})
    assert key != stage_cli.checkpoint_dir("sft", {"lr": 1}, {"data": "b"})
    # the same computation in a copy of the code with one file edited: another key (a fresh process, as a stage is)
    repo = Path(stage_cli.__file__).parents[2]
    for package in ("refinery", "flows"):
        shutil.copytree(repo / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    probe = ("from refinery.ops.stage_cli import checkpoint_dir; "
             "print(checkpoint_dir('sft', {'lr': 1}, {'data': 'a'}))")
    same = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, check=True)
    (tmp_path / "refinery" / "train" / "reward_model.py").write_text(
        (tmp_path / "refinery" / "train" / "reward_model.py").read_text() + "\n# edited\n")
    edited = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert same.stdout.strip() == str(key) != edited.stdout.strip()

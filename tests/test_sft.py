"""SFT: response-only loss, the task mixture, per-task evaluation, chaining rules, and the stage end to end."""
import json
import shutil
from collections import Counter

import pytest
from transformers import AutoModelForCausalLM

from flows.sft import load_inputs, sft_flow
from refinery.data.chat import render_example
from refinery.data.mixture import build_train_rows, mixture_probs, sample_mixture
from refinery.data.packing import IGNORE
from refinery.evaluation.text_metrics import exact_match, rouge_l, token_f1
from refinery.modeling.loading import load_tokenizer


def test_loss_is_on_the_response_only(tiny_base):
    tok = load_tokenizer(tiny_base)
    ids, labels = render_example(tok, "Which module defines `dumps`?", "json")
    learned = [t for t, lab in zip(ids, labels) if lab != IGNORE]
    assert tok.decode(learned).strip() == "json<|im_end|>"  # the answer and its end of turn, nothing else
    first = labels.index(next(lab for lab in labels if lab != IGNORE))
    assert all(lab == IGNORE for lab in labels[:first]) and "dumps" in tok.decode(ids[:first])
    assert labels[first:] == ids[first:]


def test_mixture_probabilities():
    sizes, weights = {"a": 300, "b": 100}, {"a": 1.0, "b": 1.0}
    assert mixture_probs(sizes, weights, "proportional", 1) == pytest.approx({"a": 0.75, "b": 0.25})
    # temperature 2: p ∝ sqrt(n): sqrt(300)/(sqrt(300)+sqrt(100)) = 0.634
    assert mixture_probs(sizes, weights, "temperature", 2.0)["a"] == pytest.approx(0.6340, abs=1e-4)
    assert mixture_probs(sizes, {"a": 1.0, "b": 3.0}, "proportional", 1) == pytest.approx({"a": 0.5, "b": 0.5})


def test_realised_share_follows_the_mixture():
    pools = {"a": [([1] * 5, [1] * 5)] * 7, "b": [([2] * 5, [2] * 5)] * 3}
    stream = sample_mixture(pools, {"a": 0.8, "b": 0.2}, seed=0)
    share = Counter(next(stream)[0] for _ in range(5000))
    assert share["a"] / 5000 == pytest.approx(0.8, abs=0.02)
    rows, counts = build_train_rows(pools, {"a": 0.8, "b": 0.2}, n_rows=50, block_size=12, packed=True, seed=0)
    assert len(rows) == 50 and all(len(r["input_ids"]) <= 12 for r in rows)
    assert sum(counts.values()) == sum(r["position_ids"].count(0) for r in rows)  # counts = examples in rows


def test_text_metrics():
    assert exact_match("`json`.", "json") == 1.0 and exact_match("the json module", "json") == 0.0
    assert token_f1("the json module", "json") == pytest.approx(0.5)
    # LCS "a date from a timestamp" = 5 of 6 predicted and 7 reference tokens
    assert rouge_l("return a date from a timestamp", "Create a date from a POSIX timestamp.") == pytest.approx(
        2 * (5 / 6) * (5 / 7) / (5 / 6 + 5 / 7))


@pytest.fixture
def sft_project(project, prepared):
    shutil.copytree(prepared, project / "data" / "prepared")
    shutil.copytree(project / "models" / "base", project / "models" / "dapt")
    return project


SMALL = {"training.max_steps": 6, "training.batch_size": 4, "block_size": 256, "training.warmup_ratio": 0.0,
         "eval.max_examples_per_task": 4, "eval.max_new_tokens": 4}


@pytest.mark.parametrize("padding_free", [False, True])
def test_sft_stage_lowers_every_task_loss(sft_project, prefect_server, padding_free):
    """Also with `padding_free: true` (a batch's packed rows joined into one row: refinery/data/packing.py)."""
    metrics = sft_flow(overrides={**SMALL, "method": "full", "training.lr": 0.003, "padding_free": padding_free})
    on_disk = json.loads((sft_project / "reports" / "sft" / "evaluation.json").read_text())
    assert set(on_disk["before"]["tasks"]) == set(on_disk["after"]["tasks"]) == {"summarize", "which_module",
                                                                                 "explain_topic"}
    for task, after in on_disk["after"]["tasks"].items():
        assert {"loss", "score"} <= set(after)
        assert after["loss"] < on_disk["before"]["tasks"][task]["loss"], task
    share = on_disk["train"]["mixture_share"]
    assert sum(share.values()) == pytest.approx(1.0, abs=1e-3) and all(v > 0 for v in share.values())
    assert metrics["train"]["steps"] == 6
    AutoModelForCausalLM.from_pretrained(sft_project / "models" / "sft")
    # padding-free trains on (and counts) exactly the rows' tokens; the padded batches count their padding too
    rows = load_inputs("params", "models/dapt", "data/prepared", {**SMALL, "padding_free": padding_free}).rows
    real = sum(len(r["input_ids"]) for r in rows)
    assert (metrics["train"]["tokens"] == real) if padding_free else (metrics["train"]["tokens"] > real), (real, metrics)


def test_sft_refuses_a_non_mergeable_input(sft_project, prefect_server):
    from refinery.config import AdapterArgs
    from refinery.modeling.bottleneck import add_adapters, save_adapters

    dapt = sft_project / "models" / "dapt"
    model = add_adapters(AutoModelForCausalLM.from_pretrained(dapt), AdapterArgs(bottleneck=4))
    shutil.rmtree(dapt)
    save_adapters(model, dapt, base_model_name_or_path=str(sft_project / "models" / "base"))
    state = sft_flow(overrides=SMALL, return_state=True)
    assert state.is_failed() and "non-mergeable 'bottleneck' adapter" in state.message
    assert not (sft_project / "models" / "sft").exists()


def test_rl_stages_start_from_the_base_of_a_non_mergeable_sft(sft_project):
    from refinery.config import AdapterArgs
    from refinery.modeling.bottleneck import add_adapters, save_adapters
    from refinery.modeling.loading import full_weights_of

    sft = sft_project / "models" / "sft"
    model = add_adapters(AutoModelForCausalLM.from_pretrained(sft_project / "models" / "dapt"), AdapterArgs(bottleneck=4))
    save_adapters(model, sft, base_model_name_or_path=str(sft_project / "models" / "dapt"))
    folder, note = full_weights_of(sft)
    assert folder == str(sft_project / "models" / "dapt") and "not carried" in note
    assert full_weights_of(sft_project / "models" / "dapt") == (str(sft_project / "models" / "dapt"), None)

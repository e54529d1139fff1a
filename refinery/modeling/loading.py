"""Load a stage's input model and save its output, whatever method produced or trains it.

Output folder of a training stage (models/<stage>/):
  * `full`, and mergeable methods (lora, qlora, ia3): a plain transformers folder (merged weights,
    safetensors) that `AutoModelForCausalLM.from_pretrained` loads; mergeable methods also keep the
    unmerged adapter in `adapter/` (load it with peft on top of the stage's input model).
  * non-mergeable methods (adapter, prefix, prompt, ptuning, ptuning_v2): the adapter alone at the top
    level, with `base_model_name_or_path` pointing at the input model folder (relative to the project
    root), so `peft.AutoPeftModelForCausalLM.from_pretrained("models/sft")` loads it from the project root.
Every folder also carries the tokenizer (with its chat template) and `refinery_manifest.json`.
"""
from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from refinery.config import MethodParams
from refinery.errors import UserError
from refinery.modeling import bottleneck
from refinery.modeling.methods import INITIAL_ADAPTER, REGISTRY, quantization_kwargs
from refinery.modeling.precision import frozen_in_16bit


def model_kind(folder: str | Path) -> str:
    folder = Path(folder)
    if (folder / "adapter_config.json").is_file():
        return "peft"
    if bottleneck.has_adapters(folder):
        return "bottleneck"
    if (folder / "config.json").is_file() and any(folder.glob("*.safetensors")):
        return "full"
    if not folder.is_dir():
        raise UserError(f"{folder}: model folder does not exist (run the stage that produces it first)")
    raise UserError(f"{folder}: not a model folder (no config.json with *.safetensors weights, and no adapter)")


def full_weights_of(folder: str | Path) -> tuple[str, str | None]:
    """The full-weights folder a scalar-head or RL stage starts from, and a note when it is not `folder`.

    A non-mergeable output (prefix/prompt/ptuning/ptuning_v2/bottleneck) cannot be merged into weights, so
    reward and PPO start from the weights it was trained on (its `base_model_name_or_path`, i.e. the stage
    before it) and say so: the adapter conditions generation but is not carried into RL. This keeps
    `dvc exp run -S params/sft.yaml:method=<any>` running end to end."""
    kind = model_kind(folder)
    if kind == "full":
        return str(folder), None
    name = "adapter_config.json" if kind == "peft" else bottleneck.CONFIG_NAME
    base = read_json(Path(folder) / name).get("base_model_name_or_path")
    if not base or model_kind(base) != "full":
        raise UserError(f"{folder}: a '{kind}' adapter whose base ({base}) is not a full-weights folder")
    return str(base), (f"{folder} holds a non-mergeable {kind} adapter; starting from its base weights {base} "
                       "(the adapter is not carried into this stage)")


def check_weight_files(folder: str | Path) -> None:
    """Every *.safetensors file in `folder` has a readable header that covers the whole file: a truncated or
    corrupt download is a one-line error naming the file, before anything loads or trains."""
    from safetensors import SafetensorError, safe_open

    for f in sorted(Path(folder).glob("*.safetensors")):
        try:
            with safe_open(str(f), "pt"):
                pass
        except (SafetensorError, OSError) as err:
            raise UserError(f"{f}: not a complete safetensors file ({err}); re-create it (rerun the stage that "
                            "wrote it) or restore it") from None


def load_tokenizer(folder: str | Path, trust_remote_code: bool = False):
    folder = Path(folder)
    if not any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        raise UserError(f"{folder}: no tokenizer files (tokenizer.json / tokenizer_config.json)")
    tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if not tok.chat_template:
        raise UserError(f"{folder}: tokenizer has no chat template")
    return tok


def load_causal_lm(folder: str | Path, trust_remote_code: bool = False, dtype=torch.float32,
                   method: MethodParams | None = None, attn_implementation: str | None = None):
    """A full model folder as a plain causal LM (the starting point of every training stage); in 4-bit
    when `method` is qlora."""
    kind = model_kind(folder)
    if kind != "full":
        raise UserError(f"{folder}: holds a non-mergeable '{kind}' adapter; a training stage can only start "
                        "from full weights (see the chaining table in README.md)")
    check_weight_files(folder)
    return AutoModelForCausalLM.from_pretrained(folder, **from_pretrained_kwargs(trust_remote_code, method, dtype,
                                                                              attn_implementation))


def attention_kwargs(attn_implementation: str | None) -> dict:
    """`attn_implementation` for from_pretrained (none: transformers' default), refused in one line before any
    loading when this machine cannot run it (flash-attn without CUDA or without its package)."""
    if attn_implementation is None:
        return {}
    if attn_implementation == "segment_sdpa":  # sdpa, with padding-free rows attended one sequence at a time
        from refinery.modeling.attention import register_segment_sdpa

        return {"attn_implementation": register_segment_sdpa()}
    if attn_implementation == "flash_attention_2":
        import importlib.util

        if not torch.cuda.is_available() or importlib.util.find_spec("flash_attn") is None:
            raise UserError("params/base.yaml: attn_implementation: flash_attention_2 needs a CUDA GPU and the "
                            "flash-attn package (pip install flash-attn); use sdpa or null here")
    return {"attn_implementation": attn_implementation}


def from_pretrained_kwargs(trust_remote_code: bool, method: MethodParams | None = None, dtype=torch.float32,
                           attn_implementation: str | None = None) -> dict:
    """The one set of from_pretrained settings: safetensors only, remote code only when asked, fp32 weights
    (a 4-bit NF4 base when the method is qlora), the attention kernel params/base.yaml names."""
    return {"use_safetensors": True, "trust_remote_code": trust_remote_code, "dtype": dtype,
            **quantization_kwargs(method), **attention_kwargs(attn_implementation)}


def load_scalar_model(folder: str | Path, trust_remote_code: bool = False, method: MethodParams | None = None,
                      attn_implementation: str | None = None, **extra):
    """A one-scalar sequence-classification model (the reward model, PPO's value model)."""
    check_weight_files(folder)
    return AutoModelForSequenceClassification.from_pretrained(
        folder, **from_pretrained_kwargs(trust_remote_code, method, attn_implementation=attn_implementation), **extra)


def to_compute_device(model):
    """The GPU when there is one (PPO keeps rollouts, values and rewards on one device); 4-bit models were
    placed on their GPU at load."""
    if torch.cuda.is_available() and not getattr(model, "is_quantized", False):
        # a multi-process PPO (torchrun) gives each rank its own GPU
        return model.to(torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))))
    return model


def unwrapped(model):
    """The transformers model inside a peft wrapper (the model itself when there is none)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def merge_into_full_precision(model, input_dir: str | Path, adapter_dir: Path):
    """A QLoRA model's saved adapter merged into the *full-precision* input weights (merging into the 4-bit
    base would bake its quantisation error into the output): the input reloaded in fp32 with the trained
    config minus quantisation (so a reward model keeps num_labels/pad id), the adapter and its trained heads
    loaded from `adapter_dir`, then merged."""
    from peft import PeftModel

    inner = model.get_base_model()
    config = copy.deepcopy(inner.config)
    for key in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, key):
            delattr(config, key)
    full = type(inner).from_pretrained(full_weights_of(input_dir)[0], config=config, dtype=torch.float32,
                                       use_safetensors=True)
    return PeftModel.from_pretrained(full, adapter_dir).merge_and_unload()


def save_output(model, tokenizer, method: str, out: Path, input_dir: str | Path) -> None:
    """Write the trained model into `out` as documented in this module's docstring."""
    base_ref = str(input_dir)
    m = REGISTRY[method]
    if hasattr(model, "config"):
        model.config.use_cache = True
    if method == "full":
        save_in_dtype(model, out, stored_dtype(input_dir))
    elif method == "adapter":
        bottleneck.save_adapters(model, out, base_model_name_or_path=base_ref)
    elif m.mergeable:
        model.peft_config["default"].base_model_name_or_path = base_ref
        # pissa/olora changed the frozen weights: save the adapter as the plain LoRA delta it amounts to on the
        # untouched base (what `PeftModel.from_pretrained(base, out/"adapter")` needs); merging below is exact
        initial = getattr(model, INITIAL_ADAPTER, None)
        model.save_pretrained(out / "adapter", **({"path_initial_model_for_weight_conversion": initial} if initial
                                                  else {}))
        # a 4-bit base (qlora) or 16-bit frozen weights (ppo: precision.store_frozen_linears) would bake
        # their rounding into the output: merge into the fp32 input weights instead
        merged = (merge_into_full_precision(model, input_dir, out / "adapter")
                  if method == "qlora" or frozen_in_16bit(model) else model.merge_and_unload())
        save_in_dtype(merged, out, stored_dtype(input_dir))
    else:
        model.peft_config["default"].base_model_name_or_path = base_ref
        model.save_pretrained(out)
    tokenizer.save_pretrained(out)


# the dtypes a stage output may be written in: what a checkpoint's config names, as torch dtypes
STORED_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def stored_dtype(input_dir: str | Path) -> torch.dtype:
    """The dtype the stage's input weights are stored in (its full-weights folder's config.json `dtype`, or
    `torch_dtype` as transformers 4 wrote it); float32 when it names none or another type. Training runs on fp32
    master weights whatever this is; the output is written back in it, so a bf16 base gives bf16 outputs of
    its own size, not fp32 ones twice as large."""
    try:
        config = read_json(Path(full_weights_of(input_dir)[0]) / "config.json")
    except (OSError, UserError, ValueError):
        return torch.float32
    return STORED_DTYPES.get(str(config.get("dtype") or config.get("torch_dtype")), torch.float32)


def save_in_dtype(model, out: Path, dtype: torch.dtype) -> None:
    """`model.save_pretrained(out)` with its floating-point weights in `dtype`: a cast copy of the state dict (the
    model in memory keeps its fp32 weights for whatever runs after the save), and config.json saying so. fp32 as
    trained: the plain save, unchanged."""
    if dtype == torch.float32 or not any(p.is_floating_point() and p.dtype != dtype for p in model.parameters()):
        model.save_pretrained(out)
        return
    state = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in model.state_dict().items()}
    model.save_pretrained(out, state_dict=state)
    # save_pretrained writes the dtype of the parameters in memory (fp32); the file holds `dtype`
    config = read_json(Path(out) / "config.json")
    config["dtype"] = str(dtype).removeprefix("torch.")
    (Path(out) / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())

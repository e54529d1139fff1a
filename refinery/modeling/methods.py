"""The method registry shared by every training stage: how a method is applied, saved, loaded and merged.

| method     | implementation                               | mergeable | packed batches |
|------------|----------------------------------------------|-----------|----------------|
| full       | all weights train                            | n/a       | yes            |
| lora       | peft LoraConfig                              | yes       | yes            |
| qlora      | 4-bit NF4 base (bitsandbytes, CUDA) + LoRA   | yes (into the full-precision base) | yes |
| adapter    | refinery.modeling.bottleneck (ours: peft has none)       | no        | yes            |
| ia3        | peft IA3Config                               | yes       | yes            |
| prefix     | peft PrefixTuningConfig, with reparameterisation MLP | no | no (padded) |
| ptuning_v2 | peft PrefixTuningConfig without the MLP (deep prompts at every layer) | no | no |
| prompt     | peft PromptTuningConfig (virtual input tokens) | no      | no             |
| ptuning    | peft PromptEncoderConfig (MLP/LSTM prompt encoder) | no  | no             |

Virtual-token methods change the sequence the model sees, so padding-free packing (which relies on
position_ids restarts) is not used with them: their batches are padded instead.
"""
from __future__ import annotations

import importlib.util
import os

import torch

from refinery.config import MethodParams
from refinery.errors import UserError
from refinery.modeling.method_specs import REGISTRY, Method, methods_for


def get_method(params: MethodParams, source: str) -> Method:
    """Validate the method for this machine before any training starts."""
    method = REGISTRY[params.method]
    if method.needs_cuda and not torch.cuda.is_available():
        raise UserError(f"{source}: key 'method': '{method.name}' needs a CUDA GPU (4-bit bitsandbytes "
                        "kernels); none is available here. Use 'lora' on this machine.")
    if method.name == "qlora" and importlib.util.find_spec("bitsandbytes") is None:
        raise UserError(f"{source}: key 'method': 'qlora' needs the bitsandbytes package, which is not installed "
                        "(pip install 'bitsandbytes>=0.45' on the GPU machine)")
    return method


def quantization_kwargs(params: MethodParams | None) -> dict:
    """from_pretrained kwargs that load the frozen base of a QLoRA run in 4-bit (NF4 by default, double
    quantisation, bf16 compute) on this process's GPU (LOCAL_RANK under torchrun); {} for every other method."""
    if params is None or params.method != "qlora":
        return {}
    from transformers import BitsAndBytesConfig

    q = params.qlora
    return {"quantization_config": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=q.quant_type,
                                                      bnb_4bit_use_double_quant=q.double_quant,
                                                      bnb_4bit_compute_dtype=torch.bfloat16),
            "device_map": {"": int(os.environ.get("LOCAL_RANK", 0))}, "dtype": torch.bfloat16}


def check_stage_method(params: MethodParams, stage: str, source: str) -> Method:
    method = get_method(params, source)
    if stage not in method.stages:
        raise UserError(f"{source}: key 'method': '{method.name}' is not supported in stage '{stage}' "
                        f"(supported: {', '.join(methods_for(stage))}); see the chaining table in README.md")
    return method


LORA_INIT = {"default": True, "gaussian": "gaussian", "pissa": "pissa", "olora": "olora"}
MUTATING_INITS = ("pissa", "olora")  # they move the top of each weight into A, B: the frozen weight is changed
INITIAL_ADAPTER = "_refinery_initial_adapter"  # attribute: where the untrained pissa/olora adapter was saved


def peft_config(params: MethodParams, task_type: str, tokenizer_path: str | None = None):
    """The peft config for a peft-backed method; None for `full` and `adapter`."""
    import peft

    name, a = params.method, params.method_args
    if name in ("lora", "qlora"):
        return peft.LoraConfig(r=a.r, lora_alpha=a.alpha, lora_dropout=a.dropout, use_dora=a.use_dora,
                               use_rslora=a.use_rslora, target_modules=list(a.target_modules), task_type=task_type,
                               init_lora_weights=LORA_INIT[a.init])
    if name == "ia3":
        return peft.IA3Config(target_modules=list(a.target_modules),
                              feedforward_modules=list(a.feedforward_modules), task_type=task_type)
    if name == "prefix":
        return peft.PrefixTuningConfig(num_virtual_tokens=a.num_virtual_tokens, prefix_projection=True,
                                       encoder_hidden_size=a.encoder_hidden_size, task_type=task_type)
    if name == "ptuning_v2":
        return peft.PrefixTuningConfig(num_virtual_tokens=a.num_virtual_tokens, prefix_projection=False,
                                       task_type=task_type)
    if name == "prompt":
        init = {"prompt_tuning_init": "RANDOM"}
        if a.init_text:
            init = {"prompt_tuning_init": "TEXT", "prompt_tuning_init_text": a.init_text,
                    "tokenizer_name_or_path": tokenizer_path}
        return peft.PromptTuningConfig(num_virtual_tokens=a.num_virtual_tokens, task_type=task_type, **init)
    if name == "ptuning":
        return peft.PromptEncoderConfig(num_virtual_tokens=a.num_virtual_tokens,
                                        encoder_hidden_size=a.encoder_hidden_size,
                                        encoder_reparameterization_type=a.encoder_type, task_type=task_type)
    return None


def apply_method(model, params: MethodParams, task_type: str = "CAUSAL_LM", tokenizer_path: str | None = None,
                 seed: int = 0):
    """Make only the method's parameters trainable; return the model to train. New weights (LoRA A, adapters,
    prompts) are initialised from `seed`, not from whatever the RNG saw before, so reruns start identically."""
    torch.manual_seed(seed)
    name = params.method
    if name == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    if name == "adapter":
        from refinery.modeling import bottleneck

        return bottleneck.add_adapters(model, params.adapter)
    import peft

    if name == "qlora":
        model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model = peft.get_peft_model(model, peft_config(params, task_type, tokenizer_path))
    if name == "lora" and params.method_args.init in MUTATING_INITS:
        keep_initial_adapter(model)
    return model


def keep_initial_adapter(model) -> None:
    """Save the untrained pissa/olora adapter (deterministic: an SVD or QR of the weights) to a temporary folder,
    so that saving can convert the trained one into a plain LoRA delta on the original base. Removed at exit."""
    import atexit
    import shutil
    import tempfile

    folder = tempfile.mkdtemp(prefix="refinery-lora-init-")
    atexit.register(shutil.rmtree, folder, True)
    model.save_pretrained(folder)
    setattr(model, INITIAL_ADAPTER, folder)


def count_parameters(model) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total

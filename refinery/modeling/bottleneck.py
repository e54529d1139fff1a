"""Bottleneck adapters (Houlsby / Pfeiffer) for decoder-only transformers.

Why this exists: AdapterHub's `adapters` package does not support transformers 5, and peft has
LoRA/IA3/prompt methods but no bottleneck adapter. This module is standalone (torch, safetensors,
transformers only) so a folder it writes can be used without the rest of llm-refinery.

What it does: every matching `nn.Linear` is wrapped in a `BottleneckWrapped` holding `.base` (the
original Linear, frozen) and `.adapter`, which maps the Linear's output `h` to

    h + up(act(down(dropout(h))))        down: hidden -> bottleneck, up: bottleneck -> hidden

`up` is zero-initialised, so a freshly adapted model computes exactly what the base model does.
Placement (modules found by name suffix via `named_modules()`, so wrapped LMs work too):
  * houlsby  -- after the attention output (`self_attn.o_proj`) AND after the MLP (`mlp.down_proj`)
  * pfeiffer -- after the MLP (`mlp.down_proj`) only
Adapters are NOT mergeable into the base weights (the non-linearity sits between down and up):
they always stay as extra modules at inference time.

On-disk format ("llm-refinery-bottleneck-v1"), one folder, no pickle:
  * bottleneck_config.json -- {"bottleneck", "placement", "nonlinearity", "dropout",
                               "base_model_name_or_path", "format"}
  * bottleneck_model.safetensors -- adapter tensors only, keys as in `model.state_dict()`, e.g.
        model.layers.0.self_attn.o_proj.adapter.down.weight   (.down.bias, .up.weight, .up.bias)
Only adapter weights are saved: heads (e.g. a classification `score`) are not part of the folder.

Loading such a folder, for someone who has never seen this project (copy this one file, or
`from refinery.modeling.bottleneck import ...` inside llm-refinery):

    from bottleneck import load_model_with_adapters
    model = load_model_with_adapters("path/to/folder")            # base from the config
    model = load_model_with_adapters("path/to/folder", base_path="local/base", dtype="auto")
    # or, onto a model you already built:  load_adapters(model, "path/to/folder")

Notes: `add_adapters` freezes every base parameter (unfreeze heads yourself if you want them
trained); with gradient checkpointing call `model.enable_input_require_grads()`. To save the base
weights without adapters, `remove_adapters(model)` first (wrapping changes the base state-dict keys
to `...o_proj.base.weight`).
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

FORMAT = "llm-refinery-bottleneck-v1"
CONFIG_NAME = "bottleneck_config.json"
WEIGHTS_NAME = "bottleneck_model.safetensors"
ARG_KEYS = ("bottleneck", "placement", "nonlinearity", "dropout")
TARGETS = {"houlsby": ("self_attn.o_proj", "mlp.down_proj"), "pfeiffer": ("mlp.down_proj",)}
ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU}


class Bottleneck(nn.Module):
    """`h + up(act(down(dropout(h))))`, `up` zero-initialised (identity at init)."""

    def __init__(self, hidden: int, bottleneck: int, nonlinearity: str, dropout: float, **factory):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.down = nn.Linear(hidden, bottleneck, **factory)
        self.act = ACTIVATIONS[nonlinearity]()
        self.up = nn.Linear(bottleneck, hidden, **factory)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.up(self.act(self.down(self.dropout(h))))


class BottleneckWrapped(nn.Module):
    """An `nn.Linear` (`.base`) followed by a `Bottleneck` (`.adapter`) on its output."""

    def __init__(self, base: nn.Linear, adapter: Bottleneck):
        super().__init__()
        self.base = base
        self.adapter = adapter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.adapter(self.base(x))


def _args_dict(args: Any) -> dict[str, Any]:
    """AdapterArgs (pydantic), any object with the attributes, or a mapping -> validated dict."""
    if not isinstance(args, Mapping):
        args = args.model_dump() if hasattr(args, "model_dump") else {k: getattr(args, k) for k in ARG_KEYS}
    unknown = sorted(set(args) - set(ARG_KEYS))
    missing = [k for k in ARG_KEYS if k not in args]
    if unknown or missing:
        raise ValueError(f"bottleneck args: unknown keys {unknown}, missing keys {missing}")
    out = {"bottleneck": int(args["bottleneck"]), "placement": str(args["placement"]),
           "nonlinearity": str(args["nonlinearity"]), "dropout": float(args["dropout"])}
    if out["bottleneck"] <= 0 or out["placement"] not in TARGETS or out["nonlinearity"] not in ACTIVATIONS \
            or not 0 <= out["dropout"] < 1:
        raise ValueError(f"bottleneck args: invalid values {out} (placement in {list(TARGETS)}, "
                         f"nonlinearity in {list(ACTIVATIONS)}, bottleneck > 0, 0 <= dropout < 1)")
    return out


def _is_adapter_key(name: str) -> bool:
    return ".adapter." in f".{name}"


def add_adapters(model: nn.Module, args: Any) -> nn.Module:
    """Freeze all base params and wrap each targeted Linear's output with a trainable bottleneck."""
    cfg = _args_dict(args)
    if any(isinstance(m, BottleneckWrapped) for m in model.modules()):
        raise ValueError("model already has bottleneck adapters (call remove_adapters first)")
    suffixes = TARGETS[cfg["placement"]]
    targets = [(name, mod) for name, mod in model.named_modules()
               if isinstance(mod, nn.Linear) and any(name == s or name.endswith("." + s) for s in suffixes)]
    if not targets:
        raise ValueError(f"no nn.Linear modules named *{' / *'.join(suffixes)} in {type(model).__name__}")
    for p in model.parameters():
        p.requires_grad_(False)
    for name, lin in targets:
        w = lin.weight
        dtype = w.dtype if w.dtype.is_floating_point else torch.float32  # e.g. quantised bases
        adapter = Bottleneck(lin.out_features, cfg["bottleneck"], cfg["nonlinearity"], cfg["dropout"],
                             device=w.device, dtype=dtype)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, BottleneckWrapped(lin, adapter))
    model.bottleneck_config = cfg
    return model


def remove_adapters(model: nn.Module) -> nn.Module:
    """Unwrap every `BottleneckWrapped` back to its plain Linear (requires_grad is left as is)."""
    for name, mod in list(model.named_modules()):
        if isinstance(mod, BottleneckWrapped):
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, mod.base)
    if hasattr(model, "bottleneck_config"):
        del model.bottleneck_config
    return model


def trainable_adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every adapter tensor (the only trainable ones), keyed as in `model.state_dict()`."""
    return {k: v.detach() for k, v in model.state_dict().items() if _is_adapter_key(k)}


def has_adapters(folder: str | Path) -> bool:
    return (Path(folder) / CONFIG_NAME).is_file()


def save_adapters(model: nn.Module, folder: str | Path, base_model_name_or_path: str | None = None) -> None:
    """Write `bottleneck_config.json` + `bottleneck_model.safetensors` (adapter weights only)."""
    cfg = getattr(model, "bottleneck_config", None)
    if cfg is None:
        raise ValueError("model has no bottleneck adapters (add_adapters was not called)")
    base = base_model_name_or_path or getattr(getattr(model, "config", None), "_name_or_path", None) or None
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.cpu().contiguous() for k, v in trainable_adapter_state_dict(model).items()}
    save_file(tensors, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})
    meta = {**cfg, "base_model_name_or_path": base, "format": FORMAT}
    (folder / CONFIG_NAME).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")


def read_config(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / CONFIG_NAME
    if not path.is_file():
        raise ValueError(f"{folder}: no {CONFIG_NAME} (not a bottleneck-adapter folder)")
    cfg = json.loads(path.read_text())
    if cfg.get("format") != FORMAT:
        raise ValueError(f"{path}: format {cfg.get('format')!r}, expected {FORMAT!r}")
    return cfg


def load_adapters(model: nn.Module, folder: str | Path, trainable: bool = False) -> nn.Module:
    """Add adapters as configured in `folder` and load their weights (strict on keys and shapes)."""
    cfg = read_config(folder)
    try:
        args = _args_dict({k: v for k, v in cfg.items() if k not in ("base_model_name_or_path", "format")})
    except ValueError as e:
        raise ValueError(f"{Path(folder) / CONFIG_NAME}: {e}") from None
    weights = Path(folder) / WEIGHTS_NAME
    if not weights.is_file():
        raise ValueError(f"{folder}: no {WEIGHTS_NAME}")
    saved = load_file(str(weights))
    grads = {name: p.requires_grad for name, p in model.named_parameters()}
    add_adapters(model, args)
    try:
        _copy_checked(model, saved, folder)
    except ValueError:  # leave the model as it was
        remove_adapters(model)
        for name, p in model.named_parameters():
            p.requires_grad_(grads[name])
        raise
    for name, p in model.named_parameters():
        if _is_adapter_key(name):
            p.requires_grad_(trainable)
    return model


def _copy_checked(model: nn.Module, saved: dict[str, torch.Tensor], folder: str | Path) -> None:
    own = {k: v for k, v in model.state_dict().items() if _is_adapter_key(k)}
    missing, unexpected = sorted(set(own) - set(saved)), sorted(set(saved) - set(own))
    if missing or unexpected:
        kind, key = ("missing", missing[0]) if missing else ("unexpected", unexpected[0])
        raise ValueError(f"{folder}: adapter weights do not match the model: {len(missing)} missing, "
                         f"{len(unexpected)} unexpected keys (first {kind}: {key!r})")
    for key, tensor in sorted(saved.items()):
        if tensor.shape != own[key].shape:
            raise ValueError(f"{folder}: adapter weight {key!r} has shape {tuple(tensor.shape)}, "
                             f"the model expects {tuple(own[key].shape)}")
    with torch.no_grad():
        for key, tensor in saved.items():
            own[key].copy_(tensor)


def load_model_with_adapters(folder: str | Path, base_path: str | None = None, **from_pretrained_kwargs):
    """`AutoModelForCausalLM.from_pretrained(base)` + `load_adapters` (frozen, eval mode)."""
    from transformers import AutoModelForCausalLM

    base = base_path or read_config(folder).get("base_model_name_or_path")
    if not base:
        raise ValueError(f"{folder}: config names no base model; pass base_path=")
    model = AutoModelForCausalLM.from_pretrained(base, **from_pretrained_kwargs)
    return load_adapters(model, folder, trainable=False).eval()

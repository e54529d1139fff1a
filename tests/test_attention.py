"""`attn_implementation` (params/base.yaml): passed to every model a stage loads, validated by name, and a
kernel this machine cannot run is refused in one line before anything loads."""
import pytest

from refinery.config import load_params
from refinery.errors import UserError
from refinery.modeling.loading import attention_kwargs, load_causal_lm, load_scalar_model


def test_the_kernel_reaches_the_loaded_models(tiny_base):
    assert load_causal_lm(tiny_base).config._attn_implementation == "sdpa"  # null: transformers' default
    assert load_causal_lm(tiny_base, attn_implementation="eager").config._attn_implementation == "eager"
    scalar = load_scalar_model(tiny_base, attn_implementation="eager", num_labels=1)
    assert scalar.config._attn_implementation == "eager"


def test_unknown_or_unrunnable_kernels_are_refused(tmp_path, monkeypatch):
    import torch

    (tmp_path / "base.yaml").write_text("attn_implementation: flash\n")
    with pytest.raises(UserError, match="attn_implementation"):
        load_params("base", tmp_path)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match=r"^params/base.yaml: attn_implementation: flash_attention_2 needs a CUDA GPU"):
        attention_kwargs("flash_attention_2")
    assert attention_kwargs(None) == {} and attention_kwargs("sdpa") == {"attn_implementation": "sdpa"}

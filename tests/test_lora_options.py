"""LoRA options peft already has, exposed as params: DoRA and rank-stabilised scaling change the model peft
builds (not only a flag in a config file), and the trained adapter loads back with plain peft."""
import torch
from transformers import AutoModelForCausalLM

from refinery.config import DaptParams, LoraArgs
from refinery.modeling.methods import apply_method


def _lora_model(tiny_base, **opts):
    params = DaptParams(method="lora", lora=LoraArgs(r=4, alpha=8, dropout=0.0, **opts))
    return apply_method(AutoModelForCausalLM.from_pretrained(tiny_base), params)


def _scaling(model) -> float:
    layer = next(m for m in model.modules() if hasattr(m, "scaling") and isinstance(m.scaling, dict))
    return layer.scaling["default"]


def test_dora_adds_a_trainable_magnitude_and_rslora_changes_the_scale(tiny_base, tmp_path):
    plain, dora, rs = _lora_model(tiny_base), _lora_model(tiny_base, use_dora=True), _lora_model(tiny_base, use_rslora=True)
    names = [n for n, p in dora.named_parameters() if p.requires_grad]
    assert any("lora_magnitude_vector" in n for n in names)
    assert not any("lora_magnitude_vector" in n for n, _ in plain.named_parameters())
    assert _scaling(plain) == 8 / 4 and _scaling(rs) == 8 / 4 ** 0.5
    dora.save_pretrained(tmp_path / "adapter")
    from peft import PeftModel
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base), tmp_path / "adapter")
    assert loaded.peft_config["default"].use_dora
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, dora(ids).logits, atol=1e-5)

"""LoRA options peft already has, exposed as params: DoRA and rank-stabilised scaling change the model peft
builds (not only a flag in a config file), and the trained adapter loads back with plain peft."""
import pytest
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


def _train_a_step(model):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_pissa_and_olora_keep_the_model_at_init_and_save_a_plain_lora_delta(tiny_base, tmp_path, init):
    """PiSSA/OLoRA move the top of each weight into A·B and leave the residual in the frozen weight: before
    training the model computes what the base computes; after training, the merged model and the saved adapter
    on the *untouched* base (the conversion peft does on save) compute the same thing."""
    from peft import PeftModel

    from refinery.modeling.loading import save_output

    ids = torch.tensor([[1, 2, 3, 4, 5]])
    base = AutoModelForCausalLM.from_pretrained(tiny_base)
    model = _lora_model(tiny_base, init=init)
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, base(ids).logits, atol=1e-4)
    _train_a_step(model)
    with torch.no_grad():
        trained = model(ids).logits
        assert not torch.allclose(trained, base(ids).logits, atol=1e-3)  # it did learn something
    from transformers import AutoTokenizer

    save_output(model, AutoTokenizer.from_pretrained(tiny_base), "lora", tmp_path / "out", tiny_base)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    on_base = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base), tmp_path / "out" / "adapter")
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, trained, atol=1e-4)
        assert torch.allclose(on_base(ids).logits, trained, atol=1e-4)


def test_mutating_inits_are_refused_where_they_cannot_work():
    from refinery.config import PPOParams, QLoraArgs

    with pytest.raises(ValueError, match="PPO's reference is the policy with its adapter off"):
        PPOParams(method="lora", lora=LoraArgs(init="pissa"))
    PPOParams(method="lora", lora=LoraArgs(init="gaussian"))  # changes no frozen weight: fine
    with pytest.raises(ValueError, match="not supported with qlora"):
        QLoraArgs(init="olora")
    with pytest.raises(ValueError, match="with use_dora: true is not supported"):
        LoraArgs(init="pissa", use_dora=True)

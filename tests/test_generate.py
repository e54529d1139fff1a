"""Multi-tenancy: one base in memory, two LoRA adapters, answers switch with the adapter and match
loading each adapter on its own."""
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from refinery.ops.generate import MultiAdapterModel


def make_adapter(base_dir, out, seed):
    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model.save_pretrained(out)


def test_adapters_switch_without_reloading_the_base(tiny_base, tmp_path):
    make_adapter(tiny_base, tmp_path / "a", 1)
    make_adapter(tiny_base, tmp_path / "b", 2)
    server = MultiAdapterModel(tiny_base)
    base_module = server.base
    server.load("a", tmp_path / "a")
    server.load("b", tmp_path / "b")
    ids = torch.tensor([[5, 6, 7, 8]])

    def logits(adapter):
        server.model.set_adapter(adapter)
        with torch.no_grad():
            return server.model(input_ids=ids).logits

    la, lb = logits("a"), logits("b")
    assert not torch.allclose(la, lb)
    alone = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base), tmp_path / "a")
    with torch.no_grad():
        assert torch.allclose(alone(input_ids=ids).logits, la, atol=1e-5)
    assert server.model.get_base_model() is base_module  # one base, shared
    outs = {name: server.generate(["hello"], name, max_new_tokens=5)[0] for name in ("a", "b", None)}
    assert len(outs) == 3

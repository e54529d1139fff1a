"""Tests for refinery/modeling/bottleneck.py on a tiny random Llama (CPU, a few seconds)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

from refinery.config import AdapterArgs
from refinery.modeling.bottleneck import (
    CONFIG_NAME,
    FORMAT,
    WEIGHTS_NAME,
    BottleneckWrapped,
    add_adapters,
    has_adapters,
    load_adapters,
    load_model_with_adapters,
    remove_adapters,
    save_adapters,
    trainable_adapter_state_dict,
)

HIDDEN, LAYERS, B = 32, 2, 8
# one adapter: down = hidden*b + b = 32*8 + 8 = 264; up = b*hidden + hidden = 8*32 + 32 = 288 -> 552
PER_ADAPTER = 264 + 288
HOULSBY_PARAMS = LAYERS * 2 * PER_ADAPTER  # o_proj + down_proj per layer: 2 * 2 * 552 = 2208
PFEIFFER_PARAMS = LAYERS * 1 * PER_ADAPTER  # down_proj per layer: 2 * 552 = 1104


def tiny_config(**kw) -> LlamaConfig:
    base = dict(vocab_size=128, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=LAYERS,
                num_attention_heads=4, num_key_value_heads=2)
    return LlamaConfig(**{**base, **kw})


def tiny_lm(seed: int = 0, **kw) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_config(**kw)).eval()


def tiny_cls(seed: int = 0) -> LlamaForSequenceClassification:
    torch.manual_seed(seed)
    return LlamaForSequenceClassification(tiny_config(num_labels=1, pad_token_id=0)).eval()


@pytest.fixture
def batch() -> torch.Tensor:
    g = torch.Generator().manual_seed(123)
    return torch.randint(1, 128, (2, 12), generator=g)


def logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def n_trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def train_steps(model, ids, steps: int = 8) -> list[float]:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    return losses


def adapted_and_trained(ids, placement="houlsby") -> LlamaForCausalLM:
    model = add_adapters(tiny_lm(), AdapterArgs(bottleneck=B, placement=placement))
    train_steps(model, ids, steps=3)
    return model


# (1) zero-initialised `up`: the adapted model starts exactly equal to the base ----------------
@pytest.mark.parametrize("placement", ["houlsby", "pfeiffer"])
@pytest.mark.parametrize("nonlinearity", ["relu", "gelu", "silu"])
def test_identity_at_init(batch, placement, nonlinearity):
    expected = logits(tiny_lm(), batch)
    model = add_adapters(tiny_lm(), AdapterArgs(bottleneck=B, placement=placement, nonlinearity=nonlinearity))
    assert torch.equal(logits(model, batch), expected)
    assert model.bottleneck_config == {"bottleneck": B, "placement": placement,
                                       "nonlinearity": nonlinearity, "dropout": 0.0}


# (2) only adapter params trainable, count equals the hand-computed number --------------------
@pytest.mark.parametrize("placement,expected", [("houlsby", HOULSBY_PARAMS), ("pfeiffer", PFEIFFER_PARAMS)])
def test_only_adapters_trainable(placement, expected):
    model = add_adapters(tiny_lm(), AdapterArgs(bottleneck=B, placement=placement))
    assert n_trainable(model) == expected
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".adapter." in n for n in trainable)
    wrapped = sorted(n for n, m in model.named_modules() if isinstance(m, BottleneckWrapped))
    if placement == "houlsby":
        suffixes = ("mlp.down_proj", "self_attn.o_proj")
        assert wrapped == [f"model.layers.{i}.{s}" for i in range(LAYERS) for s in suffixes]
    else:
        assert wrapped == [f"model.layers.{i}.mlp.down_proj" for i in range(LAYERS)]
    assert "model.layers.0.mlp.down_proj.adapter.up.weight" in trainable


def test_accepts_plain_dict_and_rejects_bad_args():
    args = {"bottleneck": 4, "placement": "pfeiffer", "nonlinearity": "gelu", "dropout": 0.1}
    model = add_adapters(tiny_lm(), args)
    assert n_trainable(model) == LAYERS * (32 * 4 + 4 + 4 * 32 + 32)
    with pytest.raises(ValueError, match="already has bottleneck adapters"):
        add_adapters(model, AdapterArgs())
    with pytest.raises(ValueError, match="invalid values"):
        add_adapters(tiny_lm(), {**args, "placement": "middle"})
    with pytest.raises(ValueError, match="no nn.Linear modules"):
        add_adapters(nn.Sequential(nn.Linear(2, 2)), AdapterArgs())


# (3) training lowers the loss and leaves the base weights bit-identical ----------------------
def test_training_updates_only_adapters(batch):
    model = add_adapters(tiny_lm(), AdapterArgs(bottleneck=B))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    losses = train_steps(model, batch, steps=8)
    assert losses[-1] < losses[0] - 0.05, losses
    for n, p in model.named_parameters():
        if ".adapter." in n:
            continue
        assert torch.equal(p, before[n]), n
    assert not torch.equal(model.model.layers[0].mlp.down_proj.adapter.up.weight,
                           before["model.layers.0.mlp.down_proj.adapter.up.weight"])


# (4) save -> load into a fresh base gives identical logits; file holds only adapter keys -----
@pytest.mark.parametrize("placement", ["houlsby", "pfeiffer"])
def test_save_load_roundtrip(tmp_path, batch, placement):
    model = adapted_and_trained(batch, placement)
    expected = logits(model, batch)
    assert not torch.equal(expected, logits(tiny_lm(), batch))  # training did change something
    save_adapters(model, tmp_path / "ad", base_model_name_or_path="some/base")
    folder = tmp_path / "ad"
    assert has_adapters(folder) and not has_adapters(tmp_path)
    assert sorted(p.name for p in folder.iterdir()) == sorted([CONFIG_NAME, WEIGHTS_NAME])

    cfg = json.loads((folder / CONFIG_NAME).read_text())
    assert cfg == {"bottleneck": B, "placement": placement, "nonlinearity": "relu", "dropout": 0.0,
                   "base_model_name_or_path": "some/base", "format": FORMAT}
    with safe_open(str(folder / WEIGHTS_NAME), framework="pt") as f:
        keys = set(f.keys())
    assert keys == set(trainable_adapter_state_dict(model))
    assert all(".adapter." in k for k in keys)
    assert len(keys) == LAYERS * (2 if placement == "houlsby" else 1) * 4  # down/up weight+bias
    assert sum(torch.Size(t.shape).numel() for t in trainable_adapter_state_dict(model).values()) == (
        HOULSBY_PARAMS if placement == "houlsby" else PFEIFFER_PARAMS)

    fresh = load_adapters(tiny_lm(), folder)
    assert torch.equal(logits(fresh, batch), expected)
    assert n_trainable(fresh) == 0
    again = load_adapters(tiny_lm(), folder, trainable=True)
    assert n_trainable(again) == (HOULSBY_PARAMS if placement == "houlsby" else PFEIFFER_PARAMS)
    assert all(".adapter." in n for n, p in again.named_parameters() if p.requires_grad)


def test_load_model_with_adapters_from_base_folder(tmp_path, batch):
    tiny_lm().save_pretrained(tmp_path / "base")
    base = LlamaForCausalLM.from_pretrained(tmp_path / "base")
    model = add_adapters(base, AdapterArgs(bottleneck=B))
    train_steps(model, batch, steps=2)
    save_adapters(model, tmp_path / "ad")  # base path taken from model.config._name_or_path
    saved_cfg = json.loads((tmp_path / "ad" / CONFIG_NAME).read_text())
    assert saved_cfg["base_model_name_or_path"] == str(tmp_path / "base")
    loaded = load_model_with_adapters(tmp_path / "ad")
    assert not loaded.training and n_trainable(loaded) == 0
    assert torch.equal(logits(loaded, batch), logits(model, batch))
    explicit = load_model_with_adapters(tmp_path / "ad", base_path=str(tmp_path / "base"),
                                        dtype=torch.float32)
    assert torch.equal(logits(explicit, batch), logits(model, batch))


def test_save_without_adapters_and_missing_base(tmp_path, batch):
    with pytest.raises(ValueError, match="no bottleneck adapters"):
        save_adapters(tiny_lm(), tmp_path / "x")
    save_adapters(add_adapters(tiny_lm(), AdapterArgs(bottleneck=B)), tmp_path / "ad")
    assert json.loads((tmp_path / "ad" / CONFIG_NAME).read_text())["base_model_name_or_path"] is None
    with pytest.raises(ValueError, match="names no base model"):
        load_model_with_adapters(tmp_path / "ad")


# (5) a mismatching config or model is a clear error, and leaves the model untouched ----------
def _rewrite_config(folder, **changes):
    cfg = json.loads((folder / CONFIG_NAME).read_text())
    (folder / CONFIG_NAME).write_text(json.dumps({**cfg, **changes}))


def test_mismatch_errors(tmp_path, batch):
    folder = tmp_path / "ad"
    save_adapters(adapted_and_trained(batch), folder)

    _rewrite_config(folder, bottleneck=16)
    target = tiny_lm()
    bad_key = r"'model\.layers\.0\.mlp\.down_proj\.adapter\.down\.bias'"
    with pytest.raises(ValueError, match=rf"ad: adapter weight {bad_key} "
                       r"has shape \(8,\), the model expects \(16,\)"):
        load_adapters(target, folder)
    assert not any(isinstance(m, BottleneckWrapped) for m in target.modules())  # unwrapped again
    assert not hasattr(target, "bottleneck_config")
    assert all(p.requires_grad for p in target.parameters())  # requires_grad restored
    assert torch.equal(logits(target, batch), logits(tiny_lm(), batch))

    _rewrite_config(folder, bottleneck=B, placement="pfeiffer")
    bad_key = r"'model\.layers\.0\.self_attn\.o_proj\.adapter"
    with pytest.raises(ValueError, match=rf"ad: .*unexpected.*first unexpected: {bad_key}"):
        load_adapters(tiny_lm(), folder)

    _rewrite_config(folder, placement="houlsby")
    # layer 2 has 2 adapters x 4 tensors (down/up weight+bias) that the folder lacks
    with pytest.raises(ValueError, match=r"ad: .*8 missing.*first missing: 'model\.layers\.2\."):
        load_adapters(tiny_lm(num_hidden_layers=3), folder)

    _rewrite_config(folder, bottleneck=B, nonlinearity="tanh")
    with pytest.raises(ValueError, match="bottleneck_config.json: .*invalid values"):
        load_adapters(tiny_lm(), folder)

    _rewrite_config(folder, nonlinearity="relu", format="adapterhub")
    with pytest.raises(ValueError, match="format 'adapterhub'"):
        load_adapters(tiny_lm(), folder)

    with pytest.raises(ValueError, match="not a bottleneck-adapter folder"):
        load_adapters(tiny_lm(), tmp_path)


# (6) remove_adapters restores plain Linear modules and base outputs --------------------------
def test_remove_adapters_restores_base(batch):
    base_sd = tiny_lm().state_dict()
    model = adapted_and_trained(batch)
    assert not torch.equal(logits(model, batch), logits(tiny_lm(), batch))
    remove_adapters(model)
    assert not hasattr(model, "bottleneck_config")
    assert not any(isinstance(m, BottleneckWrapped) for m in model.modules())
    assert type(model.model.layers[0].self_attn.o_proj) is nn.Linear
    assert type(model.model.layers[1].mlp.down_proj) is nn.Linear
    sd = model.state_dict()
    assert sorted(sd) == sorted(base_sd) and all(torch.equal(sd[k], base_sd[k]) for k in sd)
    assert torch.equal(logits(model, batch), logits(tiny_lm(), batch))


# (7) a wrapped LM: LlamaForSequenceClassification --------------------------------------------
def test_sequence_classification(tmp_path, batch):
    expected = logits(tiny_cls(), batch)
    model = add_adapters(tiny_cls(), AdapterArgs(bottleneck=B))
    assert torch.equal(logits(model, batch), expected)
    assert n_trainable(model) == HOULSBY_PARAMS  # the score head is frozen too

    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    target = torch.tensor([1.0, -1.0])
    for _ in range(3):
        loss = nn.functional.mse_loss(model(input_ids=batch).logits.squeeze(-1), target)
        opt.zero_grad()
        loss.backward()
        assert model.model.layers[1].mlp.down_proj.adapter.up.weight.grad is not None
        opt.step()
    model.eval()
    trained = logits(model, batch)
    assert not torch.equal(trained, expected)

    save_adapters(model, tmp_path / "cls")
    assert torch.equal(logits(load_adapters(tiny_cls(), tmp_path / "cls"), batch), trained)
    assert torch.equal(logits(remove_adapters(model), batch), expected)

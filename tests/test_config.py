"""Params validation: every mistake is one line naming the file and the key, before anything runs."""
import pytest
import torch

from refinery.config import load_params
from refinery.errors import UserError
from refinery.modeling.methods import get_method


def write(tmp_path, name, text):
    (tmp_path / name).write_text(text)
    return tmp_path


def err(stage, params_dir, **kw) -> str:
    with pytest.raises(UserError) as info:
        load_params(stage, params_dir, **kw)
    msg = str(info.value)
    assert "\n" not in msg
    return msg


def test_repo_params_all_load():
    for stage in ("base", "base_model", "prepare", "dapt"):
        load_params(stage)


def test_typo_key_names_file_and_key(tmp_path):
    write(tmp_path, "dapt.yaml", "method: lora\ntraining:\n  max_step: 3\n")
    msg = err("dapt", tmp_path)
    assert "dapt.yaml" in msg and "training.max_step" in msg and "unknown key" in msg


def test_wrong_type_and_negative_lr(tmp_path):
    write(tmp_path, "dapt.yaml", "training:\n  lr: -0.1\n")
    assert "training.lr" in err("dapt", tmp_path)
    write(tmp_path, "dapt.yaml", "block_size: lots\n")
    assert "block_size" in err("dapt", tmp_path)


def test_unknown_method_lists_known_ones(tmp_path):
    write(tmp_path, "dapt.yaml", "method: loraa\n")
    msg = err("dapt", tmp_path)
    assert "unknown method 'loraa'" in msg and "ptuning_v2" in msg


def test_missing_file_and_bad_yaml(tmp_path):
    assert "not found" in err("dapt", tmp_path)
    write(tmp_path, "dapt.yaml", "method: [lora\n")
    assert "not valid YAML" in err("dapt", tmp_path)


def test_overrides_are_validated(tmp_path):
    write(tmp_path, "dapt.yaml", "method: lora\n")
    assert load_params("dapt", tmp_path, {"training.lr": 0.01}).training.lr == 0.01
    assert "training.lr" in err("dapt", tmp_path, overrides={"training.lr": "fast"})


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_qlora_refused_without_cuda(tmp_path):
    write(tmp_path, "dapt.yaml", "method: qlora\n")
    with pytest.raises(UserError, match="needs a CUDA GPU"):
        get_method(load_params("dapt", tmp_path), "params/dapt.yaml")


def test_qlora_loads_the_frozen_base_in_4bit_nf4(tmp_path):
    """What from_pretrained is given for a QLoRA stage (the 4-bit training itself runs in bench/gpu_check.py on a
    GPU): NF4 with double quantisation and bf16 compute, on this rank's GPU; nothing for other methods."""
    from refinery.modeling.methods import quantization_kwargs

    write(tmp_path, "dapt.yaml", "method: qlora\nqlora: {quant_type: fp4, double_quant: false}\n")
    kw = quantization_kwargs(load_params("dapt", tmp_path))
    q = kw["quantization_config"]
    assert q.load_in_4bit and q.bnb_4bit_quant_type == "fp4" and not q.bnb_4bit_use_double_quant
    assert q.bnb_4bit_compute_dtype == torch.bfloat16 and kw["device_map"] == {"": 0}
    write(tmp_path, "dapt.yaml", "method: lora\n")
    assert quantization_kwargs(load_params("dapt", tmp_path)) == {}

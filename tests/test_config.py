"""Params validation: every mistake is one line naming the file and the key, before anything runs."""
import pytest
import torch

from tasks.config import load_params
from tasks.errors import UserError
from tasks.methods import get_method


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

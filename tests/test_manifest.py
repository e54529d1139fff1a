"""Output manifests: `python -m refinery.modeling.manifest verify <dir>` accepts an output as written and rejects
one whose files changed since; `check_same_tokenizer` refuses a model whose tokenizer or chat template differs
from the one a stage uses. (tests/test_ops_cli.py verifies real stage outputs of a pipeline run the same way.)"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from refinery.errors import UserError
from refinery.modeling.loading import load_tokenizer
from refinery.modeling.manifest import MANIFEST, build_manifest, check_same_tokenizer, tokenizer_fingerprint, write_manifest

REPO = Path(__file__).resolve().parents[1]
MODULE = "refinery.modeling.manifest"


def verify(folder: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", MODULE, "verify", str(folder)], capture_output=True, text=True,
                          timeout=60, env={**os.environ, "PYTHONPATH": str(REPO)})


@pytest.fixture(scope="module")
def written(tiny_base, tmp_path_factory) -> Path:
    """A model folder with the manifest a stage writes (same function, same fields)."""
    out = tmp_path_factory.mktemp("manifest") / "model"
    shutil.copytree(tiny_base, out)
    manifest = build_manifest("dapt", out, params={"lr": 0.003}, inputs={"model": tiny_base},
                              tokenizer_hash=tokenizer_fingerprint(load_tokenizer(tiny_base)), seed=42)
    write_manifest(out, manifest)
    return out


@pytest.fixture
def output(written, tmp_path) -> Path:
    """A private copy of the written output, free to tamper with."""
    return Path(shutil.copytree(written, tmp_path / "model"))


def test_untouched_output_verifies(output):
    proc = verify(output)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "matches its manifest" in proc.stdout and "stage dapt" in proc.stdout


def flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))


TAMPER = {
    "weights byte flipped": lambda d: flip_last_byte(d / "model.safetensors"),
    "config edited": lambda d: (d / "config.json").write_text(
        json.dumps({**json.loads((d / "config.json").read_text()), "rms_norm_eps": 1e-3})),
    "tokenizer file removed": lambda d: (d / "tokenizer.json").unlink(),
    "file added": lambda d: (d / "extra.bin").write_bytes(b"\0"),
    "file renamed": lambda d: (d / "config.json").rename(d / "config.json.bak"),
}


@pytest.mark.parametrize("change", sorted(TAMPER))
def test_tampered_output_fails(output, change):
    TAMPER[change](output)
    proc = verify(output)
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "contents changed since the manifest was written" in proc.stdout + proc.stderr
    assert "matches" not in proc.stdout


def test_tampered_output_names_the_file(output):
    flip_last_byte(output / "model.safetensors")
    proc = verify(output)
    assert proc.returncode != 0
    assert "model.safetensors" in proc.stdout + proc.stderr


def test_folder_without_manifest_fails(output):
    (output / MANIFEST).unlink()
    proc = verify(output)
    assert proc.returncode != 0 and f"no {MANIFEST}" in proc.stdout + proc.stderr


@pytest.mark.bad_input
def test_verify_without_a_folder_prints_usage():
    proc = subprocess.run([sys.executable, "-m", MODULE, "verify"], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 2 and "usage:" in proc.stderr and "Traceback" not in proc.stderr


def test_same_tokenizer_passes(written, tiny_base):
    tok = load_tokenizer(tiny_base)
    recorded = json.loads((written / MANIFEST).read_text())["tokenizer_hash"]
    assert check_same_tokenizer(tok, {"sft": written, "reward": written}) == recorded


@pytest.mark.bad_input
def test_different_chat_template_is_refused(written, tiny_base):
    tok = load_tokenizer(tiny_base)
    tok.chat_template = tok.chat_template.replace("<|im_start|>", "<|im_start|> ", 1)  # same vocabulary
    with pytest.raises(UserError) as info:
        check_same_tokenizer(tok, {"sft": written})
    msg = str(info.value)
    assert "\n" not in msg and str(written) in msg and "chat template" in msg and "sft" in msg


@pytest.mark.bad_input
def test_different_special_tokens_are_refused(written, tiny_base):
    tok = load_tokenizer(tiny_base)
    tok.add_special_tokens({"additional_special_tokens": ["<|tool|>"]})
    with pytest.raises(UserError, match="tokenizer/chat template differs"):
        check_same_tokenizer(tok, {"reward": written})

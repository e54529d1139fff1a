"""Hashes that tie an output to what made it: data, params, input model, tokenizer/chat template.

Each stage output folder carries `refinery_manifest.json`; `python -m refinery.modeling.manifest verify <dir>`
re-derives the output hash and says whether the folder is what its manifest claims.
"""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from importlib import metadata
from pathlib import Path

MANIFEST = "refinery_manifest.json"
PACKAGES = ("torch", "transformers", "peft", "prefect", "mlflow", "dvc", "safetensors", "datasets")


def hash_file(path: Path, h=None) -> str:
    h = h or hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def hash_path(path: str | Path, exclude: tuple[str, ...] = (MANIFEST,)) -> str:
    """sha256 over a file, or over a folder's relative names and contents (sorted)."""
    path = Path(path)
    if path.is_file():
        return hash_file(path)
    return hash_folder(path, exclude, per_file=False)[0]


def hash_folder(folder: Path, exclude: tuple[str, ...] = (MANIFEST,),
                per_file: bool = True) -> tuple[str, dict[str, str]]:
    """(hash_path of the folder, {relative name: sha256 of that file}), reading each file once: a manifest
    needs both, and a model folder is hundreds of MB."""
    whole, files = hashlib.sha256(), {}
    for f in sorted(p for p in folder.rglob("*") if p.is_file() and p.name not in exclude):
        name = str(f.relative_to(folder))
        whole.update(name.encode())
        one = hashlib.sha256() if per_file else None
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                whole.update(chunk)
                if one is not None:
                    one.update(chunk)
        if one is not None:
            files[name] = one.hexdigest()
    return whole.hexdigest(), files


def hash_obj(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    """Vocabulary + special tokens + chat template: what SFT, reward and PPO must agree on."""
    vocab = tokenizer.get_vocab()
    payload = {
        "vocab": hashlib.sha256(json.dumps(sorted(vocab.items())).encode()).hexdigest(),
        "special": {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())},
        "chat_template": tokenizer.chat_template or "",
    }
    return hash_obj(payload)[:16]


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def package_versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0]}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def build_manifest(stage: str, out_dir: Path, *, params: dict, inputs: dict[str, str | Path],
                   tokenizer_hash: str | None, seed: int | None) -> dict:
    output_hash, files = hash_folder(Path(out_dir))
    return {
        "stage": stage,
        "params_hash": hash_obj(params),
        "inputs": {name: hash_path(p) for name, p in sorted(inputs.items())},
        "tokenizer_hash": tokenizer_hash,
        "seed": seed,
        "packages": package_versions(),
        "git_commit": git_commit(),
        "output_hash": output_hash,
        "files": files,  # per file as well, so `verify` can name what changed, not only that something did
    }


def changed_files(recorded: dict[str, str], actual: dict[str, str]) -> str:
    """`model.safetensors changed, extra.bin added`: what differs between two {file: sha256} maps."""
    parts = [f"{f} changed" for f in sorted(recorded.keys() & actual.keys()) if recorded[f] != actual[f]]
    parts += [f"{f} missing" for f in sorted(recorded.keys() - actual.keys())]
    parts += [f"{f} added" for f in sorted(actual.keys() - recorded.keys())]
    return ", ".join(parts)


def write_manifest(out_dir: Path, manifest: dict) -> None:
    (Path(out_dir) / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def read_manifest(folder: str | Path) -> dict | None:
    path = Path(folder) / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else None


def verify(folder: str | Path) -> tuple[bool, str]:
    manifest = read_manifest(folder)
    if manifest is None:
        return False, f"{folder}: no {MANIFEST}"
    actual, files = hash_folder(Path(folder))
    if actual != manifest.get("output_hash"):
        recorded = manifest.get("output_hash", "")[:12]
        which = changed_files(manifest["files"], files) if "files" in manifest else ""
        return False, (f"{folder}: contents changed since the manifest was written ({actual[:12]} != {recorded})"
                       + (f": {which}" if which else ""))
    return True, f"{folder}: matches its manifest ({actual[:12]}, stage {manifest.get('stage')})"


def check_same_tokenizer(tokenizer, folders: dict[str, str | Path]) -> str:
    """Refuse inputs whose recorded tokenizer/chat-template hash differs from the tokenizer in use."""
    from refinery.errors import UserError

    mine = tokenizer_fingerprint(tokenizer)
    for name, folder in folders.items():
        recorded = (read_manifest(folder) or {}).get("tokenizer_hash")
        if recorded is not None and recorded != mine:
            raise UserError(f"{folder}: tokenizer/chat template differs from the one this stage uses "
                            f"({recorded} != {mine}); the {name} model must come from the same tokenizer and "
                            "template (rerun the upstream stages)")
    return mine


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "verify":
        print("usage: python -m refinery.modeling.manifest verify <folder>", file=sys.stderr)
        raise SystemExit(2)
    ok, msg = verify(sys.argv[2])
    print(msg)
    raise SystemExit(0 if ok else 1)

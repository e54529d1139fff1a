"""The parts of dvc.yaml that come from params files: what `prepare` reads (params/prepare.yaml `datasets`), a
local base-model folder (params/base_model.yaml `path`), and which alignment stages exist (params/pipeline.yaml
`alignment`: refinery/ops/dvc_alignment.py writes their blocks and the report's deps).

DVC's own templating (`${...}` from a vars file) cannot list a dict of user-named SFT tasks whose entries are
a path or a {path, format, ...} block, so these deps are written into dvc.yaml by `sync` instead:
    python -m refinery.ops.dvc_deps          # rewrite them from the params files (comments kept)
    python -m refinery.ops.dvc_deps --check  # exit 2 naming what is missing
`flows.pipeline` syncs before it runs DVC; `flows.prepare` and `flows.base_model` refuse to run (exit 2,
before anything is written) when dvc.yaml misses what they are about to read, so a plain `dvc repro` never
builds from a file DVC does not watch. Hub names (datasets or models) are no file deps: their resolved
revision is recorded in the prepare report / the model manifest, which dvc.lock hashes.
"""
from __future__ import annotations

import argparse
import io
import re
import sys
from pathlib import Path

from refinery.errors import UserError

DATA_DEPS_FROM = {"prepare": "params/prepare.yaml datasets", "base_model": "params/base_model.yaml path"}


def _rel(path: str, root: Path, may_be_hub: bool = True) -> str | None:
    """A local path as dvc.yaml writes it (relative to the repository root), or None for a hub name."""
    from refinery.data.formats import is_hub_name

    if may_be_hub and is_hub_name(path) and not (root / path).exists():
        return None
    p = Path(path)
    if p.is_absolute():
        try:
            return p.resolve().relative_to(root.resolve()).as_posix()
        except ValueError:
            return p.as_posix()  # outside the repository: DVC accepts absolute deps
    return p.as_posix()


def expected_deps(root: str | Path = ".", params_dir: str = "params") -> dict[str, list[str]]:
    """Stage -> the local paths its params say it reads."""
    from refinery.config import load_params
    from refinery.data.formats import to_source

    root = Path(root)
    out: dict[str, list[str]] = {}
    ds = load_params("prepare", root / params_dir).datasets
    paths = [to_source(src).path for src, _ in ds.sources().values()]
    out["prepare"] = sorted({r for r in (_rel(p, root) for p in paths) if r})
    bm = load_params("base_model", root / params_dir)
    out["base_model"] = [_rel(bm.path, root, may_be_hub=False)] if bm.source == "local" and bm.path else []
    return out


def _yaml():
    from ruamel.yaml import YAML

    y = YAML()
    y.preserve_quotes = True
    y.width = 120
    y.indent(mapping=2, sequence=4, offset=2)
    return y


def declared_deps(root: str | Path = ".") -> dict[str, list[str]]:
    doc = _yaml().load((Path(root) / "dvc.yaml").read_text())
    return {stage: [str(d) for d in doc["stages"][stage].get("deps", [])] for stage in DATA_DEPS_FROM}


def missing(root: str | Path = ".", params_dir: str = "params", stage: str | None = None) -> list[tuple[str, str]]:
    """(stage, path) for every path a stage reads that dvc.yaml does not list (a listed folder covers its files)."""
    exp, dec = expected_deps(root, params_dir), declared_deps(root)
    out = []
    for st in ([stage] if stage else DATA_DEPS_FROM):
        for path in exp[st]:
            if not any(path == d or path.startswith(d.rstrip("/") + "/") for d in dec[st]):
                out.append((st, path))
    return out


def check_stage(stage: str, root: str | Path = ".", params_dir: str = "params") -> None:
    """Refuse to run `stage` when dvc.yaml misses a path its params make it read (no dvc.yaml: nothing to check)."""
    if not (Path(root) / "dvc.yaml").is_file():
        return
    gaps = missing(root, params_dir, stage)
    if gaps:
        paths = ", ".join(p for _, p in gaps)
        raise UserError(f"dvc.yaml: stage {stage} does not depend on {paths} ({DATA_DEPS_FROM[stage]}), so DVC would "
                        f"not rebuild when it changes: run `python -m refinery.ops.dvc_deps` to add it")


def alignment_drift(root: str | Path = ".", params_dir: str = "params") -> list[str]:
    """What `sync` would change in dvc.yaml's alignment stages and report deps (nothing is written)."""
    from refinery.config import load_params
    from refinery.ops.dvc_alignment import sync_stages

    doc = _yaml().load((Path(root) / "dvc.yaml").read_text())
    return sync_stages(doc["stages"], load_params("pipeline", Path(root) / params_dir).alignment)


def sync(root: str | Path = ".", params_dir: str = "params") -> list[str]:
    """Rewrite the params-derived parts of dvc.yaml (code deps and comments kept); returns what changed."""
    root = Path(root)
    y = _yaml()
    doc = y.load((root / "dvc.yaml").read_text())
    exp = expected_deps(root, params_dir)
    changes = []
    for stage in DATA_DEPS_FROM:
        deps = doc["stages"][stage]["deps"]
        # code and model deps stay; data deps (anything under data/ or outside the code folders) are replaced
        keep = [d for d in deps if str(d).startswith(("flows/", "refinery/", "models/"))]
        new = keep + [p for p in exp[stage] if p not in keep]
        if [str(d) for d in deps] != new:
            changes.append(f"{stage}: deps {sorted(set(map(str, deps)) ^ set(new))}")
            deps.clear()
            deps.extend(new)
    from refinery.config import load_params
    from refinery.ops.dvc_alignment import sync_stages

    changes += sync_stages(doc["stages"], load_params("pipeline", root / params_dir).alignment)
    if changes:
        buf = io.StringIO()
        y.dump(doc, buf)
        (root / "dvc.yaml").write_text(re.sub(r"\n{3,}", "\n\n", buf.getvalue()))  # one blank line between blocks
    return changes


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m refinery.ops.dvc_deps", description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="only check; exit 2 naming what dvc.yaml misses")
    ap.add_argument("--params-dir", default="params")
    args = ap.parse_args(argv)
    try:
        if args.check:
            gaps = [f"{s}: {p}" for s, p in missing(".", args.params_dir)] + alignment_drift(".", args.params_dir)
            if gaps:
                print(f"error: dvc.yaml misses {', '.join(gaps)}: run `python -m refinery.ops.dvc_deps`",
                      file=sys.stderr)
                return 2
            print("dvc.yaml lists every path the params make prepare and base_model read, and the alignment "
                  "stages params/pipeline.yaml selects")
            return 0
        changes = sync(".", args.params_dir)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print("\n".join(f"dvc.yaml updated: {c}" for c in changes) or "dvc.yaml already up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The stage order, read from dvc.yaml (defined once, there) through DVC's own graph."""
from __future__ import annotations

from pathlib import Path


def stage_order(root: str | Path = ".") -> list[str]:
    """Topological order of dvc.yaml's stages; ties broken by their order in the file."""
    import networkx as nx
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        graph = repo.index.graph  # edges: stage -> the stages it depends on
        position = {s.addressing: i for i, s in enumerate(repo.index.stages)}
        deps_first = graph.reverse(copy=True)
        order = nx.lexicographical_topological_sort(deps_first, key=lambda s: position[s.addressing])
        return [s.addressing for s in order]


def stage_status(name: str, root: str | Path = ".") -> dict:
    """DVC's view of one stage: {} when it is up to date, else what changed."""
    return pipeline_status([name], root)


def pipeline_status(stages: list[str], root: str | Path = ".") -> dict:
    """DVC's view of several stages at once, from one Repo: {} when every one is up to date."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        return repo.status(targets=stages)


def flow_name(stage: str) -> str:
    """The Prefect flow each stage's command runs (its `@flow(name=...)`): the stage's own name, for every
    stage; tests/test_pipeline.py checks them."""
    return stage


def locked_stage_hash(name: str, root: str | Path = ".") -> str | None:
    """A hash of what DVC compares to decide a stage is up to date: its command, its deps' md5s and its
    params values as recorded in dvc.lock (outs left out). None if the stage is not in dvc.lock yet."""
    import hashlib
    import json

    import yaml

    lock = Path(root) / "dvc.lock"
    if not lock.is_file():
        return None
    entry = ((yaml.safe_load(lock.read_text()) or {}).get("stages") or {}).get(name)
    if not entry:
        return None
    key = {"cmd": entry.get("cmd"), "params": entry.get("params", {}),
           "deps": sorted((d["path"], d.get("md5") or d.get("hash")) for d in entry.get("deps", []))}
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()


def locked_out_hash(path: str | Path, root: str | Path = ".") -> str | None:
    """DVC's md5 of the stage output that holds `path` (itself or a folder above it), from dvc.lock."""
    import yaml

    lock = Path(root) / "dvc.lock"
    if not lock.is_file():
        return None
    target = Path(path)
    for entry in ((yaml.safe_load(lock.read_text()) or {}).get("stages") or {}).values():
        for out in entry.get("outs", []):
            if target == Path(out["path"]) or Path(out["path"]) in target.parents:
                return out.get("md5") or out.get("hash")
    return None

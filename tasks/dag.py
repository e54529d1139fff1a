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
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        return repo.status(targets=[name])

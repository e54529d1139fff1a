"""The one decorator for the Prefect tasks of this project.

Prefect's task caching is off everywhere: DVC decides what is up to date (dvc.lock), and a second skip
mechanism could skip work DVC asked for."""
from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE


def uncached_task(fn=None, **kwargs):
    """`@uncached_task` or `@uncached_task(retries=2, ...)`: a Prefect @task with cache_policy=NO_CACHE."""
    if fn is None:
        return lambda f: task(f, cache_policy=NO_CACHE, **kwargs)
    return task(fn, cache_policy=NO_CACHE, **kwargs)

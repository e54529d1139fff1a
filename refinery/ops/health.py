"""The one server health check (MLflow tracking server, Prefect API): does `<base>/health` answer?"""
from __future__ import annotations

import urllib.request


def server_answers(base_url: str, timeout: float = 5.0) -> bool:
    """True when GET <base_url>/health returns a non-5xx status within `timeout` seconds."""
    try:
        with urllib.request.urlopen(f"{str(base_url).rstrip('/')}/health", timeout=timeout) as resp:
            return resp.status < 500
    except Exception:
        return False

"""User-facing errors: one line, naming the file/line/field, no traceback."""
from __future__ import annotations

import functools
import sys
from typing import Callable, TypeVar

F = TypeVar("F", bound=Callable)


class UserError(Exception):
    """Bad input from the user (data, params, paths). Printed as one line, exit code 2."""


def where(path, line: int | None = None, field: str | None = None, row: int | None = None) -> str:
    """`file:line: field 'x'` prefix used by every data/params error (`file: row N: ...` without lines)."""
    out = str(path)
    if line is not None:
        out += f":{line}"
    elif row is not None:
        out += f": row {row}"
    if field is not None:
        out += f": field '{field}'"
    return out


def exit_on_user_error(fn: F) -> F:
    """Wrap a CLI entry point: a UserError becomes `error: <message>` on stderr and exit 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as exc:
            print(f"error: {exc}", file=sys.stderr)
            raise SystemExit(2) from None

    return wrapper  # type: ignore[return-value]

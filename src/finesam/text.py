"""Wording shared by error messages."""

import re
from collections.abc import Sequence


def listing(items: Sequence[object], limit: int = 8) -> str:
    """`a, b, c` or, past `limit` items, `a, b, ... (N more)`: error messages name offenders without flooding."""
    shown = ", ".join(str(item) for item in items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


NAME_CHARACTERS = "letters, digits, '_', '-' and '.' (not first), at most 64"
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}")


def check_name(name: object, what: str) -> str:
    """`name` if it is safe as a file name and as a table key (no path separators, no `+`, no `..`), else
    `ValueError` saying what `what` may be called."""
    if not isinstance(name, str) or not _NAME.fullmatch(name) or ".." in name:
        raise ValueError(f"{what} {name!r} is not a valid name: use {NAME_CHARACTERS}")
    return name

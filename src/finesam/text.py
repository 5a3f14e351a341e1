"""Wording shared by error messages."""

from collections.abc import Sequence


def listing(items: Sequence[object], limit: int = 8) -> str:
    """`a, b, c` or, past `limit` items, `a, b, ... (N more)`: error messages name offenders without flooding."""
    shown = ", ".join(str(item) for item in items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")

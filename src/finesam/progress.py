"""One progress bar for every long job: tqdm on stderr, shown only to a person watching a terminal.

`FINESAM_PROGRESS=1` shows bars on a stderr that is not a terminal too (logs, tests); `quiet=True` (the CLI's
`--quiet`) hides them always.
"""

import os
import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm import tqdm

T = TypeVar("T")


def shown(quiet: bool = False) -> bool:
    """Whether progress bars are drawn."""
    if quiet:
        return False
    return sys.stderr.isatty() or os.environ.get("FINESAM_PROGRESS") == "1"


def progress_bar(
    total: int | None, description: str, unit: str = "it", *, initial: int = 0, quiet: bool = False
) -> tqdm:
    """A bar to `update(n)` by hand; `unit="B"` counts bytes (shown in kB / MB / GB)."""
    in_bytes = unit == "B"
    return tqdm(
        total=total,
        initial=initial,
        desc=description,
        unit=unit,
        unit_scale=in_bytes,
        unit_divisor=1000,
        file=sys.stderr,
        disable=not shown(quiet),
        dynamic_ncols=True,
        mininterval=0.2,
    )


def progress(items: Iterable[T], description: str, total: int | None = None, *, quiet: bool = False) -> Iterator[T]:
    """`items`, with a bar advancing as they are consumed."""
    with progress_bar(total if total is not None else _length(items), description, quiet=quiet) as bar:
        for item in items:
            yield item
            bar.update(1)


def _length(items: Iterable[object]) -> int | None:
    try:
        return len(items)  # type: ignore[arg-type]
    except TypeError:
        return None

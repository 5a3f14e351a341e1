"""Images decoded ahead of the model: the encoder never waits on JPEG decoding."""

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

Job = TypeVar("Job")
Loaded = TypeVar("Loaded")


def prefetched(
    jobs: Iterable[Job], load: Callable[[Job], Loaded], ahead: int = 2
) -> Iterator[tuple[Job, Loaded | ValueError]]:
    """Each job with what `load` made of it, loaded `ahead` jobs in advance on a thread (decoders release the
    GIL); a `ValueError` of `load` (an unreadable image) is handed over in place of the result."""

    def attempt(job: Job) -> Loaded | ValueError:
        try:
            return load(job)
        except ValueError as e:
            return e

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="finesam-decode") as pool:
        waiting: deque[tuple[Job, Future[Loaded | ValueError]]] = deque()
        for job in jobs:
            waiting.append((job, pool.submit(attempt, job)))
            if len(waiting) > ahead:
                first, future = waiting.popleft()
                yield first, future.result()
        while waiting:
            first, future = waiting.popleft()
            yield first, future.result()

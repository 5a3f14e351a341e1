"""Images decoded ahead of the model: the encoder never waits on JPEG decoding."""

import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

Job = TypeVar("Job")
Loaded = TypeVar("Loaded")

_END = object()  # the worker's last item: every job was loaded


def prefetched(
    jobs: Iterable[Job], load: Callable[[Job], Loaded], ahead: int = 2
) -> Iterator[tuple[Job, Loaded | ValueError]]:
    """Each job with what `load` made of it, loaded `ahead` jobs in advance on a thread (decoders release the
    GIL); a `ValueError` of `load` (an unreadable image) is handed over in place of the result.

    The thread is a daemon: a load that never returns (a file system that hangs) cannot keep the process
    alive after the consumer stops, so Ctrl-C ends a run at once.
    """
    ready: queue.Queue[object] = queue.Queue(maxsize=max(1, ahead))
    stop = threading.Event()

    def put(item: object) -> bool:
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        for job in jobs:
            try:
                result: Loaded | ValueError = load(job)
            except ValueError as e:
                result = e
            except BaseException as e:  # handed over: raised in the consumer
                put(e)
                return
            if not put((job, result)):
                return
        put(_END)

    threading.Thread(target=work, name="finesam-decode", daemon=True).start()
    try:
        while (item := ready.get()) is not _END:
            if isinstance(item, BaseException):
                raise item
            yield item  # type: ignore[misc]  (a (job, result) pair)
    finally:
        stop.set()

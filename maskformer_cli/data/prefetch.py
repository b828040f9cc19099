"""Ordered, bounded read-ahead of files in threads.

Evaluating saved predictions is bound by PNG decoding; torchvision's decoder releases the GIL, so a few
threads reading ahead keep every core busy while the metric update runs on the main thread. At most
`workers * 2` results are held at once, so memory stays flat however long the list is.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


def default_workers() -> int:
    """Threads for file decoding: the cores this process may use, at most 8."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(8, cores))


def prefetched(fn: Callable[[T], R], items: Iterable[T], workers: int | None = None) -> Iterator[R]:
    """Yield fn(item) for every item, in order, computing up to 2 * workers results ahead in threads.

    workers <= 1 runs inline (no threads). An exception raised by fn is re-raised when its result is
    reached, so errors name the item in the order a sequential loop would meet them.
    """
    workers = default_workers() if workers is None else workers
    if workers <= 1:
        for item in items:
            yield fn(item)
        return
    pending: deque[Future[R]] = deque()
    it = iter(items)
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="prefetch") as pool:
        try:
            for item in it:
                pending.append(pool.submit(fn, item))
                if len(pending) >= 2 * workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for f in pending:
                f.cancel()

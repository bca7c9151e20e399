"""Reading files ahead of the compute that consumes them."""

from __future__ import annotations

import collections
import concurrent.futures
from collections.abc import Callable, Iterable, Iterator


def read_ahead(
    pool: concurrent.futures.Executor, fn: Callable, items: Iterable, window: int
) -> Iterator[tuple[object, concurrent.futures.Future]]:
    """Yields ``(item, future of fn(item))`` in order, keeping ``window`` reads in flight."""
    it = iter(items)
    queue = collections.deque()
    for item in it:
        queue.append((item, pool.submit(fn, item)))
        if len(queue) >= window:
            break
    while queue:
        yield queue.popleft()
        for item in it:
            queue.append((item, pool.submit(fn, item)))
            break
